//! Compiles a copy of phaul-plugin-api one minor version ahead of the real
//! one, unchanged otherwise (see ../api_variant.rs).

#[allow(dead_code)]
#[path = "../api_variant.rs"]
mod api_variant;

fn main() {
    let (major, minor, _) = api_variant::api_version();
    api_variant::generate((major, minor + 1, 0), &[]);
}
