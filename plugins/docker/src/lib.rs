//! The `docker` htype: a container of a stock Docker engine, named by its
//! name or id prefix. See [`driver`] for what it does and the options it
//! takes, [`container`] for what it reads from (and checks in) the
//! container's inspect document, [`api`] for the engine API client, and
//! [`runc`] for the destination engine's runc restore as the process table
//! shows it.

pub mod api;
pub mod container;
pub mod driver;
pub mod runc;

pub use driver::DockerDriver;

phaul_plugin_api::export_driver!(DockerDriver);
