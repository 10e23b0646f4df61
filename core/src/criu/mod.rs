//! Talking to CRIU: the RPC messages ([`rpc`]), a `criu swrk` worker
//! process speaking them over a socketpair ([`Worker`]), and CRIU's
//! statistics images ([`stats`]).
//!
//! phaul never parses CRIU's command-line output and never lets CRIU open a
//! network connection: every socket CRIU uses is one phaul created and
//! handed over (the page-server socket travels as `ps.fd`).

pub mod rpc;
pub mod stats;
mod worker;

use std::path::{Path, PathBuf};

pub use worker::{Event, Worker};

/// Where phaul looks for CRIU: `$PHAUL_CRIU`, else `/usr/local/sbin/criu`
/// (where `scripts/setup.sh` installs it), else `criu` in `PATH`.
pub fn locate() -> PathBuf {
    if let Some(p) = std::env::var_os("PHAUL_CRIU") {
        return PathBuf::from(p);
    }
    let local = Path::new("/usr/local/sbin/criu");
    if local.exists() {
        return local.to_path_buf();
    }
    PathBuf::from("criu")
}

/// A CRIU version, comparable.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct CriuVersion {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Sublevel (patch) number.
    pub sublevel: u32,
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// The oldest CRIU phaul works with: 4.1 cannot dump TCP/UDP sockets on
/// Linux 6.16+, 3.x fails on recent vDSO layouts.
pub const MIN_VERSION: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    sublevel: 0,
};

/// Errors from CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// The binary could not be started.
    #[error("cannot start CRIU ({binary}): {source}; run scripts/setup.sh or set PHAUL_CRIU")]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// Talking to the worker failed (it died or closed the socket).
    #[error("lost the connection to CRIU during {during}: {source}")]
    Io {
        /// What was going on.
        during: String,
        /// Why.
        source: std::io::Error,
    },
    /// The worker sent something that is not a CRIU RPC response.
    #[error("CRIU sent a malformed RPC message during {during}: {detail}")]
    Protocol {
        /// What was going on.
        during: String,
        /// What was wrong.
        detail: String,
    },
    /// A request failed inside CRIU.
    #[error("CRIU {request} failed{errno}{msg}{log}")]
    Failed {
        /// The request type.
        request: &'static str,
        /// `: errno N` or empty.
        errno: String,
        /// `: message` or empty.
        msg: String,
        /// ` (see LOG)` or empty.
        log: String,
    },
    /// CRIU is older than phaul supports.
    #[error("CRIU {found} is too old: phaul needs {MIN_VERSION} or newer (run scripts/setup.sh)")]
    TooOld {
        /// The version found.
        found: CriuVersion,
    },
}
