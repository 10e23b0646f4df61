//! The plugin registry: scanning directories and loading every driver
//! library with abi_stable's checks and phaul's own (see [`super::compat`]),
//! one independent verdict per file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibHeader, LibraryError};
use abi_stable::StableAbi;
use phaul_plugin_api::{abi_constants, abi_fingerprint, Capabilities, DriverInfo, PluginModRef};
use serde::Serialize;

use super::compat::{self, Refusal};
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
    /// The phaul-plugin-api version the plugin was built against (from
    /// its library header).
    pub abi_version: String,
    /// Capability names (`live`, `restart`, `pre-dump`, ...).
    pub capabilities: Vec<String>,
    /// The raw capability bits.
    #[serde(skip)]
    pub caps: Capabilities,
}

impl DriverSummary {
    fn from_info(info: &DriverInfo, abi_version: String) -> Self {
        Self {
            name: info.name.to_string(),
            version: info.version.to_string(),
            description: info.description.to_string(),
            abi_version,
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
    /// The kind of refusal ([`Refusal::kind`]: `version`, `layout`, ...).
    pub kind: &'static str,
    /// The refusal itself.
    #[serde(skip)]
    pub refusal: Refusal,
}

impl Skipped {
    fn new(path: PathBuf, refusal: Refusal) -> Self {
        Self {
            path,
            reason: refusal.to_string(),
            kind: refusal.kind(),
            refusal,
        }
    }
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
                    reg.skipped.push(Skipped::new(
                        dir.clone(),
                        Refusal::UnreadableDir(e.to_string()),
                    ));
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
            Err(refusal) => self.skipped.push(Skipped::new(path, refusal)),
            Ok((module, summary)) => {
                if let Some(first) = self.plugins.get(&summary.name) {
                    if first.path == path {
                        return; // the same file reached through two directories
                    }
                    let refusal = Refusal::Duplicate {
                        htype: summary.name.clone(),
                        first: first.path.clone(),
                    };
                    self.skipped.push(Skipped::new(path, refusal));
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

/// Loads one library, checking in order (each check reads only what the
/// previous one vouched for): it is an abi_stable library; the
/// phaul-plugin-api version in its header fits this engine; its boundary
/// types have this engine's layout; its boundary constants have this
/// engine's values; its driver describes itself with a valid name.
fn load_module(path: &Path) -> Result<(PluginModRef, DriverSummary), Refusal> {
    let header = lib_header_from_path(path).map_err(|e| describe(&e, None))?;
    let plugin_version = header.version_strings();
    compat::check_version(plugin_version)?;
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|e| describe(&e, Some(header)))?;
    check_constants(&module, &plugin_version.to_string())?;
    let info = (module.info())()
        .into_result()
        .map_err(|e| Refusal::Init(e.message.to_string()))?;
    if info.name.is_empty()
        || !info
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Refusal::InvalidName(info.name.to_string()));
    }
    Ok((
        module,
        DriverSummary::from_info(&info, plugin_version.to_string()),
    ))
}

/// Compares the plugin's boundary constants with this engine's (equal
/// fingerprints: equal tables; otherwise constant by constant).
fn check_constants(module: &PluginModRef, plugin_version: &str) -> Result<(), Refusal> {
    let engine_version = compat::engine_version().to_string();
    let Some(entry) = module.abi_constants() else {
        return Err(Refusal::NoConstants(engine_version));
    };
    let theirs = entry();
    if theirs.fingerprint == abi_fingerprint() {
        return Ok(());
    }
    match compat::constants_mismatch(abi_constants(), theirs.constants.as_slice()) {
        Some(mismatch) => Err(Refusal::Constants {
            plugin: plugin_version.to_string(),
            mismatch,
            engine: engine_version,
        }),
        None => {
            tracing::debug!(
                "plugin constants differ only by constants one side does not know (fingerprint \
                 {:#x}, here {:#x})",
                theirs.fingerprint,
                abi_fingerprint()
            );
            Ok(())
        }
    }
}

/// One refusal for an abi_stable loading error (the full error goes to the
/// debug log). `header` is the library's, for naming a layout mismatch.
fn describe(e: &LibraryError, header: Option<&LibHeader>) -> Refusal {
    tracing::debug!("plugin loading error: {e}");
    let engine = compat::engine_version().to_string();
    match e {
        LibraryError::OpenError { err, .. } => Refusal::CannotOpen(err.to_string()),
        LibraryError::GetSymbolError { .. } => Refusal::NotAPlugin,
        // Not reached since compat::check_version runs first; kept for
        // completeness.
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => {
            compat::version_refusal(actual_version, actual_version.to_string())
        }
        LibraryError::ParseVersionError(e) => Refusal::UnreadableVersion(format!("{e:?}"), engine),
        LibraryError::AbiInstability(_) => {
            let plugin = header.map(|h| h.version_strings().to_string());
            let mismatch = header
                .and_then(LibHeader::layout)
                .and_then(|found| compat::layout_mismatch(PluginModRef::LAYOUT, found))
                .unwrap_or_else(|| "the layout check failed (run with -v for the details)".into());
            Refusal::Layout {
                plugin: plugin.unwrap_or_else(|| engine.clone()),
                mismatch,
                engine,
            }
        }
        LibraryError::InvalidAbiHeader(h) => Refusal::AbiStable(format!("{h:?}")),
        LibraryError::InvalidCAbi { .. } => Refusal::CAbi,
        // abi_stable's text spans lines; the refusal is one.
        LibraryError::RootModule { err, .. } => Refusal::Init(
            err.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        ),
        LibraryError::Many(errs) => errs
            .iter()
            .next()
            .map(|e| describe(e, header))
            .unwrap_or_else(|| Refusal::Init("abi_stable reported no error".into())),
    }
}
