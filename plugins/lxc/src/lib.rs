//! The `lxc` htype: an LXC system container, named by its container name.
//! See [`driver`] for what it does and the options it takes, [`config`]
//! for what it reads from (and checks in) the container's configuration,
//! and [`tools`] for the LXC commands it runs.

pub mod config;
pub mod driver;
pub mod tools;

pub use driver::LxcDriver;

phaul_plugin_api::export_driver!(LxcDriver);
