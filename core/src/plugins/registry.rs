//! The plugin registry: scanning directories and loading every driver
//! library with abi_stable's checks, one independent verdict per file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use phaul_plugin_api::{Capabilities, DriverInfo, PluginModRef, ABI_VERSION};
use serde::Serialize;

use super::driver::Driver;
use crate::error::Error;

/// Environment variable naming the plugin directory when no
/// `--plugin-dir` is given.
pub const PLUGIN_DIR_ENV: &str = "PHAUL_PLUGIN_DIR";

/// The directories searched when the user names none: `$PHAUL_PLUGIN_DIR`
/// (colon-separated) if set, else the directories installed next to the
/// running binary: `<bindir>/plugins` and `<bindir>/../lib/phaul/plugins`.
pub fn default_plugin_dirs() -> Vec<PathBuf> {
    if let Some(v) = std::env::var_os(PLUGIN_DIR_ENV) {
        return std::env::split_paths(&v)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
    }
    let Some(bindir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    else {
        return Vec::new();
    };
    vec![bindir.join("plugins"), bindir.join("../lib/phaul/plugins")]
}

/// What `phaul htypes` shows about a driver.
#[derive(Debug, Clone, Serialize)]
pub struct DriverSummary {
    /// The htype name.
    pub name: String,
    /// The driver's own version.
    pub version: String,
    /// One line on what it moves.
    pub description: String,
    /// The plugin ABI version the engine checked it against.
    pub abi_version: String,
    /// Capability names (`live`, `restart`, `pre-dump`, ...).
    pub capabilities: Vec<String>,
    /// The raw capability bits.
    #[serde(skip)]
    pub caps: Capabilities,
}

impl DriverSummary {
    fn from_info(info: &DriverInfo) -> Self {
        Self {
            name: info.name.to_string(),
            version: info.version.to_string(),
            description: info.description.to_string(),
            abi_version: ABI_VERSION.to_string(),
            capabilities: info
                .capabilities
                .names()
                .into_iter()
                .map(String::from)
                .collect(),
            caps: info.capabilities,
        }
    }
}

/// A successfully loaded plugin.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedPlugin {
    /// Identity and capabilities.
    #[serde(flatten)]
    pub summary: DriverSummary,
    /// The library it came from.
    pub path: PathBuf,
    #[serde(skip)]
    module: ModuleRef,
}

#[derive(Clone, Copy)]
struct ModuleRef(PluginModRef);

impl std::fmt::Debug for ModuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginModRef")
    }
}

/// A library that was not loaded, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// One line: what is wrong and what to do.
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "skipped plugin {}: {}", self.path.display(), self.reason)
    }
}

/// Every driver found in a set of plugin directories.
#[derive(Debug, Default)]
pub struct Registry {
    plugins: BTreeMap<String, LoadedPlugin>,
    skipped: Vec<Skipped>,
    dirs: Vec<PathBuf>,
}

impl Registry {
    /// Loads every `*.so` in `dirs` (in directory order, files sorted by
    /// name). Directories that do not exist are ignored; unreadable ones
    /// and bad files end up in [`Registry::skipped`].
    pub fn load(dirs: &[PathBuf]) -> Registry {
        let mut reg = Registry {
            dirs: dirs.to_vec(),
            ..Default::default()
        };
        for dir in dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    reg.skipped.push(Skipped {
                        path: dir.clone(),
                        reason: format!("cannot read the plugin directory: {e}"),
                    });
                    continue;
                }
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "so") && p.is_file())
                .collect();
            files.sort();
            for path in files {
                reg.load_file(path);
            }
        }
        reg
    }

    fn load_file(&mut self, path: PathBuf) {
        let path = path.canonicalize().unwrap_or(path);
        match load_module(&path) {
            Err(reason) => self.skipped.push(Skipped { path, reason }),
            Ok((module, summary)) => {
                if let Some(first) = self.plugins.get(&summary.name) {
                    if first.path == path {
                        return; // the same file reached through two directories
                    }
                    self.skipped.push(Skipped {
                        reason: format!(
                            "declares htype `{}`, which {} already provides: remove one of the two",
                            summary.name,
                            first.path.display()
                        ),
                        path,
                    });
                    return;
                }
                tracing::debug!(htype = %summary.name, path = %path.display(), "loaded plugin");
                self.plugins.insert(
                    summary.name.clone(),
                    LoadedPlugin {
                        summary,
                        path,
                        module: ModuleRef(module),
                    },
                );
            }
        }
    }

    /// The loaded plugins, by htype name.
    pub fn plugins(&self) -> impl Iterator<Item = &LoadedPlugin> {
        self.plugins.values()
    }

    /// Logs every refused library as a warning.
    pub fn warn_skipped(&self) {
        for s in &self.skipped {
            tracing::warn!("{s}");
        }
    }

    /// The libraries that were refused.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The directories that were searched.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The plugin for an htype.
    pub fn get(&self, htype: &str) -> Option<&LoadedPlugin> {
        self.plugins.get(htype)
    }

    /// A fresh driver instance for `htype`, or an error listing the htypes
    /// that are available.
    pub fn instantiate(&self, htype: &str) -> Result<Driver, Error> {
        let plugin = self.get(htype).ok_or_else(|| Error::UnknownHtype {
            htype: htype.to_string(),
            available: self.plugins.keys().cloned().collect::<Vec<_>>().join(", "),
            dirs: self
                .dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })?;
        let boxed = (plugin.module.0.new_driver())()
            .into_result()
            .map_err(|e| Error::Driver {
                htype: htype.to_string(),
                hook: "new_driver",
                source: e,
            })?;
        Ok(Driver::new(htype.to_string(), boxed))
    }
}

fn load_module(path: &Path) -> Result<(PluginModRef, DriverSummary), String> {
    let header = lib_header_from_path(path).map_err(|e| describe(&e))?;
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|e| describe(&e))?;
    let info = (module.info())()
        .into_result()
        .map_err(|e| format!("failed to initialise: {}", e.message))?;
    if info.name.is_empty()
        || !info
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "declares an invalid htype name `{}` (use letters, digits, - and _)",
            info.name
        ));
    }
    Ok((module, DriverSummary::from_info(&info)))
}

/// One line for an abi_stable loading error.
fn describe(e: &LibraryError) -> String {
    tracing::debug!("plugin loading error: {e}");
    match e {
        LibraryError::OpenError { err, .. } => format!("cannot be loaded: {err}"),
        LibraryError::GetSymbolError { .. } => {
            "not a phaul plugin: it exports no abi_stable root module".to_string()
        }
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "built against plugin ABI {actual_version}, but this phaul uses ABI {expected_version}: \
             rebuild the driver against phaul-plugin-api {ABI_VERSION}"
        ),
        LibraryError::ParseVersionError(e) => format!("has an unreadable ABI version: {e}"),
        LibraryError::AbiInstability(_) => format!(
            "its plugin types do not match this phaul's (layout check failed): \
             rebuild the driver against phaul-plugin-api {ABI_VERSION}"
        ),
        LibraryError::InvalidAbiHeader(h) => format!(
            "was built with an incompatible abi_stable ({h:?}): rebuild it with abi_stable 0.11"
        ),
        LibraryError::InvalidCAbi { .. } => {
            "was built by a compiler with a different C ABI: rebuild it".to_string()
        }
        LibraryError::RootModule { err, .. } => format!("failed to initialise: {err}"),
        LibraryError::Many(errs) => errs.iter().map(describe).collect::<Vec<_>>().join("; "),
    }
}
