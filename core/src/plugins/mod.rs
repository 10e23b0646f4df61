//! Finding, loading and talking to htype driver plugins.
//!
//! [`Registry::load`] scans plugin directories for `*.so` files and loads
//! each through abi_stable's version and layout checks. A file that is not
//! a phaul plugin, was built against an incompatible ABI, fails to
//! initialise, or declares an htype another file already provides is
//! skipped with one line saying which file and why; the others still load.
//! [`Driver`] wraps one driver instance and turns its FFI results into
//! [`DriverError`]s.

mod driver;
mod host;
mod registry;

pub use driver::{Driver, HookDeadlines};
pub use host::{EngineHost, FeatureCheck};
pub use registry::{default_plugin_dirs, DriverSummary, LoadedPlugin, Registry, Skipped};

pub use phaul_plugin_api::DriverError;
