//! Engine services a driver may call, handed to it in
//! [`InitContext::host`](crate::InitContext::host) as a trait object. The
//! engine implements them; drivers never link against the engine.

// abi_stable's `#[sabi_trait]` expands to impls inside a generated const.
#![allow(non_local_definitions)]

use abi_stable::sabi_trait;
use abi_stable::std_types::{RArc, RResult, RStr, RString, RVec};

use crate::types::{CommandOutput, DriverError, LogLevel};

/// Services of the engine, callable from any driver hook.
///
/// The engine's implementation never panics across the boundary.
#[sabi_trait]
pub trait Host: Clone + Send + Sync + 'static {
    /// Writes a line to the engine's log (`tracing`, target `phaul::driver`),
    /// tagged with the driver's htype.
    fn log(&self, level: LogLevel, message: RStr<'_>);

    /// Runs a program (no shell) and waits for it: `argv[0]` is looked up
    /// in `PATH`. Standard output and error are captured. The command line
    /// and its exit status are logged. Errors only when the program cannot
    /// be started; a non-zero exit is reported in
    /// [`CommandOutput::status`].
    fn run_command(&self, argv: RVec<RString>) -> RResult<CommandOutput, DriverError>;

    /// The version of CRIU this side uses, e.g. `4.2.1`.
    fn criu_version(&self) -> RString;

    /// Path of the CRIU binary this side uses.
    fn criu_binary(&self) -> RString;

    /// Asks CRIU whether a feature works on this kernel (`mem_track`,
    /// `lazy_pages`, `pidfd_store`).
    #[sabi(last_prefix_field)]
    fn criu_feature(&self, name: RStr<'_>) -> RResult<bool, DriverError>;
}

/// The engine's services as an owned, cloneable trait object.
pub type HostBox = Host_TO<RArc<()>>;

/// Convenience calls on [`HostBox`] with std types.
pub trait HostExt {
    /// [`Host::log`] with a `&str`.
    fn log_str(&self, level: LogLevel, message: &str);
    /// [`Host::run_command`] taking `&[&str]`; a non-zero exit is an error
    /// that quotes the command's standard error.
    fn run_checked(&self, argv: &[&str]) -> Result<CommandOutput, DriverError>;
}

impl HostExt for HostBox {
    fn log_str(&self, level: LogLevel, message: &str) {
        self.log(level, RStr::from_str(message));
    }

    fn run_checked(&self, argv: &[&str]) -> Result<CommandOutput, DriverError> {
        let args: RVec<RString> = argv.iter().map(|a| RString::from(*a)).collect();
        let out = self.run_command(args).into_result()?;
        if out.status != 0 {
            return Err(DriverError::failed(format!(
                "`{}` exited with status {}: {}",
                argv.join(" "),
                out.status,
                out.stderr.trim()
            )));
        }
        Ok(out)
    }
}
