//! Test plugin: what a driver built against an older, incompatible plugin
//! ABI (phaul-plugin-api 0.0.x, whose root module had a different layout)
//! exports. The engine must refuse it with a clear message and keep going.

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::RString;
use abi_stable::StableAbi;

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OldPluginModRef)))]
#[sabi(missing_field(panic))]
pub struct OldPluginMod {
    #[sabi(last_prefix_field)]
    pub name: extern "C" fn() -> RString,
}

impl RootModule for OldPluginModRef {
    abi_stable::declare_root_module_statics! {OldPluginModRef}
    const BASE_NAME: &'static str = "phaul_plugin";
    const NAME: &'static str = "phaul_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("0.0.7");
}

extern "C" fn name() -> RString {
    RString::from("old")
}

#[abi_stable::export_root_module]
pub fn phaul_plugin_root_module() -> OldPluginModRef {
    OldPluginMod { name }.leak_into_prefix()
}
