//! The library API embedded in one process tree: a `Client` and a `Server`
//! talking over a socketpair (the embedder's own transport), with the
//! embedder's final dump-copy-restore step. And the destination service's
//! embedded mode (`phaul serve --fd-rpc N --fd-mem N`) driven by the
//! engine over connections the test made.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phaul_core::api::{ApiError, Client, Config, Local, Remote, Server, Worker};
use phaul_core::criu::rpc::{PageServerInfo, ReqType};
use phaul_core::criu::Event;
use phaul_core::engine::abort::Abort;
use phaul_core::engine::iter::StopRules;
use phaul_core::engine::report::NoProgress;
use phaul_core::engine::source::{migrate, SourceOptions};
use phaul_core::engine::{Connector, PreDump};
use phaul_core::plugins::Registry;
use phaul_tests::harness::{alive, reap, setup, shm_dir, wait_for, Workload};
use phaul_tests::{bin, plugin_dir};

/// The server, shared between the client's remote side and its final step.
#[derive(Clone)]
struct Shared(Arc<Mutex<Server>>);

impl Remote for Shared {
    fn start_iter(&mut self, iter: u32, parent: Option<u32>) -> Result<(), String> {
        Remote::start_iter(&mut *self.0.lock().unwrap(), iter, parent)
    }
    fn stop_iter(&mut self, iter: u32) -> Result<(), String> {
        Remote::stop_iter(&mut *self.0.lock().unwrap(), iter)
    }
}

/// The embedder's final step: dump with pages to the server, copy the
/// other images into the server's directory, restore from there.
struct DumpCopyRestore {
    server: Shared,
    server_cfg: Config,
}

impl Local for DumpCopyRestore {
    fn dump_copy_restore(
        &mut self,
        criu: &mut Worker,
        cfg: &Config,
        _last: Option<&Path>,
    ) -> Result<(), ApiError> {
        self.server.0.lock().unwrap().start_iter()?;
        let dir = cfg.work_dir.join("final");
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::Failed(e.to_string()))?;
        let mut o = criu.opts(&dir, "dump.log");
        o.pid = Some(cfg.pid);
        o.ps = Some(PageServerInfo {
            fd: Some(cfg.mem_fd),
            ..Default::default()
        });
        criu.start(ReqType::Dump, o)?;
        loop {
            match criu.next_event(ReqType::Dump)? {
                Event::Notify { .. } => criu.answer_notify(true)?,
                Event::Done(resp) => {
                    criu.check_done(ReqType::Dump, &resp, "dump.log")?;
                    break;
                }
            }
        }
        self.server.0.lock().unwrap().stop_iter()?;
        let target = self.server.0.lock().unwrap().last_images_dir();
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            std::fs::copy(e.path(), target.join(e.file_name()))
                .map_err(|e| ApiError::Failed(e.to_string()))?;
        }
        let criu_dir = self.server_cfg.work_dir.join("restore-criu");
        std::fs::create_dir_all(&criu_dir).unwrap();
        let mut r = Worker::spawn(&self.server_cfg.criu, "restore", &criu_dir, &[])?;
        let ro = r.opts(&target, "restore.log");
        r.start(ReqType::Restore, ro)?;
        loop {
            match r.next_event(ReqType::Restore)? {
                Event::Notify { .. } => r.answer_notify(true)?,
                Event::Done(resp) => {
                    r.check_done(ReqType::Restore, &resp, "restore.log")?;
                    break;
                }
            }
        }
        Ok(())
    }
}

#[test]
fn library_api_migrates_over_a_socketpair_in_one_process_tree() {
    if !setup() {
        return;
    }
    let mut w = Workload::spawn(&["--mem-mib", "32", "--dirty-pct", "5"]);
    let before = w.report();
    let (a, b) = UnixStream::pair().unwrap();
    let src_dir = shm_dir("api-src");
    let dst_dir = shm_dir("api-dst");
    let client_cfg = Config::new(w.pid, a.as_raw_fd(), src_dir.path().to_path_buf());
    let server_cfg = Config::new(0, b.as_raw_fd(), dst_dir.path().to_path_buf());
    let server = Shared(Arc::new(Mutex::new(Server::new(&server_cfg).unwrap())));
    let local = DumpCopyRestore {
        server: server.clone(),
        server_cfg: server_cfg.clone(),
    };
    let mut client = Client::new(local, server, client_cfg);
    let report = client.migrate().expect("migrate");
    // This kernel has no soft-dirty tracking: the loop says so and the
    // final step moves everything.
    assert!(report.stop_reason.to_string().contains("pre-dumps") || !report.passes.is_empty());
    let old = w.pid;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    drop(client);
    let new = {
        // The restored copy: the same workload (state directory), another pid.
        let mut found = None;
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if pid != old
                && alive(pid)
                && cmd.contains(&*w.state.to_string_lossy())
                && cmd.contains(" run ")
            {
                found = Some(pid);
            }
        }
        found.expect("the restored workload runs")
    };
    w.moved_to(new);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
}

#[test]
fn serve_in_embedded_mode_takes_connections_from_its_caller() {
    if !setup() {
        return;
    }
    let mut w = Workload::spawn(&["--mem-mib", "16"]);
    let before = w.report();
    let (ctl_src, ctl_dst) = UnixStream::pair().unwrap();
    let (mem_src, mem_dst) = UnixStream::pair().unwrap();
    let plugins = plugin_dir(&[("phaul_pid", "libphaul_pid.so")]);
    let dst_work = shm_dir("fd-dst");
    // Hand the destination ends to `phaul serve` as fds 3 and 4.
    let (c, m) = (ctl_dst.as_raw_fd(), mem_dst.as_raw_fd());
    let mut cmd = Command::new(bin("phaul"));
    cmd.arg("--plugin-dir")
        .arg(plugins.path())
        .args(["serve", "--fd-rpc", "3", "--fd-mem", "4", "--work-dir"])
        .arg(dst_work.path());
    // SAFETY: dup2 and fcntl only, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::dup2(c, 3) < 0 || libc::dup2(m, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut serve = cmd.spawn().unwrap();
    drop(ctl_dst);
    drop(mem_dst);

    let registry = Registry::load(&[plugins.path().to_path_buf()]);
    let src_work = shm_dir("fd-src");
    let opts = SourceOptions {
        htype: "pid".into(),
        id: w.pid.to_string(),
        options: vec![],
        pre_dump: PreDump::Auto,
        rules: StopRules::default(),
        tcp_established: false,
        force: false,
        keep_images: false,
        work_root: src_work.path().to_path_buf(),
        criu: phaul_core::criu::locate(),
        resolve_timeout: Duration::from_secs(5),
        restore_estimate: Duration::from_millis(150),
        mode: phaul_core::proto::MigrationMode::Live,
        no_start: false,
        fs_rules: Default::default(),
        journal_dir: src_work.path().join("journal"),
        log_dir: src_work.path().join("logs"),
        hook_deadlines: vec![],
        freeze_timeout: None,
        post_copy: Default::default(),
        post_copy_stall: Duration::from_secs(15),
    };
    let connector = Connector::Given {
        control: ctl_src.into(),
        mem: mem_src.into(),
        fs: None,
    };
    let report = migrate(
        &registry,
        &opts,
        &connector,
        Arc::new(NoProgress),
        &Abort::new(),
    )
    .expect("migrate");
    assert!(
        serve.wait().unwrap().success(),
        "phaul serve --fd-rpc exits 0 after the migration"
    );
    let old = w.pid;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    w.moved_to(report.destination_pid);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
}
