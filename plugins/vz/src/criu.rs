//! The CRIU options a Virtuozzo container needs, after P.Haul's vz driver
//! (`adjust_criu_req`) and libvzctl's `vz-cpt`/`vz-rst` scripts.
//!
//! Options the plugin ABI names go into their fields; the others go into
//! [`CriuOpts::extra`] under CRIU's option names. The engine does not read
//! `extra` yet (a `cgroup-root` key, value `[CONTROLLER:]PATH`, is being
//! added): until it does, `cgroup-root`, `cgroup-dump-controller`,
//! `timeout` and `ghost-limit` are produced here but do not reach CRIU.

use phaul_plugin_api::abi_stable::std_types::{ROption, RString};
use phaul_plugin_api::{CgroupMode, CriuOpts, KeyValue};

use crate::config::{CtConfig, Layout};

/// The cgroup controllers CRIU dumps for a container (P.Haul's
/// `cgroup_controllers`, the same set as `vz-cpt`'s).
pub const DUMP_CONTROLLERS: &[&str] = &[
    "cpuacct,cpu",
    "cpuset",
    "net_cls",
    "net_prio,net_cls",
    "memory",
    "devices",
    "blkio",
    "freezer",
    "perf_event",
    "hugetlb",
    "name=systemd",
    "pids",
    "beancounter",
    "ve",
];

/// CRIU's timeout for a container (P.Haul's, seconds).
pub const CRIU_TIMEOUT: u32 = 180;

/// The ghost-file limit P.Haul used for containers (50 MiB).
pub const GHOST_LIMIT: u64 = 50 << 20;

/// A secondary disk's device for CRIU: `dev[MAJOR/MINOR]:UUID`, with the
/// numbers of its filesystem's partition (as `vz-cpt` names them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDevice {
    /// The disk's uuid.
    pub uuid: String,
    /// The partition's major number.
    pub major: u32,
    /// The partition's minor number.
    pub minor: u32,
}

/// The cgroup roots `vz-cpt` and `vz-rst` give CRIU: the container's
/// `machine.slice` cgroup for every controller, and its own in `ve`,
/// `beancounter` and `name=systemd`.
pub fn cgroup_roots(ctid: &str) -> Vec<String> {
    vec![
        format!("/machine.slice/{ctid}"),
        format!("ve:/{ctid}"),
        format!("beancounter:/{ctid}"),
        format!("name=systemd:/{ctid}"),
    ]
}

/// The freezer cgroup CRIU freezes the container with (P.Haul's).
pub fn freezer_cgroup(layout: &Layout, ctid: &str) -> String {
    layout
        .host(&format!("/sys/fs/cgroup/freezer/machine.slice/{ctid}/"))
        .display()
        .to_string()
}

/// Options for a pre-dump or the dump.
pub fn adjust_dump(opts: &mut CriuOpts, ct: &CtConfig, layout: &Layout, devices: &[DiskDevice]) {
    opts.root = ROption::RSome(RString::from(layout.host(&ct.root).display().to_string()));
    opts.cgroup_mode = CgroupMode::Soft;
    opts.freeze_cgroup = ROption::RSome(RString::from(freezer_cgroup(layout, &ct.ctid)));
    for d in devices {
        opts.external.push(RString::from(format!(
            "dev[{}/{}]:{}",
            d.major, d.minor, d.uuid
        )));
    }
    for r in cgroup_roots(&ct.ctid) {
        opts.extra.push(KeyValue::new("cgroup-root", r));
    }
    for c in DUMP_CONTROLLERS {
        opts.extra.push(KeyValue::new("cgroup-dump-controller", *c));
    }
    opts.extra
        .push(KeyValue::new("timeout", CRIU_TIMEOUT.to_string()));
    opts.extra
        .push(KeyValue::new("ghost-limit", GHOST_LIMIT.to_string()));
}

/// Options for the restore. vzctl's `vz-rst` derives the same from the
/// container's configuration (it restores, not the engine); they are kept
/// so the engine's view of the restore matches it.
pub fn adjust_restore(opts: &mut CriuOpts, ct: &CtConfig, layout: &Layout) {
    opts.root = ROption::RSome(RString::from(layout.host(&ct.root).display().to_string()));
    opts.cgroup_mode = CgroupMode::Full;
    for n in &ct.netifs {
        opts.external.push(RString::from(n.criu_external()));
    }
    for r in cgroup_roots(&ct.ctid) {
        opts.extra.push(KeyValue::new("cgroup-root", r));
    }
}
