//! The one interface through which the driver reaches Virtuozzo's tools
//! ([`VzTools`]), the commands it runs ([`VzCommand`], each with its exact
//! command line), and the real implementation ([`RealTools`]) that runs
//! them. The tests use [`crate::standin::StandIn`] instead.
//!
//! The command lines are those of P.Haul's vz driver (`phaul/p_haul_vz.py`,
//! `phaul/fs_haul_ploop.py`, whose libploop calls are given here as the
//! `ploop` commands doing the same) and of Virtuozzo's `vzctl(8)` and
//! `ploop(8)`; `cgget`/`cgexec` are libcgroup's, as P.Haul and libvzctl's
//! `vz-cpt` script use them. `prlctl` is not needed: every operation the
//! driver makes has a vzctl or ploop command. **None of this has been run on
//! a Virtuozzo host by phaul's tests**: they run against the stand-in.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use phaul_plugin_api::abi_stable::std_types::{RString, RVec};
use phaul_plugin_api::HostBox;

use crate::error::{Result, VzError};

/// One Virtuozzo command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VzCommand {
    /// `vzctl --skipowner --skiplock stop CTID`: stop the container (it
    /// unmounts its disks). `--skiplock` because vzmigrate, which runs
    /// phaul, holds the container's lock; `--skipowner` because on shared
    /// storage the private area belongs to the other node during the move.
    Stop {
        /// The container.
        ctid: String,
    },
    /// `vzctl --skipowner --skiplock start CTID`: start the container.
    Start {
        /// The container.
        ctid: String,
    },
    /// `vzctl --skipowner --skiplock umount CTID`: unmount its disks.
    Umount {
        /// The container.
        ctid: String,
    },
    /// `vzctl --skipowner --skiplock restore CTID --skip_arpdetect
    /// --dumpfile DIR`: restore it from CRIU images in DIR. vzctl reads
    /// `DIR/restore-extra-args` (`VE_WORK_DIR`, `VE_RESTORE_LOG_PATH`) and
    /// the `vz_*.img` files in DIR, and runs CRIU through its `vz-rst`
    /// script. Started by [`VzTools::spawn_restore`], not [`VzTools::run`].
    Restore {
        /// The container.
        ctid: String,
        /// The image directory.
        dump_dir: String,
    },
    /// `ploop snapshot [-o] -u GUID DD.xml`: make GUID the name of the
    /// current top delta (now read-only) and add a new, empty top delta.
    /// `-o` (offline, `ploop_create_snapshot_offline`): change only the
    /// descriptor and files, never the running ploop device — P.Haul's
    /// `create_offline()` for the original descriptor.
    Snapshot {
        /// The disk's descriptor.
        descriptor: String,
        /// The new snapshot's GUID, `{...}`.
        guid: String,
        /// `-o`.
        offline: bool,
    },
    /// `ploop snapshot-delete -u GUID DD.xml`: delete snapshot GUID; with
    /// one child (here: the top delta) it is merged with it, so the disk
    /// has one delta fewer and the same content. P.Haul's
    /// `merge_ploop_snapshot()` (libploop `snapshot(dd).delete(guid)`).
    SnapshotDelete {
        /// The disk's descriptor.
        descriptor: String,
        /// The snapshot to merge away.
        guid: String,
    },
    /// `ploop info -d DD.xml`: prints `device: /dev/ploopN` for a mounted
    /// disk.
    Device {
        /// The disk's descriptor.
        descriptor: String,
    },
    /// `cgget -n -v -r VAR CTID`: a value of the container's `ve` cgroup
    /// (`ve.clock_monotonic`, `ve.features`, ...), as P.Haul stored them in
    /// `vz_*.img` files for vzctl's restore.
    VeValue {
        /// The container.
        ctid: String,
        /// The `ve.*` variable.
        var: String,
    },
    /// `cgexec -g ve:CTID cat /proc/sys/kernel/core_pattern`: the
    /// container's core pattern, read inside its `ve` cgroup.
    CorePattern {
        /// The container.
        ctid: String,
    },
}

impl VzCommand {
    /// The exact command line.
    pub fn argv(&self) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            VzCommand::Stop { ctid } => v(&["vzctl", "--skipowner", "--skiplock", "stop", ctid]),
            VzCommand::Start { ctid } => v(&["vzctl", "--skipowner", "--skiplock", "start", ctid]),
            VzCommand::Umount { ctid } => {
                v(&["vzctl", "--skipowner", "--skiplock", "umount", ctid])
            }
            VzCommand::Restore { ctid, dump_dir } => v(&[
                "vzctl",
                "--skipowner",
                "--skiplock",
                "restore",
                ctid,
                "--skip_arpdetect",
                "--dumpfile",
                dump_dir,
            ]),
            VzCommand::Snapshot {
                descriptor,
                guid,
                offline,
            } => {
                let mut a = v(&["ploop", "snapshot"]);
                if *offline {
                    a.push("-o".into());
                }
                a.extend(v(&["-u", guid, descriptor]));
                a
            }
            VzCommand::SnapshotDelete { descriptor, guid } => {
                v(&["ploop", "snapshot-delete", "-u", guid, descriptor])
            }
            VzCommand::Device { descriptor } => v(&["ploop", "info", "-d", descriptor]),
            VzCommand::VeValue { ctid, var } => v(&["cgget", "-n", "-v", "-r", var, ctid]),
            VzCommand::CorePattern { ctid } => v(&[
                "cgexec",
                "-g",
                &format!("ve:{ctid}"),
                "cat",
                "/proc/sys/kernel/core_pattern",
            ]),
        }
    }

    /// The command line as one string, for messages and the stand-in's
    /// record.
    pub fn line(&self) -> String {
        self.argv().join(" ")
    }
}

/// Every call the driver makes to vzctl, ploop and libcgroup's tools.
pub trait VzTools: Send {
    /// Runs `cmd` and waits for it; its standard output. A non-zero exit is
    /// an error quoting the command line and its standard error.
    fn run(&mut self, cmd: &VzCommand) -> Result<String>;

    /// Starts `vzctl restore` ([`VzCommand::Restore`]) without waiting,
    /// with `CRIU_CONFIG_FILE=criu_config` in its environment, its output
    /// going to `log`. Returns the process's pid (0 when there is none),
    /// which the engine watches: its end before CRIU's post-restore is a
    /// failed restore.
    fn spawn_restore(&mut self, cmd: &VzCommand, criu_config: &str, log: &Path) -> Result<i32>;

    /// Waits for the restore [`VzTools::spawn_restore`] started.
    fn wait_restore(&mut self) -> Result<()>;
}

/// Whether `vzctl` is on `PATH` (for the note in `phaul htypes`).
pub fn vzctl_installed() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| is_executable(&d.join("vzctl"))))
        .unwrap_or(false)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The real tools: each command through the engine's
/// [`Host::run_command`](phaul_plugin_api::Host::run_command) (which logs
/// the command line and its status), `vzctl restore` as a child process of
/// the driver.
///
/// How `vzctl restore` gets phaul's action script (through which the engine
/// holds the restored copy until the commit): vzctl has no option for it,
/// so it is handed as `CRIU_CONFIG_FILE` (a CRIU configuration file with
/// `action-script PATH`, which CRIU reads in every mode and adds to the
/// script vzctl gives it). But libvzctl's `restore()` (`lib/cr_criu.c`)
/// starts its `vz-rst` script with an environment it builds itself
/// (`VE_DUMP_DIR`, `VE_WORK_DIR`, ..., `HOME=/`), so with the libvzctl
/// read for this driver the variable would not reach CRIU: the engine
/// would then wait in vain for `post-restore` and roll back (the source
/// resumes). On a real host this is the first thing to check; the
/// alternatives are `RESTORE_EXTRA_OPT="--action-script PATH"` in
/// `/etc/vz/vz.conf` (which `vz-rst` reads, but for every restore on the
/// host) or a libvzctl that passes `CRIU_CONFIG_FILE` on.
pub struct RealTools {
    host: HostBox,
    restore: Option<(Child, String)>,
}

impl RealTools {
    /// Runs commands through `host`.
    pub fn new(host: HostBox) -> RealTools {
        RealTools {
            host,
            restore: None,
        }
    }
}

impl VzTools for RealTools {
    fn run(&mut self, cmd: &VzCommand) -> Result<String> {
        let argv: RVec<RString> = cmd.argv().into_iter().map(RString::from).collect();
        let out = self
            .host
            .run_command(argv)
            .into_result()
            .map_err(|e| VzError::Tool {
                command: cmd.line(),
                message: e.to_string(),
            })?;
        if out.status != 0 {
            return Err(VzError::Tool {
                command: cmd.line(),
                message: format!("exit status {}: {}", out.status, out.stderr.trim()),
            });
        }
        Ok(out.stdout.to_string())
    }

    fn spawn_restore(&mut self, cmd: &VzCommand, criu_config: &str, log: &Path) -> Result<i32> {
        let argv = cmd.argv();
        let out = std::fs::File::create(log).map_err(|e| VzError::io(log, e))?;
        let err = out.try_clone().map_err(|e| VzError::io(log, e))?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("CRIU_CONFIG_FILE", criu_config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| VzError::Tool {
                command: cmd.line(),
                message: format!("cannot start it: {e}"),
            })?;
        let pid = child.id() as i32;
        self.restore = Some((child, cmd.line()));
        Ok(pid)
    }

    fn wait_restore(&mut self) -> Result<()> {
        let Some((mut child, line)) = self.restore.take() else {
            return Ok(());
        };
        let status = child.wait().map_err(|e| VzError::Tool {
            command: line.clone(),
            message: e.to_string(),
        })?;
        if !status.success() {
            return Err(VzError::Tool {
                command: line,
                message: format!(
                    "{status} (its output is in the driver's work directory, vzctl-restore.log)"
                ),
            });
        }
        Ok(())
    }
}

/// Parses `ploop info -d` output: the device path.
pub fn parse_device(stdout: &str) -> Option<PathBuf> {
    stdout.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "device").then(|| PathBuf::from(v.trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_the_documented_ones() {
        let s = |c: VzCommand| c.line();
        assert_eq!(
            s(VzCommand::Restore {
                ctid: "101".into(),
                dump_dir: "/w/img".into()
            }),
            "vzctl --skipowner --skiplock restore 101 --skip_arpdetect --dumpfile /w/img"
        );
        assert_eq!(
            s(VzCommand::Snapshot {
                descriptor: "/d/DiskDescriptor.xml".into(),
                guid: "{g}".into(),
                offline: true
            }),
            "ploop snapshot -o -u {g} /d/DiskDescriptor.xml"
        );
        assert_eq!(
            s(VzCommand::SnapshotDelete {
                descriptor: "/d/DiskDescriptor.xml".into(),
                guid: "{g}".into()
            }),
            "ploop snapshot-delete -u {g} /d/DiskDescriptor.xml"
        );
        assert_eq!(
            s(VzCommand::VeValue {
                ctid: "101".into(),
                var: "ve.features".into()
            }),
            "cgget -n -v -r ve.features 101"
        );
        assert_eq!(
            parse_device("size: 1\ndevice:\t/dev/ploop12345\n"),
            Some(PathBuf::from("/dev/ploop12345"))
        );
    }
}
