#[derive(Debug, clap::Args)] pub struct BenchArgs {} pub async fn run(_r: girder::Registry, _a: BenchArgs) -> anyhow::Result<()> { Ok(()) }
