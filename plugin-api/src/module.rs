//! The root module every plugin library exports, and the
//! [`export_driver!`](crate::export_driver) macro that generates it.
//!
//! The engine loads a library with abi_stable. Before any driver code runs
//! it checks, in this order, that the library was built against a
//! compatible version of this crate (the version in the library's header,
//! [`ABI_VERSION`] when it was built), that every type crossing the
//! boundary has the layout the engine expects, and that the constants
//! crossing it have the same values ([`crate::constants`]).

use abi_stable::library::{
    CheckTypeLayout, LibHeader, RootModule, RootModuleResult, ROOT_MODULE_LOADER_NAME,
};
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::RResult;
use abi_stable::StableAbi;

use crate::constants::AbiConstants;
use crate::driver::DriverBox;
use crate::types::{DriverError, DriverInfo};

/// The plugin ABI version: the version of this crate. A plugin loads only
/// into an engine built against a compatible version (same major version;
/// while the major version is 0, the same minor version too).
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The table of entry points a plugin exports. New entry points are added
/// after the last prefix field, so older plugins keep loading.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The driver's identity and capabilities, without creating an
    /// instance for a migration.
    pub info: extern "C" fn() -> RResult<DriverInfo, DriverError>,
    /// A fresh driver instance for one side of one migration.
    #[sabi(last_prefix_field)]
    pub new_driver: extern "C" fn() -> RResult<DriverBox, DriverError>,
    /// The values of the constants that cross the boundary, as the plugin
    /// was compiled (added in 0.2; `None` from a module without it, which
    /// the engine refuses).
    #[sabi(missing_field(option))]
    pub abi_constants: extern "C" fn() -> AbiConstants,
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "phaul_plugin";
    const NAME: &'static str = "phaul_plugin";
    const VERSION_STRINGS: VersionStrings = abi_stable::package_version_strings!();
}

/// The symbol name of the library header abi_stable looks up, which
/// [`export_driver!`](crate::export_driver) gives its static. An attribute
/// needs a literal, so the macro spells it out again; the assertion below
/// keeps this one equal to abi_stable's, and every plugin test loads a
/// library exported under the macro's.
const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

const _: () = assert!(
    const_str_eq(ROOT_MODULE_SYMBOL, ROOT_MODULE_LOADER_NAME),
    "export_driver!'s symbol is not abi_stable's ROOT_MODULE_LOADER_NAME"
);

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// What [`export_driver!`](crate::export_driver) implements to name the
/// function that builds a plugin's root module.
#[doc(hidden)]
pub trait __RootModuleLoader {
    /// Builds the root module.
    fn root_module() -> PluginModRef;
}

/// The constructor abi_stable calls (once, when the engine first loads the
/// library): registers the module, turns a panic into an error.
extern "C" fn constructor<L: __RootModuleLoader>() -> RootModuleResult {
    abi_stable::library::__call_root_module_loader(L::root_module)
}

/// The library header of a plugin whose root module `L` builds, with its
/// layout included for the engine to check: what abi_stable's
/// `#[export_root_module]` generates, made here so that the code
/// [`export_driver!`](crate::export_driver) generates needs no direct
/// abi_stable dependency (that attribute names `::abi_stable`).
#[doc(hidden)]
pub const fn __lib_header<L: __RootModuleLoader>() -> LibHeader {
    // SAFETY: `constructor::<L>` returns a `PrefixRef` of `PluginMod` (from
    // a `PluginModRef`), the module type named here.
    unsafe { LibHeader::from_constructor::<PluginModRef>(constructor::<L>, CheckTypeLayout::Yes) }
}

/// Exports a [`Driver`](crate::Driver) type as a phaul plugin. The type must
/// implement `Default` (one fresh instance is made per migration side).
///
/// Put this once in the `cdylib` crate of the driver:
///
/// ```ignore
/// #[derive(Default)]
/// struct MyDriver { /* ... */ }
/// impl phaul_plugin_api::Driver for MyDriver { /* ... */ }
/// phaul_plugin_api::export_driver!(MyDriver);
/// ```
///
/// The generated entry points catch panics: a panicking `info` or
/// constructor makes the loader skip the plugin with a message, and a
/// panicking hook returns an error with
/// [`ErrorCode::PANICKED`](crate::ErrorCode::PANICKED) instead of aborting
/// the engine.
#[macro_export]
macro_rules! export_driver {
    ($driver:ty) => {
        /// The library header abi_stable reads (what
        /// `#[abi_stable::export_root_module]` would generate).
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static PHAUL_PLUGIN_LIB_HEADER: $crate::abi_stable::library::LibHeader = {
            struct Loader;
            impl $crate::module::__RootModuleLoader for Loader {
                fn root_module() -> $crate::PluginModRef {
                    phaul_plugin_root_module()
                }
            }
            $crate::module::__lib_header::<Loader>()
        };

        /// The plugin's root module.
        pub fn phaul_plugin_root_module() -> $crate::PluginModRef {
            extern "C" fn info(
            ) -> $crate::abi_stable::std_types::RResult<$crate::DriverInfo, $crate::DriverError>
            {
                $crate::guard("info", || {
                    Ok($crate::Driver::info(
                        &<$driver as ::std::default::Default>::default(),
                    ))
                })
            }
            extern "C" fn new_driver(
            ) -> $crate::abi_stable::std_types::RResult<$crate::DriverBox, $crate::DriverError>
            {
                $crate::guard("new_driver", || {
                    let driver =
                        $crate::GuardedDriver::new(<$driver as ::std::default::Default>::default());
                    Ok($crate::FfiDriver_TO::from_value(
                        driver,
                        $crate::abi_stable::sabi_trait::TD_Opaque,
                    ))
                })
            }
            extern "C" fn abi_constants() -> $crate::AbiConstants {
                $crate::AbiConstants::current()
            }
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginMod {
                info,
                new_driver,
                abi_constants,
            }
            .leak_into_prefix()
        }
    };
}
