#[girder::function(name = "ui/largest")]
fn largest<T: Ord>(_ctx: girder::Ctx, items: Vec<T>) -> Option<T> {
    items.into_iter().max()
}

fn main() {}
