//! The exit codes of `phaul`, one per outcome a script may act on.

/// Success.
pub const SUCCESS: u8 = 0;
/// A generic failure (bad environment, no plugins, internal error).
pub const FAILURE: u8 = 1;
