//! Compiles a copy of phaul-plugin-api at the real version in which one
//! field of a boundary type has another type: `CriuOpts::empty_ns` is a
//! `u64` instead of a `u32` (see ../api_variant.rs).

#[allow(dead_code)]
#[path = "../api_variant.rs"]
mod api_variant;

fn main() {
    api_variant::generate(
        api_variant::api_version(),
        &[api_variant::Edit {
            file: "types.rs",
            from: "pub empty_ns: u32,",
            to: "pub empty_ns: u64,",
        }],
    );
}
