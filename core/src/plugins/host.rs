//! [`EngineHost`]: the engine's side of the plugin ABI's host callbacks
//! (logging, running commands, CRIU information). Nothing here may panic
//! across the boundary, so every callback runs under `catch_unwind`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::Arc;

use phaul_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use phaul_plugin_api::abi_stable::std_types::{RArc, RResult, RStr, RString, RVec};
use phaul_plugin_api::{CommandOutput, DriverError, Host, HostBox, Host_TO, LogLevel};

/// Answers `criu_feature` callbacks (the engine passes its CRIU client).
pub type FeatureCheck = Arc<dyn Fn(&str) -> Result<bool, String> + Send + Sync>;

/// The services a driver sees, for one htype.
#[derive(Clone)]
pub struct EngineHost {
    htype: Arc<str>,
    criu_binary: Arc<str>,
    criu_version: Arc<str>,
    features: FeatureCheck,
}

impl EngineHost {
    /// A host for `htype`'s driver.
    pub fn new(htype: &str, criu_binary: &str, criu_version: &str, features: FeatureCheck) -> Self {
        Self {
            htype: htype.into(),
            criu_binary: criu_binary.into(),
            criu_version: criu_version.into(),
            features,
        }
    }

    /// As the trait object drivers receive.
    pub fn into_box(self) -> HostBox {
        Host_TO::from_ptr(RArc::new(self), TD_Opaque)
    }
}

fn no_panic<T>(what: &str, f: impl FnOnce() -> RResult<T, DriverError>) -> RResult<T, DriverError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        RResult::RErr(DriverError::failed(format!(
            "engine callback {what} failed internally"
        )))
    })
}

impl Host for EngineHost {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let htype = &*self.htype;
        let msg = message.as_str();
        let _ = catch_unwind(AssertUnwindSafe(|| match level {
            LogLevel::Error => tracing::error!(target: "phaul::driver", htype, "{msg}"),
            LogLevel::Warn => tracing::warn!(target: "phaul::driver", htype, "{msg}"),
            LogLevel::Info => tracing::info!(target: "phaul::driver", htype, "{msg}"),
            LogLevel::Debug => tracing::debug!(target: "phaul::driver", htype, "{msg}"),
        }));
    }

    fn run_command(&self, argv: RVec<RString>) -> RResult<CommandOutput, DriverError> {
        no_panic("run_command", || {
            let Some((prog, args)) = argv.split_first() else {
                return RResult::RErr(DriverError::invalid("run_command: empty argv"));
            };
            let line = argv
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            let out = match Command::new(prog.as_str())
                .args(args.iter().map(|a| a.as_str()))
                .output()
            {
                Ok(o) => o,
                Err(e) => {
                    return RResult::RErr(DriverError::failed(format!("cannot run `{line}`: {e}")))
                }
            };
            use std::os::unix::process::ExitStatusExt;
            let status = out
                .status
                .code()
                .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
            tracing::debug!(target: "phaul::driver", htype = &*self.htype, status, "ran `{line}`");
            RResult::ROk(CommandOutput {
                status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned().into(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned().into(),
            })
        })
    }

    fn criu_version(&self) -> RString {
        RString::from(&*self.criu_version)
    }

    fn criu_binary(&self) -> RString {
        RString::from(&*self.criu_binary)
    }

    fn criu_feature(&self, name: RStr<'_>) -> RResult<bool, DriverError> {
        no_panic("criu_feature", || {
            (self.features)(name.as_str())
                .map_err(DriverError::failed)
                .into()
        })
    }
}
