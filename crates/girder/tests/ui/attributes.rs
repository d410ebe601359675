#[girder::function(name = "ui/retried", retry = 3)]
fn retried(_ctx: girder::Ctx) -> u64 {
    1
}

#[girder::function(name = "ui/instant", timeout_ms = 0)]
fn instant(_ctx: girder::Ctx) -> u64 {
    1
}

fn main() {}
