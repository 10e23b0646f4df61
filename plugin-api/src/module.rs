//! The root module every plugin library exports, and the
//! [`export_driver!`](crate::export_driver) macro that generates it.
//!
//! The engine loads a library with abi_stable, which checks before anything
//! else runs that the library was built against a compatible version of this
//! crate ([`ABI_VERSION`]) and that every type crossing the boundary has the
//! layout the engine expects.

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::RResult;
use abi_stable::StableAbi;

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
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "phaul_plugin";
    const NAME: &'static str = "phaul_plugin";
    const VERSION_STRINGS: VersionStrings = abi_stable::package_version_strings!();
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
        #[$crate::abi_stable::export_root_module]
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
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginMod { info, new_driver }.leak_into_prefix()
        }
    };
}
