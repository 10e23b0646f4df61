//! Test library: a perfectly valid shared object that is not a phaul
//! plugin (it exports no abi_stable root module). The loader must skip it.

/// Adds two numbers; exists so the library exports something.
#[no_mangle]
pub extern "C" fn not_a_plugin_add(a: i32, b: i32) -> i32 {
    a + b
}
