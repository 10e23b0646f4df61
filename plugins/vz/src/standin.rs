//! A **stand-in** for Virtuozzo's tools, for the tests: not vzctl, not
//! ploop, never verified against them. Virtuozzo's kernel, vzctl and a
//! working ploop cannot run on the machines phaul is developed on, so the
//! driver's logic is tested against this instead.
//!
//! What it does for real: it edits real `DiskDescriptor.xml` files (ploop's
//! format, see [`crate::ploop`]) and delta files in a temporary directory,
//! the way `ploop snapshot` and `ploop snapshot-delete` change them (GUIDs,
//! parents, the top GUID, new delta files, merges), and writes and removes
//! the init pid file as `vzctl start`/`stop` would. Its delta files are not
//! ploop images: each is a text file of `BLOCK=DATA` lines, and a disk's
//! content is its chain of deltas read from the base up (a later delta's
//! block wins), which is what makes "the disk reads the same" checkable.
//! `cgget`/`cgexec` read files under the stand-in root
//! (`sys/fs/cgroup/ve/CTID/VAR`, `proc/sys/kernel/core_pattern`).
//!
//! Every command is recorded as the command line the real tools would run
//! ([`VzCommand::line`]), and a failure can be injected into any call,
//! before it changes anything or — for a merge — half-way through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::Layout;
use crate::error::{Result, VzError};
use crate::ploop::{self, DiskDescriptor};
use crate::shared::lock_path;
use crate::tools::{VzCommand, VzTools};

/// How an injected failure strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The call fails before it changes anything.
    Before,
    /// A `snapshot-delete` fails after merging half of the child's blocks
    /// into the parent (descriptor unchanged, child still there).
    MidMerge,
}

#[derive(Debug, Default)]
struct State {
    calls: usize,
    fail: Vec<(usize, Failure)>,
    log: Vec<String>,
    devices: BTreeMap<PathBuf, String>,
    next_pid: i32,
    restoring: Option<String>,
}

/// The stand-in. Clones share one state (the test keeps one, the driver
/// owns another).
#[derive(Debug, Clone)]
pub struct StandIn {
    layout: Layout,
    state: Arc<Mutex<State>>,
}

impl StandIn {
    /// A stand-in whose host paths are under `layout`'s root.
    pub fn new(layout: Layout) -> StandIn {
        StandIn {
            layout,
            state: Arc::new(Mutex::new(State {
                next_pid: 4100,
                ..State::default()
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The command lines run so far.
    pub fn commands(&self) -> Vec<String> {
        self.state().log.clone()
    }

    /// How many calls have been made.
    pub fn calls(&self) -> usize {
        self.state().calls
    }

    /// Makes call number `n` (counting every call made so far, from 0)
    /// fail; several calls may be made to fail.
    pub fn fail_call(&self, n: usize, how: Failure) {
        self.state().fail.push((n, how));
    }

    /// `ploop info -d` will report `device` for `descriptor`.
    pub fn set_device(&self, descriptor: &Path, device: &str) {
        self.state()
            .devices
            .insert(descriptor.to_path_buf(), device.to_string());
    }

    /// Creates a disk: a one-image descriptor at `dir/DiskDescriptor.xml`
    /// whose base delta `root.hds` holds `blocks`.
    pub fn create_disk(dir: &Path, blocks: &[(u64, &str)]) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| VzError::io(dir, e))?;
        let dd = dir.join(ploop::DESCRIPTOR);
        DiskDescriptor::single(&dd, "root.hds").store(&dd)?;
        let delta = dir.join("root.hds");
        write_delta(
            &delta,
            &blocks.iter().map(|(b, d)| (*b, d.to_string())).collect(),
        )?;
        Ok(dd)
    }

    /// What the disk described by `descriptor` reads: its chain of deltas
    /// from the base up, later blocks winning.
    pub fn read_disk(descriptor: &Path) -> Result<BTreeMap<u64, String>> {
        let d = DiskDescriptor::load(descriptor)?;
        let mut out = BTreeMap::new();
        for image in d.chain() {
            out.extend(read_delta(&d.file_path(&image))?);
        }
        Ok(out)
    }

    /// Writes a block into the active delta of `descriptor` (the
    /// container's device writing).
    pub fn write_block(descriptor: &Path, block: u64, data: &str) -> Result<()> {
        let d = DiskDescriptor::load(descriptor)?;
        let delta = d.active_delta();
        let mut blocks = read_delta(&delta)?;
        blocks.insert(block, data.to_string());
        write_delta(&delta, &blocks)
    }

    fn next(&self, cmd: &VzCommand) -> Option<Failure> {
        let mut s = self.state();
        s.log.push(cmd.line());
        let n = s.calls;
        s.calls += 1;
        let i = s.fail.iter().position(|(at, _)| *at == n)?;
        Some(s.fail.remove(i).1)
    }

    fn snapshot(&self, dd: &Path, guid: &str) -> Result<()> {
        let mut d = DiskDescriptor::load(dd)?;
        if d.shots().iter().any(|s| s.guid == guid) {
            return Err(VzError::descriptor(
                dd,
                format!("snapshot {guid} already exists"),
            ));
        }
        let top = d.top_guid().to_string();
        let base = d.chain()[0].file.clone();
        let base = base.split('.').take(2).collect::<Vec<_>>().join(".");
        let file = format!("{base}.{}", ploop::new_guid()?);
        let path = d.dir().join(&file);
        write_delta(&path, &BTreeMap::new())?;
        d.rename_guid(&top, guid);
        d.add_image(&top, &file, guid);
        d.store(dd)?;
        touch(&lock_path(dd))
    }

    fn snapshot_delete(&self, dd: &Path, guid: &str, mid_merge: bool) -> Result<()> {
        let mut d = DiskDescriptor::load(dd)?;
        let shots = d.shots();
        if !shots.iter().any(|s| s.guid == guid) {
            return Err(VzError::descriptor(
                dd,
                format!("Can't find snapshot by uuid {guid}"),
            ));
        }
        if d.top_guid() == guid {
            return Err(VzError::descriptor(
                dd,
                format!("Unable to delete active snapshot {guid}"),
            ));
        }
        let children: Vec<_> = shots.iter().filter(|s| s.parent == guid).collect();
        let image = d
            .image(guid)
            .ok_or_else(|| VzError::descriptor(dd, format!("no image for {guid}")))?;
        let parent_file = d.file_path(&image);
        match children.as_slice() {
            [] => {
                d.remove_image(guid);
                d.store(dd)?;
                std::fs::remove_file(&parent_file).map_err(|e| VzError::io(&parent_file, e))?;
            }
            [child] => {
                let child_guid = child.guid.clone();
                let child_image = d
                    .image(&child_guid)
                    .ok_or_else(|| VzError::descriptor(dd, format!("no image for {child_guid}")))?;
                let child_file = d.file_path(&child_image);
                let from = read_delta(&child_file)?;
                let mut into = read_delta(&parent_file)?;
                let half = from.len() / 2;
                let fail = |into: &BTreeMap<u64, String>| -> Result<()> {
                    write_delta(&parent_file, into)?;
                    Err(VzError::Tool {
                        command: format!("ploop snapshot-delete -u {guid} {}", dd.display()),
                        message: "stand-in: injected failure half-way through the merge".into(),
                    })
                };
                for (i, (b, data)) in from.iter().enumerate() {
                    if mid_merge && i == half {
                        return fail(&into);
                    }
                    into.insert(*b, data.clone());
                }
                if mid_merge && half == from.len() {
                    return fail(&into);
                }
                write_delta(&parent_file, &into)?;
                d.remove_image(&child_guid);
                d.rename_guid(guid, &child_guid);
                d.store(dd)?;
                std::fs::remove_file(&child_file).map_err(|e| VzError::io(&child_file, e))?;
            }
            _ => {
                return Err(VzError::descriptor(
                    dd,
                    format!("snapshot {guid} has {} children", children.len()),
                ))
            }
        }
        touch(&lock_path(dd))
    }

    fn read_host(&self, path: &str) -> Result<String> {
        let p = self.layout.host(path);
        std::fs::read_to_string(&p)
            .map(|s| s.trim_end().to_string())
            .map_err(|e| VzError::io(&p, e))
    }
}

fn touch(p: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map(drop)
        .map_err(|e| VzError::io(p, e))
}

fn read_delta(p: &Path) -> Result<BTreeMap<u64, String>> {
    let text = std::fs::read_to_string(p).map_err(|e| VzError::io(p, e))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (b, d) = l
                .split_once('=')
                .ok_or_else(|| VzError::descriptor(p, format!("stand-in delta line `{l}`")))?;
            let b = b
                .parse()
                .map_err(|_| VzError::descriptor(p, format!("stand-in delta line `{l}`")))?;
            Ok((b, d.to_string()))
        })
        .collect()
}

fn write_delta(p: &Path, blocks: &BTreeMap<u64, String>) -> Result<()> {
    let text: String = blocks.iter().map(|(b, d)| format!("{b}={d}\n")).collect();
    std::fs::write(p, text).map_err(|e| VzError::io(p, e))
}

impl VzTools for StandIn {
    fn run(&mut self, cmd: &VzCommand) -> Result<String> {
        let failure = self.next(cmd);
        if failure == Some(Failure::Before) {
            return Err(VzError::Tool {
                command: cmd.line(),
                message: "stand-in: injected failure".into(),
            });
        }
        match cmd {
            VzCommand::Stop { ctid } => {
                let p = self.layout.init_pid_file(ctid);
                std::fs::remove_file(&p).map_err(|e| VzError::Tool {
                    command: cmd.line(),
                    message: format!("stand-in: container {ctid} is not running ({e})"),
                })?;
                Ok(String::new())
            }
            VzCommand::Start { ctid } => {
                let p = self.layout.init_pid_file(ctid);
                if p.exists() {
                    return Err(VzError::Tool {
                        command: cmd.line(),
                        message: format!("stand-in: container {ctid} is running already"),
                    });
                }
                let pid = {
                    let mut s = self.state();
                    s.next_pid += 1;
                    s.next_pid
                };
                if let Some(d) = p.parent() {
                    std::fs::create_dir_all(d).map_err(|e| VzError::io(d, e))?;
                }
                std::fs::write(&p, format!("{pid}\n")).map_err(|e| VzError::io(&p, e))?;
                Ok(String::new())
            }
            VzCommand::Umount { .. } | VzCommand::Restore { .. } => Ok(String::new()),
            VzCommand::Snapshot {
                descriptor, guid, ..
            } => self
                .snapshot(Path::new(descriptor), guid)
                .map(|()| String::new()),
            VzCommand::SnapshotDelete { descriptor, guid } => self
                .snapshot_delete(
                    Path::new(descriptor),
                    guid,
                    failure == Some(Failure::MidMerge),
                )
                .map(|()| String::new()),
            VzCommand::Device { descriptor } => {
                match self.state().devices.get(Path::new(descriptor)) {
                    Some(dev) => Ok(format!("device:\t/dev/{dev}\n")),
                    None => Err(VzError::Tool {
                        command: cmd.line(),
                        message: "stand-in: the disk is not mounted".into(),
                    }),
                }
            }
            VzCommand::VeValue { ctid, var } => {
                self.read_host(&format!("/sys/fs/cgroup/ve/{ctid}/{var}"))
            }
            VzCommand::CorePattern { .. } => self.read_host("/proc/sys/kernel/core_pattern"),
        }
    }

    fn spawn_restore(&mut self, cmd: &VzCommand, criu_config: &str, _log: &Path) -> Result<i32> {
        if self.next(cmd) == Some(Failure::Before) {
            return Err(VzError::Tool {
                command: cmd.line(),
                message: "stand-in: injected failure".into(),
            });
        }
        if let Some(l) = self.state().log.last_mut() {
            l.insert_str(0, &format!("CRIU_CONFIG_FILE={criu_config} "));
        }
        if let VzCommand::Restore { ctid, .. } = cmd {
            self.state().restoring = Some(ctid.clone());
        }
        // No process: the engine has nothing to watch.
        Ok(0)
    }

    fn wait_restore(&mut self) -> Result<()> {
        let Some(ctid) = self.state().restoring.take() else {
            return Ok(());
        };
        // What vz-rst leaves: the restored init's pid.
        let p = self.layout.init_pid_file(&ctid);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| VzError::io(d, e))?;
        }
        std::fs::write(&p, "4242\n").map_err(|e| VzError::io(&p, e))
    }
}
