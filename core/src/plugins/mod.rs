//! Finding, loading and talking to htype driver plugins.
//!
//! [`Registry::load`] scans plugin directories for `*.so` files and loads
//! each after checking, before any driver code runs, the phaul-plugin-api
//! version in its header, the layout of the boundary types and the values
//! of the boundary constants. A file that is not a phaul plugin, fails one
//! of those checks, fails to initialise, or declares an htype another file
//! already provides is skipped with one line (a [`Refusal`]) saying which
//! file and what differs; the others still load.
//! [`Driver`] wraps one driver instance and turns its FFI results into
//! [`DriverError`]s.

mod compat;
mod driver;
mod host;
mod registry;

pub use compat::Refusal;
pub use driver::{Driver, HookDeadlines};
pub use host::{EngineHost, FeatureCheck};
pub use registry::{default_plugin_dirs, DriverSummary, LoadedPlugin, Registry, Skipped};

pub use phaul_plugin_api::DriverError;
