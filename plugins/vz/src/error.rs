//! The vz driver's error type, and how it crosses the plugin boundary.

use std::path::{Path, PathBuf};

use phaul_plugin_api::DriverError;

/// What can go wrong in the vz driver.
#[derive(Debug, thiserror::Error)]
pub enum VzError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The container's configuration is missing something or is malformed.
    #[error("container configuration: {0}")]
    Config(String),
    /// A ploop disk descriptor is malformed or does not fit the operation.
    #[error("{path}: {message}")]
    Descriptor {
        /// The DiskDescriptor.xml.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A Virtuozzo tool (vzctl, ploop, cgget, ...) failed.
    #[error("`{command}` failed: {message}")]
    Tool {
        /// The command line, as run.
        command: String,
        /// Its exit status and standard error, or why it did not start.
        message: String,
    },
    /// A driver option is wrong.
    #[error("{0}")]
    Option(String),
    /// The container or a file it needs does not exist.
    #[error("{0}")]
    NotFound(String),
}

impl VzError {
    /// An [`VzError::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        VzError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A [`VzError::Descriptor`] for `path`.
    pub fn descriptor(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        VzError::Descriptor {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }
}

impl From<VzError> for DriverError {
    fn from(e: VzError) -> Self {
        match e {
            VzError::Option(_) | VzError::Config(_) => DriverError::invalid(e.to_string()),
            VzError::NotFound(_) => DriverError::not_found(e.to_string()),
            _ => DriverError::failed(e.to_string()),
        }
    }
}

/// The result type inside the driver.
pub type Result<T> = std::result::Result<T, VzError>;
