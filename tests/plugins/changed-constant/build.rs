//! Compiles a copy of phaul-plugin-api at the real version, with the same
//! layout, in which one constant has another value: `Capabilities::LIVE`
//! is bit 6 instead of bit 3 (see ../api_variant.rs).

#[allow(dead_code)]
#[path = "../api_variant.rs"]
mod api_variant;

fn main() {
    api_variant::generate(
        api_variant::api_version(),
        &[api_variant::Edit {
            file: "types.rs",
            from: "pub const LIVE: Self = Self(1 << 3);",
            to: "pub const LIVE: Self = Self(1 << 12);",
        }],
    );
}
