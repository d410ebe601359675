// Each refused parameter is reported, with what to write instead.
#[girder::function(name = "ui/params")]
async fn params(
    _ctx: girder::Ctx,
    total: &mut u64,
    label: impl ToString,
    (x, y): (u32, u32),
    names: Vec<&str>,
) -> u64 {
    *total + u64::from(x + y) + label.to_string().len() as u64 + names.len() as u64
}

fn main() {}
