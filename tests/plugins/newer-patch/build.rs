//! Compiles a copy of phaul-plugin-api at a later patch release of the
//! real version, unchanged otherwise (see ../api_variant.rs).

#[allow(dead_code)]
#[path = "../api_variant.rs"]
mod api_variant;

fn main() {
    let (major, minor, patch) = api_variant::api_version();
    api_variant::generate((major, minor, patch + 7), &[]);
}
