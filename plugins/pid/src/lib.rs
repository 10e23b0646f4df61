//! The `pid` htype: a plain process tree, named by the pid of its root.
//! See [`driver`] for what it does and the options it takes.

pub mod driver;
pub mod identity;
pub mod restart;

pub use driver::PidDriver;

phaul_plugin_api::export_driver!(PidDriver);
