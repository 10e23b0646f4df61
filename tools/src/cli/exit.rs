//! The exit codes of `phaul`, one per outcome a script may act on.

/// Success.
pub const SUCCESS: u8 = 0;
/// A generic failure (bad environment, no plugins, internal error).
pub const FAILURE: u8 = 1;
/// Refused by pre-flight checks: nothing was frozen, nothing changed.
pub const REFUSED: u8 = 3;
/// The migration failed and was rolled back: the source workload runs.
pub const ROLLED_BACK: u8 = 4;
/// The migration failed after the point of no return, or its outcome is
/// undecided (the source copy is stopped: run `phaul recover`); for
/// `phaul recover`, a session is still undecided.
pub const AFTER_COMMIT: u8 = 5;
