//! # phaul-plugin-api: the stable ABI of phaul htype drivers
//!
//! phaul moves running process trees and containers between hosts with CRIU.
//! What kind of workload it moves is up to a *driver* (an "htype": `pid`,
//! `lxc`, `docker`, `vz`, or one of yours). Drivers are `cdylib` plugins the
//! engine loads at run time; this crate is everything a driver author
//! depends on. It never links the engine: the engine's services reach the
//! driver as a [`HostBox`] trait object.
//!
//! ## Writing a driver
//!
//! 1. Make a crate with `crate-type = ["cdylib"]` depending on
//!    `phaul-plugin-api` only: abi_stable is re-exported as
//!    [`phaul_plugin_api::abi_stable`](abi_stable) for the FFI-safe std
//!    types (`RString`, `RVec`, ...), and the code [`export_driver!`]
//!    generates refers to it through this crate.
//! 2. Implement [`Driver`] for a `Default` type. Only [`Driver::info`] and
//!    [`Driver::init`] are required; read the documentation of every other
//!    hook to see when it runs, on which side, whether the workload is
//!    frozen then, and what a failure does.
//! 3. Call [`export_driver!`] once with the type.
//! 4. Install the `.so` into a plugin directory and check it with
//!    `phaul htypes --plugin-dir DIR`.
//!
//! `examples/hello-driver` in phaul's repository is a complete driver built
//! this way, outside phaul's workspace.
//!
//! ```ignore
//! use phaul_plugin_api::*;
//!
//! #[derive(Default)]
//! struct Hello { host: Option<HostBox> }
//!
//! impl Driver for Hello {
//!     fn info(&self) -> DriverInfo {
//!         DriverInfo {
//!             name: "hello".into(),
//!             version: env!("CARGO_PKG_VERSION").into(),
//!             description: "an example".into(),
//!             capabilities: Capabilities::LIVE,
//!         }
//!     }
//!     fn init(&mut self, ctx: InitContext) -> DriverResult<()> {
//!         ctx.host.log_str(LogLevel::Info, "hello from the driver");
//!         self.host = Some(ctx.host.clone());
//!         Ok(())
//!     }
//!     fn root_task_pid(&mut self) -> DriverResult<i32> { Ok(4242) }
//! }
//!
//! export_driver!(Hello);
//! ```
//!
//! ## Compatibility
//!
//! The engine refuses a plugin built against an incompatible
//! [`ABI_VERSION`] (while the major version is 0: another minor version),
//! whose boundary types have a different layout, or whose boundary
//! constants have other values ([`constants`]), with one line naming the
//! file and what differs; the other plugins still load.
//! Panics inside a driver never cross the boundary (see [`guard`]).

#![warn(missing_docs)]

pub mod constants;
pub mod driver;
pub mod host;
pub mod module;
pub mod mountinfo;
pub mod types;

pub use abi_stable;
pub use constants::{abi_constants, abi_fingerprint, AbiConstant, AbiConstants};
pub use driver::{guard, Driver, DriverBox, FfiDriver, FfiDriver_TO, GuardedDriver};
pub use host::{Host, HostBox, HostExt, Host_TO};
pub use module::{PluginMod, PluginModRef, ABI_VERSION};
pub use types::*;
