//! The driver's tests, against the **stand-in** ([`crate::standin`]) in a
//! temporary tree: a fake `/etc/vz` and `/var/run/ve`, real
//! `DiskDescriptor.xml` files and stand-in delta files. Nothing here runs
//! vzctl or ploop, or has been checked on a Virtuozzo host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use phaul_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use phaul_plugin_api::abi_stable::std_types::{RArc, RResult, RStr, RString, RVec};
use phaul_plugin_api::{
    CgroupMode, CommandOutput, CriuOpts, Driver, DriverError, FsSyncKind, Host, HostBox, Host_TO,
    InitContext, KeyValue, LogLevel, Mode, RestoreContext, Side,
};

use crate::config::Layout;
use crate::driver::{description, VzDriver};
use crate::meta;
use crate::ploop::{DiskDescriptor, DESCRIPTOR};
use crate::shared::{copy_path, lock_path};
use crate::standin::{Failure, StandIn};

#[derive(Clone)]
struct NoHost;

impl Host for NoHost {
    fn log(&self, _level: LogLevel, _message: RStr<'_>) {}
    fn run_command(&self, _argv: RVec<RString>) -> RResult<CommandOutput, DriverError> {
        RResult::RErr(DriverError::failed("the tests run no commands"))
    }
    fn criu_version(&self) -> RString {
        "4.2.1".into()
    }
    fn criu_binary(&self) -> RString {
        "criu".into()
    }
    fn criu_feature(&self, _name: RStr<'_>) -> RResult<bool, DriverError> {
        RResult::ROk(false)
    }
}

fn host() -> HostBox {
    Host_TO::from_ptr(RArc::new(NoHost), TD_Opaque)
}

const CT_CONF: &str = r#"# container 101
NETIF="ifname=eth0,mac=00:18:51:AA:00:01,host_ifname=veth101.0,host_mac=00:18:51:BB:00:01,bridge=br0;ifname=eth1,mac=00:18:51:AA:00:02,host_ifname=veth101.1,host_mac=00:18:51:BB:00:02,bridge=br1"
DISK="uuid={aaaa-root},enabled=yes,image=/vz/private/$VEID/root.hdd;uuid={bbbb-data},image=/vz/private/$VEID/disk2.hdd,mnt=/data"
"#;

const BASE: &[(u64, &str)] = &[(0, "boot"), (1, "etc"), (7, "home")];

/// A stand-in host tree with container 101 running and two disks.
struct Tree {
    dir: tempfile::TempDir,
    standin: StandIn,
}

impl Tree {
    fn new() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let t = Tree {
            standin: StandIn::new(Layout::new(dir.path())),
            dir,
        };
        t.write(
            "etc/vz/vz.conf",
            "VE_ROOT=/vz/root/$VEID\nVE_PRIVATE=\"/vz/private/$VEID\"\n",
        );
        t.write("etc/vz/conf/101.conf", CT_CONF);
        t.write("var/run/ve/101.init.pid", "4001\n");
        t.write("sys/block/ploop11111/ploop11111p1/dev", "182:177777\n");
        t.write("sys/fs/cgroup/ve/101/ve.clock_monotonic", "123 456");
        t.write("sys/fs/cgroup/ve/101/ve.features", "0x1");
        t.write("proc/sys/kernel/core_pattern", "core");
        std::fs::create_dir_all(t.path("vz/root/101")).unwrap();
        for d in ["root.hdd", "disk2.hdd"] {
            StandIn::create_disk(&t.path(&format!("vz/private/101/{d}")), BASE).unwrap();
        }
        t.standin.set_device(&t.disk("disk2.hdd"), "ploop11111");
        t
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn write(&self, p: &str, text: &str) {
        let p = self.path(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn disk(&self, name: &str) -> PathBuf {
        self.path(&format!("vz/private/101/{name}/{DESCRIPTOR}"))
    }

    fn disks(&self) -> Vec<PathBuf> {
        vec![self.disk("root.hdd"), self.disk("disk2.hdd")]
    }

    fn driver(&self, side: Side, mode: Mode, extra: &[(&str, &str)]) -> VzDriver {
        let mut d = VzDriver::with_tools(Box::new(self.standin.clone()));
        let work = self.path(&format!("work-{side:?}"));
        std::fs::create_dir_all(&work).unwrap();
        let mut options = vec![KeyValue::new(
            "vz-root",
            self.dir.path().display().to_string(),
        )];
        options.extend(extra.iter().map(|(k, v)| KeyValue::new(*k, *v)));
        d.init(InitContext {
            side,
            mode,
            id: "101".into(),
            options: options.into_iter().collect(),
            work_dir: work.display().to_string().into(),
            host: host(),
            source_facts: Default::default(),
        })
        .unwrap();
        d
    }

    fn shared(&self, side: Side) -> VzDriver {
        self.driver(side, Mode::Live, &[("shared-disks", "")])
    }
}

fn expected(extra: &[(u64, &str)]) -> BTreeMap<u64, String> {
    let mut m: BTreeMap<u64, String> = BASE.iter().map(|(b, d)| (*b, d.to_string())).collect();
    m.extend(extra.iter().map(|(b, d)| (*b, d.to_string())));
    m
}

/// The disk is back to one image, reads `content`, and its directory holds
/// nothing but the descriptor, its lock and the one delta.
fn assert_single(dd: &Path, content: &BTreeMap<u64, String>) {
    let d = DiskDescriptor::load(dd).unwrap();
    assert_eq!(d.chain().len(), 1, "{}: one image", dd.display());
    assert_eq!(
        &StandIn::read_disk(dd).unwrap(),
        content,
        "{}",
        dd.display()
    );
    let mut files: Vec<String> = std::fs::read_dir(dd.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut want = vec!["DiskDescriptor.xml".to_string(), "root.hds".to_string()];
    if lock_path(dd).exists() {
        want.insert(1, "DiskDescriptor.xml.lck".to_string());
    }
    assert_eq!(files, want, "{}: nothing left behind", dd.display());
}

/// The disk is consistent (ploop's checks pass) and reads `content`,
/// whatever number of images it has.
fn assert_reads(dd: &Path, content: &BTreeMap<u64, String>) {
    DiskDescriptor::load(dd).unwrap();
    assert_eq!(
        &StandIn::read_disk(dd).unwrap(),
        content,
        "{}",
        dd.display()
    );
}

#[test]
fn shared_disks_snapshot_commit_and_merge_on_the_destination() {
    let t = Tree::new();
    let mut src = t.shared(Side::Source);
    assert_eq!(src.fs_sync().unwrap().kind, FsSyncKind::SharedStorage);
    src.storage_snapshot().unwrap();
    for dd in t.disks() {
        let orig = DiskDescriptor::load(&dd).unwrap();
        let copy = DiskDescriptor::load(&copy_path(&dd)).unwrap();
        assert_eq!(orig.chain().len(), 2);
        assert_eq!(copy.chain().len(), 2);
        assert_eq!(orig.chain()[0].file, "root.hds", "the base is shared");
        assert_eq!(copy.chain()[0].file, "root.hds");
        assert_ne!(
            orig.active_delta(),
            copy.active_delta(),
            "each side its own top"
        );
        // The source's device still flushes into the copy's top delta.
        StandIn::write_block(&copy_path(&dd), 1, "src-late").unwrap();
    }
    let meta_dir = t.path("meta");
    std::fs::create_dir_all(&meta_dir).unwrap();
    let names = src.meta_files_out(meta_dir.to_str().unwrap()).unwrap();
    assert!(names.contains(&meta::SHARED.to_string()), "{names:?}");
    assert!(names.contains(&meta::CONF.to_string()));

    let mut dst = t.shared(Side::Destination);
    dst.meta_files_in(meta_dir.to_str().unwrap(), &names)
        .unwrap();
    for dd in t.disks() {
        StandIn::write_block(&dd, 9, "dst-new").unwrap();
    }
    src.umount().unwrap();
    src.storage_commit().unwrap();
    dst.migration_complete().unwrap();
    for dd in t.disks() {
        assert!(!copy_path(&dd).exists());
        assert!(!lock_path(&copy_path(&dd)).exists());
        // The destination's writes are kept, the source's late ones dropped.
        assert_single(&dd, &expected(&[(9, "dst-new")]));
    }
    let cmds = t.standin.commands();
    let ploop: Vec<&String> = cmds
        .iter()
        .filter(|c| c.starts_with("ploop snapshot"))
        .collect();
    assert_eq!(ploop.len(), 6, "{cmds:#?}");
    assert!(
        ploop[0].starts_with("ploop snapshot -o -u {"),
        "{}",
        ploop[0]
    );
    assert!(ploop[0].ends_with("root.hdd/DiskDescriptor.xml"));
    assert!(ploop[1].starts_with("ploop snapshot -u {") && ploop[1].ends_with(".xml.copy"));
    assert!(ploop[4].starts_with("ploop snapshot-delete -u {"));
    assert!(cmds.contains(&"vzctl --skipowner --skiplock umount 101".to_string()));
}

#[test]
fn shared_disks_rollback_puts_the_copy_back_and_merges_it() {
    let t = Tree::new();
    let mut src = t.shared(Side::Source);
    src.storage_snapshot().unwrap();
    for dd in t.disks() {
        StandIn::write_block(&copy_path(&dd), 1, "src-late").unwrap();
        // What the destination wrote before it was discarded.
        StandIn::write_block(&dd, 9, "dst-discarded").unwrap();
    }
    src.storage_rollback().unwrap();
    for dd in t.disks() {
        assert!(!copy_path(&dd).exists());
        assert_single(&dd, &expected(&[(1, "src-late")]));
    }
    // Once is enough: a second rollback changes nothing.
    src.storage_rollback().unwrap();
}

#[test]
fn a_failure_at_every_step_of_the_snapshot_leaves_the_source_disks_as_they_were() {
    let calls = {
        let t = Tree::new();
        let mut src = t.shared(Side::Source);
        let before = t.standin.calls();
        src.storage_snapshot().unwrap();
        t.standin.calls() - before
    };
    assert_eq!(calls, 4, "two snapshots per disk");
    for n in 0..calls {
        let t = Tree::new();
        let mut src = t.shared(Side::Source);
        t.standin.fail_call(t.standin.calls() + n, Failure::Before);
        let err = src.storage_snapshot().unwrap_err();
        assert!(
            err.message.contains("injected"),
            "step {n}: {}",
            err.message
        );
        for dd in t.disks() {
            assert!(!copy_path(&dd).exists(), "step {n}: the copy is gone");
            assert_single(&dd, &expected(&[]));
        }
        // The engine does not roll back a failed snapshot; nothing to do.
        src.storage_rollback().unwrap();
        for dd in t.disks() {
            assert_single(&dd, &expected(&[]));
        }
    }
}

#[test]
fn a_failed_undo_of_the_snapshot_leaves_the_disk_reading_the_same_and_says_so() {
    let t = Tree::new();
    let mut src = t.shared(Side::Source);
    let at = t.standin.calls();
    // The copy's snapshot fails, then merging the original's back fails too.
    t.standin.fail_call(at + 1, Failure::Before);
    t.standin.fail_call(at + 2, Failure::MidMerge);
    let err = src.storage_snapshot().unwrap_err();
    assert!(
        err.message.contains("is not merged back"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("ploop snapshot-delete -u"),
        "{}",
        err.message
    );
    let dd = t.disk("root.hdd");
    assert!(!copy_path(&dd).exists());
    assert_reads(&dd, &expected(&[]));
    assert_eq!(DiskDescriptor::load(&dd).unwrap().chain().len(), 2);
    assert_single(&t.disk("disk2.hdd"), &expected(&[]));
}

#[test]
fn a_leftover_copy_is_never_overwritten() {
    let t = Tree::new();
    let mut src = t.shared(Side::Source);
    let dd = t.disk("root.hdd");
    std::fs::copy(&dd, copy_path(&dd)).unwrap();
    let err = src.storage_snapshot().unwrap_err();
    assert!(err.message.contains("exists already"), "{}", err.message);
    assert_single(&t.disk("disk2.hdd"), &expected(&[]));
    assert_reads(&dd, &expected(&[]));
}

#[test]
fn a_failure_at_every_step_of_the_rollback_leaves_a_consistent_disk_that_a_retry_finishes() {
    for how in [Failure::Before, Failure::MidMerge] {
        for n in 0..2 {
            let t = Tree::new();
            let mut src = t.shared(Side::Source);
            src.storage_snapshot().unwrap();
            for dd in t.disks() {
                StandIn::write_block(&copy_path(&dd), 1, "src-late").unwrap();
                StandIn::write_block(&copy_path(&dd), 8, "src-more").unwrap();
            }
            let want = expected(&[(1, "src-late"), (8, "src-more")]);
            t.standin.fail_call(t.standin.calls() + n, how);
            let err = src.storage_rollback().unwrap_err();
            assert!(
                err.message.contains("is not merged"),
                "{how:?} {n}: {}",
                err.message
            );
            for dd in t.disks() {
                // Back in place, reading what the source wrote, nothing lost.
                assert!(!copy_path(&dd).exists(), "{how:?} {n}");
                assert_reads(&dd, &want);
            }
            src.storage_rollback().unwrap();
            for dd in t.disks() {
                assert_single(&dd, &want);
            }
        }
    }
}

#[test]
fn a_failed_merge_on_the_destination_keeps_the_disk_reading_the_same() {
    for how in [Failure::Before, Failure::MidMerge] {
        let t = Tree::new();
        let mut src = t.shared(Side::Source);
        src.storage_snapshot().unwrap();
        let meta_dir = t.path("meta");
        std::fs::create_dir_all(&meta_dir).unwrap();
        let names = src.meta_files_out(meta_dir.to_str().unwrap()).unwrap();
        let mut dst = t.shared(Side::Destination);
        dst.meta_files_in(meta_dir.to_str().unwrap(), &names)
            .unwrap();
        for dd in t.disks() {
            StandIn::write_block(&dd, 0, "dst-boot").unwrap();
            StandIn::write_block(&dd, 3, "dst-var").unwrap();
        }
        src.umount().unwrap();
        src.storage_commit().unwrap();
        t.standin.fail_call(t.standin.calls(), how);
        let err = dst.migration_complete().unwrap_err();
        assert!(
            err.message.contains("the disks read correctly"),
            "{}",
            err.message
        );
        let want = expected(&[(0, "dst-boot"), (3, "dst-var")]);
        let first = t.disk("root.hdd");
        assert_reads(&first, &want);
        assert_eq!(DiskDescriptor::load(&first).unwrap().chain().len(), 2);
        assert_single(&t.disk("disk2.hdd"), &want);
    }
}

#[test]
fn the_destination_merges_only_this_containers_disks() {
    let t = Tree::new();
    let mut dst = t.shared(Side::Destination);
    let meta_dir = t.path("meta");
    std::fs::create_dir_all(&meta_dir).unwrap();
    std::fs::write(
        meta_dir.join(meta::SHARED),
        r#"{"version":1,"disks":[{"descriptor":"/etc/passwd","guid":"{x}"}]}"#,
    )
    .unwrap();
    let err = dst
        .meta_files_in(meta_dir.to_str().unwrap(), &[meta::SHARED.to_string()])
        .unwrap_err();
    assert!(
        err.message.contains("not a disk of container 101"),
        "{}",
        err.message
    );
}

#[test]
fn criu_options_for_a_sample_container() {
    let t = Tree::new();
    let mut src = t.driver(Side::Source, Mode::Live, &[]);
    let root = t.dir.path().display().to_string();
    let mut o = CriuOpts::default();
    src.adjust_dump_opts(&mut o).unwrap();
    assert_eq!(
        o.root.as_ref().into_option().map(|s| s.to_string()),
        Some(format!("{root}/vz/root/101"))
    );
    assert_eq!(o.cgroup_mode, CgroupMode::Soft);
    assert_eq!(
        o.freeze_cgroup
            .as_ref()
            .into_option()
            .map(|s| s.to_string()),
        Some(format!("{root}/sys/fs/cgroup/freezer/machine.slice/101/"))
    );
    let ext: Vec<String> = o.external.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        ext,
        vec!["dev[182/177777]:{bbbb-data}".to_string()],
        "secondary disk only"
    );
    let extra = |o: &CriuOpts, k: &str| -> Vec<String> {
        o.extra
            .iter()
            .filter(|kv| kv.key.as_str() == k)
            .map(|kv| kv.value.to_string())
            .collect()
    };
    assert_eq!(
        extra(&o, "cgroup-root"),
        vec![
            "/machine.slice/101",
            "ve:/101",
            "beancounter:/101",
            "name=systemd:/101"
        ]
    );
    let controllers = extra(&o, "cgroup-dump-controller");
    assert!(
        controllers.contains(&"ve".to_string()) && controllers.contains(&"beancounter".to_string())
    );
    assert_eq!(controllers.len(), crate::criu::DUMP_CONTROLLERS.len());
    assert_eq!(extra(&o, "timeout"), vec!["180"]);
    assert_eq!(extra(&o, "ghost-limit"), vec![(50u64 << 20).to_string()]);
    // A second call (the next pre-dump) asks ploop only once.
    let asked = t.standin.commands().len();
    src.adjust_dump_opts(&mut CriuOpts::default()).unwrap();
    assert_eq!(t.standin.commands().len(), asked);
    assert_eq!(
        t.standin.commands(),
        vec![format!(
            "ploop info -d {root}/vz/private/101/disk2.hdd/DiskDescriptor.xml"
        )]
    );

    let mut dst = t.driver(Side::Destination, Mode::Live, &[]);
    let mut r = CriuOpts::default();
    dst.adjust_restore_opts(&mut r).unwrap();
    assert_eq!(r.cgroup_mode, CgroupMode::Full);
    let ext: Vec<String> = r.external.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        ext,
        vec!["veth[eth0]:veth101.0@br0", "veth[eth1]:veth101.1@br1"]
    );
    assert_eq!(extra(&r, "cgroup-root").len(), 4);
}

#[test]
fn copied_disks_sync_the_private_area_with_persistent_inodes() {
    let t = Tree::new();
    t.write(
        "etc/vz/conf/101.conf",
        &format!("{CT_CONF}DISK=\"uuid={{a}},image=/vz/private/$VEID/root.hdd;uuid={{b}},image=/srv/disks/101-data.hdd,mnt=/data\"\n"),
    );
    let mut src = t.driver(Side::Source, Mode::Live, &[]);
    let spec = src.fs_sync().unwrap();
    assert_eq!(spec.kind, FsSyncKind::Paths);
    assert!(spec.inodes_persistent);
    let root = t.dir.path().display().to_string();
    let paths: Vec<String> = spec.paths.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        paths,
        vec![
            format!("{root}/vz/private/101"),
            format!("{root}/srv/disks/101-data.hdd")
        ]
    );
}

#[test]
fn restart_mode_stops_here_and_starts_there() {
    let t = Tree::new();
    let mut src = t.driver(Side::Source, Mode::Restart, &[]);
    assert_eq!(src.root_task_pid().unwrap(), 4001);
    src.net_lock().unwrap();
    src.stop().unwrap();
    assert!(!t.path("var/run/ve/101.init.pid").exists(), "stopped");
    let meta_dir = t.path("meta");
    std::fs::create_dir_all(&meta_dir).unwrap();
    let names = src.meta_files_out(meta_dir.to_str().unwrap()).unwrap();
    assert_eq!(
        names,
        vec![meta::CONF.to_string()],
        "no CRIU state in restart mode"
    );

    let mut dst = t.driver(Side::Destination, Mode::Restart, &[]);
    dst.mount().unwrap();
    dst.meta_files_in(meta_dir.to_str().unwrap(), &names)
        .unwrap();
    let pid = dst.start().unwrap();
    assert!(pid > 0);
    dst.migration_complete().unwrap();
    assert_eq!(
        t.standin.commands(),
        vec![
            "vzctl --skipowner --skiplock stop 101".to_string(),
            "vzctl --skipowner --skiplock start 101".to_string(),
        ]
    );
}

#[test]
fn restart_mode_rollback_starts_it_again_on_the_source() {
    let t = Tree::new();
    let mut src = t.driver(Side::Source, Mode::Restart, &[]);
    src.stop().unwrap();
    // The destination failed: the engine starts the container again here.
    let pid = src.start().unwrap();
    assert_eq!(src.root_task_pid().unwrap(), pid);
    // Starting a running container fails loudly.
    assert!(src.start().is_err());
    assert_eq!(
        t.standin.commands(),
        vec![
            "vzctl --skipowner --skiplock stop 101".to_string(),
            "vzctl --skipowner --skiplock start 101".to_string(),
            "vzctl --skipowner --skiplock start 101".to_string(),
        ]
    );
}

#[test]
fn live_restore_goes_through_vzctl_with_the_action_script_and_the_ve_images() {
    let t = Tree::new();
    let mut src = t.driver(Side::Source, Mode::Live, &[]);
    let meta_dir = t.path("meta");
    std::fs::create_dir_all(&meta_dir).unwrap();
    let names = src.meta_files_out(meta_dir.to_str().unwrap()).unwrap();
    // Two values exist in the stand-in tree and the core pattern; the rest
    // are left out with a warning, as P.Haul did.
    assert_eq!(
        names,
        vec![
            meta::CONF,
            "vz_clock_monotonic.img",
            "vz_features.img",
            meta::CORE_PATTERN
        ]
    );
    assert_eq!(
        std::fs::read_to_string(meta_dir.join("vz_clock_monotonic.img")).unwrap(),
        "123 456"
    );

    // The destination's pid file is gone until vzctl restore writes it.
    std::fs::remove_file(t.path("var/run/ve/101.init.pid")).unwrap();
    let mut dst = t.driver(Side::Destination, Mode::Live, &[]);
    dst.meta_files_in(meta_dir.to_str().unwrap(), &names)
        .unwrap();
    let images = t.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut opts = CriuOpts::default();
    dst.adjust_restore_opts(&mut opts).unwrap();
    let out = dst
        .restore(&RestoreContext {
            images_dir: images.display().to_string().into(),
            opts,
            action_script: "/w/hold/criu-action".into(),
            criu_config: "/w/hold/criu.conf".into(),
        })
        .unwrap();
    assert!(out.handled);
    let extra = std::fs::read_to_string(images.join("restore-extra-args")).unwrap();
    assert!(extra.contains("VE_WORK_DIR=") && extra.contains("VE_RESTORE_LOG_PATH=restore.log"));
    assert!(images.join("vz_features.img").exists());
    assert!(!images.join(meta::CONF).exists());
    assert_eq!(dst.restore_wait().unwrap(), 4242);
    let last = t.standin.commands().last().unwrap().clone();
    assert_eq!(
        last,
        format!(
            "CRIU_CONFIG_FILE=/w/hold/criu.conf vzctl --skipowner --skiplock restore 101 \
             --skip_arpdetect --dumpfile {}",
            images.display()
        )
    );
    // Rolled back after the restore: its disks are unmounted.
    dst.umount().unwrap();
    assert!(t.standin.commands().last().unwrap().ends_with("umount 101"));
}

#[test]
fn the_destination_refuses_a_configuration_of_another_container() {
    let t = Tree::new();
    let meta_dir = t.path("meta");
    std::fs::create_dir_all(&meta_dir).unwrap();
    std::fs::write(
        meta_dir.join(meta::CONF),
        format!("{CT_CONF}VE_ROOT=/elsewhere/101\n"),
    )
    .unwrap();
    let mut dst = t.driver(Side::Destination, Mode::Live, &[]);
    let err = dst
        .meta_files_in(meta_dir.to_str().unwrap(), &[meta::CONF.to_string()])
        .unwrap_err();
    assert!(err.message.contains("another container"), "{}", err.message);
    // A comment of difference is only a warning.
    std::fs::write(meta_dir.join(meta::CONF), format!("{CT_CONF}# edited\n")).unwrap();
    dst.meta_files_in(meta_dir.to_str().unwrap(), &[meta::CONF.to_string()])
        .unwrap();
}

#[test]
fn init_refuses_what_it_cannot_migrate() {
    let t = Tree::new();
    let init = |id: &str, opts: &[(&str, &str)], side: Side| {
        let mut d = VzDriver::with_tools(Box::new(t.standin.clone()));
        let mut options = vec![KeyValue::new("vz-root", t.dir.path().display().to_string())];
        options.extend(opts.iter().map(|(k, v)| KeyValue::new(*k, *v)));
        d.init(InitContext {
            side,
            mode: Mode::Live,
            id: id.into(),
            options: options.into_iter().collect(),
            work_dir: "/tmp".into(),
            host: host(),
            source_facts: Default::default(),
        })
    };
    assert!(init("101", &[], Side::Source).is_ok());
    let e = init("102", &[], Side::Source).unwrap_err();
    assert!(e.message.contains("no container 102"), "{}", e.message);
    let e = init("../101", &[], Side::Source).unwrap_err();
    assert!(e.message.contains("not a container id"), "{}", e.message);
    let e = init("101", &[("bogus", "")], Side::Source).unwrap_err();
    assert!(
        e.message.contains("unknown option `bogus`"),
        "{}",
        e.message
    );
    let e = init("101", &[("shared-disks", "maybe")], Side::Source).unwrap_err();
    assert!(e.message.contains("expected a boolean"), "{}", e.message);
    std::fs::remove_file(t.path("var/run/ve/101.init.pid")).unwrap();
    let e = init("101", &[], Side::Source).unwrap_err();
    assert!(e.message.contains("is not running"), "{}", e.message);
    assert!(
        init("101", &[], Side::Destination).is_ok(),
        "the destination needs no running container"
    );
    // PHAUL_SHARED_DISKS in the container's configuration.
    t.write(
        "etc/vz/conf/101.conf",
        &format!("{CT_CONF}PHAUL_SHARED_DISKS=yes\n"),
    );
    let mut d = VzDriver::with_tools(Box::new(t.standin.clone()));
    d.init(InitContext {
        side: Side::Destination,
        mode: Mode::Live,
        id: "101".into(),
        options: vec![KeyValue::new("vz-root", t.dir.path().display().to_string())]
            .into_iter()
            .collect(),
        work_dir: "/tmp".into(),
        host: host(),
        source_facts: Default::default(),
    })
    .unwrap();
    assert_eq!(d.fs_sync().unwrap().kind, FsSyncKind::SharedStorage);
}

#[test]
fn the_description_notes_a_missing_vzctl() {
    assert!(description(false).contains("vzctl is not installed"));
    assert!(!description(true).contains("not installed"));
    let info = VzDriver::default().info();
    assert_eq!(info.name.as_str(), "vz");
    assert_eq!(
        info.description.contains("not installed"),
        !crate::tools::vzctl_installed()
    );
}
