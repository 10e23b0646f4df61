//! Shared ploop disks: the snapshot-and-copy algorithm of P.Haul's
//! shared-ploop patch (`shared_ploop` in `phaul/fs_haul_ploop.py`), which
//! lets a migration of a container whose disks both hosts see be rolled
//! back without either host writing into the other's data.
//!
//! While the container is frozen ([`SharedDisk::prepare`], the engine's
//! `storage_snapshot`):
//! 1. `DiskDescriptor.xml` is copied to `DiskDescriptor.xml.copy`;
//! 2. the original gets an offline snapshot (`ploop snapshot -o -u G1`): its
//!    delta so far becomes read-only and the destination will write into a
//!    new top delta of its own;
//! 3. the copy gets a snapshot (`ploop snapshot -u G2`, online when the disk
//!    is mounted): the source's ploop device switches to a new top delta of
//!    the copy, so whatever it still writes stays out of the destination's
//!    way.
//!
//! If step 3 fails, step 2 is undone (G1 merged back) and the copy removed;
//! if step 2 fails, the copy is removed. Either way the source's disk is as
//! it was.
//!
//! Rolled back ([`SharedDisk::rollback`], `storage_rollback`, before the
//! source resumes): the copy is renamed over the original (one atomic
//! rename: the source's disk is again described by one file) and G2 is
//! merged (`ploop snapshot-delete -u G2`); the destination's unused delta
//! and the copy's lock are removed.
//!
//! Committed ([`SharedDisk::commit`], `storage_commit`, after the source's
//! copy is gone and its disk unmounted): the copy, its lock and the copy's
//! delta (the source's last writes, which no descriptor names any more) are
//! deleted. The destination merges G1 once the container runs there
//! ([`merge_on_destination`], its `migration_complete`), learning G1 from
//! the `vz-shared-disks.json` meta file the source writes right after the
//! snapshot.
//!
//! Every ploop call may fail half-way through a merge: ploop merges a
//! child's blocks into its parent before it changes the descriptor, and the
//! child's blocks still overlay the parent's, so a disk whose merge failed
//! reads the same and the merge can be repeated.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, VzError};
use crate::ploop::DiskDescriptor;
use crate::tools::{VzCommand, VzTools};

/// `PATH.copy`.
pub fn copy_path(descriptor: &Path) -> PathBuf {
    suffixed(descriptor, ".copy")
}

/// ploop's lock file of a descriptor: `PATH.lck`.
pub fn lock_path(descriptor: &Path) -> PathBuf {
    suffixed(descriptor, ".lck")
}

fn suffixed(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_if_there(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VzError::io(p, e)),
    }
}

/// What the destination needs to finish a shared disk: which snapshot of
/// which descriptor to merge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The descriptor, as the container's configuration names it (a host
    /// path, not under the layout root).
    pub descriptor: String,
    /// The original's snapshot (G1).
    pub guid: String,
}

/// The content of `vz-shared-disks.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffFile {
    /// Format version (1).
    pub version: u32,
    /// One entry per shared disk.
    pub disks: Vec<Handoff>,
}

/// One shared disk through a migration (source side).
#[derive(Debug)]
pub struct SharedDisk {
    name: String,
    descriptor: PathBuf,
    orig_guid: Option<String>,
    orig_delta: Option<PathBuf>,
    copy_guid: Option<String>,
    copy_delta: Option<PathBuf>,
}

impl SharedDisk {
    /// The disk whose descriptor the configuration names `name` and which
    /// is at `descriptor` on this host.
    pub fn new(name: &str, descriptor: PathBuf) -> SharedDisk {
        SharedDisk {
            name: name.to_string(),
            descriptor,
            orig_guid: None,
            orig_delta: None,
            copy_guid: None,
            copy_delta: None,
        }
    }

    /// The descriptor on this host.
    pub fn descriptor(&self) -> &Path {
        &self.descriptor
    }

    /// Whether [`SharedDisk::prepare`] succeeded and neither rollback nor
    /// commit has run since.
    pub fn prepared(&self) -> bool {
        self.copy_guid.is_some()
    }

    /// Steps 1-3 (see the module documentation). On failure, whatever was
    /// done is undone; the error says so, or says what is left if the undo
    /// failed too.
    pub fn prepare(
        &mut self,
        tools: &mut dyn VzTools,
        guids: &mut dyn FnMut() -> Result<String>,
        copy_offline: bool,
    ) -> Result<()> {
        let dd = self.descriptor.clone();
        let copy = copy_path(&dd);
        DiskDescriptor::load(&dd)?;
        if copy.exists() {
            return Err(VzError::descriptor(
                &copy,
                "exists already (left by an earlier migration that could not be rolled back?): \
                 check which descriptor the container's disk is described by, then remove it",
            ));
        }
        if let Err(e) = std::fs::copy(&dd, &copy) {
            let _ = std::fs::remove_file(&copy);
            return Err(VzError::io(&copy, e));
        }
        let g1 = match guids() {
            Ok(g) => g,
            Err(e) => return Err(self.undo(e, None)),
        };
        if let Err(e) = tools.run(&VzCommand::Snapshot {
            descriptor: dd.display().to_string(),
            guid: g1.clone(),
            offline: true,
        }) {
            return Err(self.undo(e, None));
        }
        match DiskDescriptor::load(&dd) {
            Ok(d) => self.orig_delta = Some(d.active_delta()),
            Err(e) => return Err(self.undo(e, Some((tools, &g1)))),
        }
        let g2 = match guids() {
            Ok(g) => g,
            Err(e) => return Err(self.undo(e, Some((tools, &g1)))),
        };
        if let Err(e) = tools.run(&VzCommand::Snapshot {
            descriptor: copy.display().to_string(),
            guid: g2.clone(),
            offline: copy_offline,
        }) {
            return Err(self.undo(e, Some((tools, &g1))));
        }
        match DiskDescriptor::load(&copy) {
            Ok(d) => self.copy_delta = Some(d.active_delta()),
            Err(e) => {
                // The source's device may already write into the copy's new
                // delta: the copy describes its disk now. Put it in place as
                // a rollback would.
                self.orig_guid = Some(g1);
                self.copy_guid = Some(g2);
                return Err(match self.rollback(tools) {
                    Ok(()) => e,
                    Err(r) => VzError::descriptor(&copy, format!("{e}; and the rollback: {r}")),
                });
            }
        }
        self.orig_guid = Some(g1);
        self.copy_guid = Some(g2);
        Ok(())
    }

    /// Undoes a failed [`SharedDisk::prepare`]: merges the original's
    /// snapshot back (when it was taken) and removes the copy.
    fn undo(&mut self, cause: VzError, merge: Option<(&mut dyn VzTools, &str)>) -> VzError {
        let dd = self.descriptor.clone();
        let copy = copy_path(&dd);
        let mut left = Vec::new();
        if let Some((tools, g1)) = merge {
            if let Err(e) = tools.run(&VzCommand::SnapshotDelete {
                descriptor: dd.display().to_string(),
                guid: g1.to_string(),
            }) {
                left.push(format!(
                    "snapshot {g1} of {} is not merged back ({e}); the disk reads the same — \
                     merge it with `ploop snapshot-delete -u {g1} {}`",
                    dd.display(),
                    dd.display()
                ));
            }
        }
        for p in [copy.clone(), lock_path(&copy)] {
            if let Err(e) = remove_if_there(&p) {
                left.push(e.to_string());
            }
        }
        self.orig_delta = None;
        if left.is_empty() {
            cause
        } else {
            VzError::descriptor(&dd, format!("{cause}; undoing it: {}", left.join("; ")))
        }
    }

    /// Puts the source's disk back (see the module documentation). A no-op
    /// unless prepared; after an error the state is kept, so it may be
    /// called again.
    pub fn rollback(&mut self, tools: &mut dyn VzTools) -> Result<()> {
        let Some(g2) = self.copy_guid.clone() else {
            return Ok(());
        };
        let dd = self.descriptor.clone();
        let copy = copy_path(&dd);
        if copy.exists() {
            std::fs::rename(&copy, &dd).map_err(|e| {
                VzError::descriptor(
                    &dd,
                    format!(
                        "cannot put {} back in its place ({e}): the source's disk is described \
                         by the copy until it is renamed to {}",
                        copy.display(),
                        dd.display()
                    ),
                )
            })?;
        }
        tools
            .run(&VzCommand::SnapshotDelete {
                descriptor: dd.display().to_string(),
                guid: g2.clone(),
            })
            .map_err(|e| {
                VzError::descriptor(
                    &dd,
                    format!(
                        "the disk is back in place but its snapshot {g2} is not merged ({e}); it \
                         reads the same — merge it with `ploop snapshot-delete -u {g2} {}`",
                        dd.display()
                    ),
                )
            })?;
        self.copy_guid = None;
        self.orig_guid = None;
        self.copy_delta = None;
        let mut left = Vec::new();
        for p in self.orig_delta.take().into_iter().chain([lock_path(&copy)]) {
            if let Err(e) = remove_if_there(&p) {
                left.push(e.to_string());
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(VzError::descriptor(
                &dd,
                format!("rolled back, but left: {}", left.join("; ")),
            ))
        }
    }

    /// Drops the copy after success (see the module documentation). The
    /// original is not touched.
    pub fn commit(&mut self) -> Result<()> {
        if self.copy_guid.take().is_none() {
            return Ok(());
        }
        let copy = copy_path(&self.descriptor);
        let mut left = Vec::new();
        for p in [
            Some(copy.clone()),
            Some(lock_path(&copy)),
            self.copy_delta.take(),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = remove_if_there(&p) {
                left.push(e.to_string());
            }
        }
        self.orig_delta = None;
        if left.is_empty() {
            Ok(())
        } else {
            Err(VzError::descriptor(
                &self.descriptor,
                format!("committed, but could not remove: {}", left.join("; ")),
            ))
        }
    }

    /// What the destination must merge, once prepared.
    pub fn handoff(&self) -> Option<Handoff> {
        Some(Handoff {
            descriptor: self.name.clone(),
            guid: self.orig_guid.clone()?,
        })
    }
}

/// Destination, after a successful migration: merges the original's
/// snapshot (`ploop snapshot-delete -u G1 DD.xml`).
pub fn merge_on_destination(tools: &mut dyn VzTools, descriptor: &Path, guid: &str) -> Result<()> {
    tools.run(&VzCommand::SnapshotDelete {
        descriptor: descriptor.display().to_string(),
        guid: guid.to_string(),
    })?;
    Ok(())
}
