struct Shape(f64);

impl Shape {
    #[girder::function(name = "ui/area")]
    fn area(&self, _ctx: girder::Ctx) -> f64 {
        self.0 * self.0
    }
}

fn main() {
    let _ = Shape(1.0).0;
}
