//! The `vz` htype: a Virtuozzo/OpenVZ container, named by its CTID, whose
//! disks are ploop images. See [`driver`] for what it does and the options
//! it takes, [`tools`] for the Virtuozzo commands it runs, and [`standin`]
//! for what its tests run against instead (a stand-in, not Virtuozzo).

pub mod config;
pub mod criu;
pub mod driver;
pub mod error;
pub mod meta;
pub mod ploop;
pub mod shared;
pub mod standin;
pub mod tools;
pub mod xml;

#[cfg(test)]
mod tests;

pub use driver::VzDriver;

phaul_plugin_api::export_driver!(VzDriver);
