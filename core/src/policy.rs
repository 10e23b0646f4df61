//! The destination's own policy: what a `phaul serve` accepts from a
//! source, whatever the source asks for. It is the operator's, given on
//! the destination (`phaul serve --allow-htype NAME --allow-sync-root
//! DIR`), and checked in the destination's pre-flight, before the source
//! freezes anything.
//!
//! - **htypes**: which drivers a source may use here (default: every
//!   loaded one).
//! - **sync roots**: which directories a file sync may write into. None by
//!   default, so a migration that syncs files is refused until the operator
//!   allows its roots. A root is resolved first ([`resolve_root`]: symlinks
//!   and `..` in the part that exists are resolved, a `..` in the part that
//!   does not is refused), and must then lie inside (or be) one of the
//!   allowed directories, themselves resolved the same way. The root is
//!   opened along that resolved path without following any symlink
//!   ([`Root`]) and the file-sync receiver writes through that descriptor
//!   only, so the directory that was checked is the one written into.
//!
//! The source's driver options still reach the destination's driver (see
//! [`crate::engine::dest`] for which and why); the paths among them that
//! decide where this side writes (the sync roots) are what this policy
//! checks.

use std::path::{Path, PathBuf};

use crate::fsync::{resolve_root, FsyncError, Root};

/// What the destination accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestPolicy {
    /// The htypes a source may migrate here; `None` accepts every loaded
    /// one (`--allow-htype NAME`, repeatable).
    pub allow_htypes: Option<Vec<String>>,
    /// The directories file syncs may write into: every sync root must
    /// resolve inside one of them (`--allow-sync-root DIR`, repeatable).
    /// Empty: no file sync is accepted.
    pub allow_sync_roots: Vec<PathBuf>,
}

/// A request the policy refuses.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The htype is not among the allowed ones.
    #[error(
        "this destination does not accept htype `{htype}` (it accepts: {allowed}); its operator \
         can allow it with `phaul serve --allow-htype {htype}`"
    )]
    Htype {
        /// The requested htype.
        htype: String,
        /// The allowed ones, comma-separated.
        allowed: String,
    },
    /// A sync root resolves outside every allowed directory.
    #[error(
        "this destination does not allow a file sync into {root}{resolved}: it is outside every \
         allowed directory ({allowed}); its operator can allow it with `phaul serve \
         --allow-sync-root DIR`"
    )]
    SyncRoot {
        /// The root as the source named it.
        root: String,
        /// `" (resolved: PATH)"` when resolving changed it, else empty.
        resolved: String,
        /// The allowed directories, comma-separated (or "none").
        allowed: String,
    },
    /// A sync root could not be resolved or opened safely.
    #[error("this destination refuses the file-sync root {root}: {source}")]
    Unsafe {
        /// The root as the source named it.
        root: String,
        /// Why.
        source: FsyncError,
    },
}

impl DestPolicy {
    /// Accepts every loaded htype and no file sync.
    pub fn new() -> DestPolicy {
        DestPolicy::default()
    }

    /// Whether `htype` may be migrated here.
    pub fn check_htype(&self, htype: &str) -> Result<(), PolicyError> {
        match &self.allow_htypes {
            Some(allowed) if !allowed.iter().any(|a| a == htype) => Err(PolicyError::Htype {
                htype: htype.to_string(),
                allowed: if allowed.is_empty() {
                    "none".into()
                } else {
                    allowed.join(", ")
                },
            }),
            _ => Ok(()),
        }
    }

    /// Resolves `root` and checks it against the allowed directories;
    /// returns the resolved path (which is what must be opened).
    pub fn check_sync_root(&self, root: &str) -> Result<PathBuf, PolicyError> {
        let unsafe_root = |source| PolicyError::Unsafe {
            root: root.to_string(),
            source,
        };
        let resolved = resolve_root(Path::new(root)).map_err(unsafe_root)?;
        let inside = self.allow_sync_roots.iter().any(|a| {
            // An allowed directory that cannot be resolved allows nothing.
            resolve_root(a).is_ok_and(|a| resolved.starts_with(a))
        });
        if inside {
            return Ok(resolved);
        }
        Err(PolicyError::SyncRoot {
            root: root.to_string(),
            resolved: if resolved == Path::new(root) {
                String::new()
            } else {
                format!(" (resolved: {})", resolved.display())
            },
            allowed: if self.allow_sync_roots.is_empty() {
                "none: no --allow-sync-root was given".into()
            } else {
                self.allow_sync_roots
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    /// Checks every root ([`DestPolicy::check_sync_root`]) and opens them
    /// (creating what is missing) along their resolved paths without
    /// following symlinks, for the file-sync receiver
    /// ([`crate::fsync::Receiver::with_roots`]).
    pub fn open_sync_roots(&self, roots: &[String]) -> Result<Vec<Root>, PolicyError> {
        let checked = roots
            .iter()
            .map(|r| self.check_sync_root(r).map(|p| (r, p)))
            .collect::<Result<Vec<_>, _>>()?;
        checked
            .into_iter()
            .map(|(r, p)| {
                Root::open_resolved(p).map_err(|source| PolicyError::Unsafe {
                    root: r.clone(),
                    source,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&Path]) -> DestPolicy {
        DestPolicy {
            allow_htypes: None,
            allow_sync_roots: allowed.iter().map(|p| p.to_path_buf()).collect(),
        }
    }

    #[test]
    fn htypes_default_to_every_one_and_otherwise_only_the_allowed() {
        assert!(DestPolicy::new().check_htype("pid").is_ok());
        let p = DestPolicy {
            allow_htypes: Some(vec!["lxc".into()]),
            ..DestPolicy::new()
        };
        assert!(p.check_htype("lxc").is_ok());
        let e = p.check_htype("pid").unwrap_err().to_string();
        assert!(
            e.contains("--allow-htype pid") && e.contains("accepts: lxc"),
            "{e}"
        );
    }

    #[test]
    fn no_sync_root_is_allowed_by_default() {
        let d = tempfile::tempdir().unwrap();
        let e = DestPolicy::new()
            .check_sync_root(d.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--allow-sync-root") && e.contains("none: no --allow-sync-root"),
            "{e}"
        );
    }

    #[test]
    fn roots_inside_an_allowed_directory_are_accepted_even_if_missing() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        let p = policy(&[&allowed]);
        let root = allowed.join("a/b");
        let got = p.check_sync_root(root.to_str().unwrap()).unwrap();
        assert_eq!(got, std::fs::canonicalize(&allowed).unwrap().join("a/b"));
        assert!(p.check_sync_root(allowed.to_str().unwrap()).is_ok());
        let roots = p.open_sync_roots(&[root.display().to_string()]).unwrap();
        assert!(root.is_dir(), "created");
        assert_eq!(roots[0].path(), got);
    }

    #[test]
    fn dot_dot_and_symlinks_that_leave_the_allowed_set_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        let outside = d.path().join("outside");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("new"), allowed.join("dangling")).unwrap();
        let p = policy(&[&allowed]);
        let refused = |root: String| {
            let e = p.check_sync_root(&root).unwrap_err().to_string();
            assert!(e.contains(&root), "names the root: {e}");
            e
        };
        // `..` that leaves it (existing and not).
        let e = refused(format!("{}/../outside", allowed.display()));
        assert!(e.contains("--allow-sync-root"), "{e}");
        refused(format!("{}/../outside/missing", allowed.display()));
        // `..` after a part that does not exist cannot be resolved.
        let e = refused(format!("{}/missing/../../outside", allowed.display()));
        assert!(e.contains("cannot be resolved"), "{e}");
        // A symlink inside that points out, with or without more below.
        let e = refused(format!("{}/link", allowed.display()));
        assert!(e.contains("resolved:"), "{e}");
        refused(format!("{}/link/sub", allowed.display()));
        // `..` that stays inside is resolved and fine.
        std::fs::create_dir(allowed.join("x")).unwrap();
        assert!(p
            .check_sync_root(&format!("{}/x/../y", allowed.display()))
            .is_ok());
        // A dangling symlink passes the lexical check but never opens.
        let dangling = format!("{}/dangling", allowed.display());
        let e = p.open_sync_roots(&[dangling]).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        assert!(!outside.join("new").exists(), "nothing created outside");
    }

    #[test]
    fn a_root_swapped_for_a_symlink_after_the_check_is_not_opened() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("allowed");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(allowed.join("data")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let p = policy(&[&allowed]);
        let checked = p
            .check_sync_root(allowed.join("data").to_str().unwrap())
            .unwrap();
        // The race: between the check and the open, `data` becomes a link.
        std::fs::remove_dir(allowed.join("data")).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("data")).unwrap();
        let e = Root::open_resolved(checked).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
    }
}
