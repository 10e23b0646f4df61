//! # phaul-core: the phaul migration engine
//!
//! phaul moves running process trees and containers between hosts with
//! CRIU. This crate is the engine: it loads htype driver plugins
//! ([`plugins`]) and drives migrations through them.
//!
//! The driver contract itself lives in the `phaul-plugin-api` crate, which
//! is all a driver author needs.

#![warn(missing_docs)]

pub mod error;
pub mod plugins;

pub use error::{Error, Result};
