//! # phaul-core: the phaul migration engine
//!
//! phaul moves running process trees and containers between hosts with
//! CRIU. This crate is the engine:
//!
//! - [`plugins`] loads htype driver plugins behind the stable ABI of
//!   `phaul-plugin-api` (all a driver author needs);
//! - [`criu`] talks to CRIU over its RPC interface (`criu swrk`);
//! - [`proto`] is the wire protocol between the two phauls, and
//!   [`memchan`] the connection CRIU's page stream travels on;
//! - [`engine`] runs a migration on the source ([`engine::source`]) and on
//!   the destination ([`engine::dest`]), with rollback on failure; its
//!   documentation lists the phases and what a failure does in each;
//! - [`server`] is the destination service, [`policy`] what it accepts
//!   from a source (htypes, file-sync roots), and [`transport`] how the
//!   two phauls reach each other (mutual TLS on every connection);
//! - [`journal`] is each side's durable record of its decisions, which
//!   `phaul recover` and a restarted `phaul serve` read;
//! - [`fsync`] synchronises directory trees between the hosts, live (phaul's rsync);
//! - [`fuzzing`] (only with the non-default `fuzzing` feature) holds the
//!   entry points of the fuzz targets in `fuzz/`;
//! - [`api`] is the library API for embedders (a config, a server, a client
//!   and `migrate()`, in the shape of the Go phaul library).

#![warn(missing_docs)]

pub mod api;
pub mod conn;
pub mod criu;
pub mod engine;
pub mod error;
pub mod fsync;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod journal;
pub mod memchan;
pub mod plugins;
pub mod policy;
pub mod postcopy;
pub mod precopy;
pub mod proc;
pub mod proto;
pub mod server;
pub mod transport;
pub mod workdir;

pub use error::{Error, Result};

/// This phaul's version.
pub const PHAUL_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The plugin ABI version this engine was built against.
pub const ABI_VERSION: &str = phaul_plugin_api::ABI_VERSION;
