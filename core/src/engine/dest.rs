//! The destination side of a live migration: pre-flight checks, page
//! servers fed from the memory connection, receiving images, and the
//! restore held at `post-restore` until the source commits. See the
//! [module documentation](super) for the phases.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use phaul_plugin_api::{CriuOpts, RestoreContext, Side};

use crate::conn::Conn;
use crate::criu::rpc::ReqType;
use crate::criu::{stats, Event, Worker};
use crate::plugins::{Driver, EngineHost, Registry};
use crate::proto::{
    FrameError, FrameReader, FrameWriter, Hello, MigrationMode, Msg, Outcome, Refusal, Welcome,
};
use crate::workdir::{free_bytes, WorkDir};
use crate::{ABI_VERSION, PHAUL_VERSION};

use super::criu_opts_to_rpc;
use super::fs::DestSync;
use super::pages::PageServers;
use super::source::fs_roots;

/// How the destination service runs migrations.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// Root of the work directories.
    pub work_root: PathBuf,
    /// The CRIU binary.
    pub criu: PathBuf,
    /// Keep images after every migration (the source can ask too).
    pub keep_images: bool,
    /// How long to wait for the source's commit once restored.
    pub commit_timeout: Duration,
}

/// What the destination did, for its log.
#[derive(Debug, Clone)]
pub struct DestSummary {
    /// The session.
    pub session: u64,
    /// The restored root's pid.
    pub pid: i32,
    /// The restore's wall time.
    pub restore_time: Duration,
}

type Reader = FrameReader<Conn>;
type Writer = FrameWriter<Conn>;

/// A session's control channel.
pub struct Control {
    reader: Reader,
    writer: Writer,
}

impl Control {
    /// Wraps a connection whose preamble has been read.
    pub fn new(conn: Conn) -> std::io::Result<Self> {
        Ok(Self {
            reader: FrameReader::new(conn.try_clone()?),
            writer: FrameWriter::new(conn),
        })
    }

    /// Reads the next frame.
    pub fn read(&mut self) -> Result<Msg, FrameError> {
        self.reader.read()
    }

    /// Sends a frame.
    pub fn write(&mut self, m: &Msg) -> Result<(), FrameError> {
        self.writer.write(m)
    }

    fn conn(&self) -> &Conn {
        self.writer.get_ref()
    }
}

/// A refusal to send back in place of `Welcome`.
struct Refuse(Refusal, String);

fn version_mm(v: &str) -> (u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Whether two versions are compatible under the 0.x rule (same major,
/// and same minor while major is 0).
fn compatible(a: &str, b: &str) -> bool {
    let (am, an) = version_mm(a);
    let (bm, bn) = version_mm(b);
    am == bm && (am != 0 || an == bn)
}

struct Session<'a> {
    hello: &'a Hello,
    opts: &'a DestOptions,
    driver: Driver,
    mounted: bool,
    work: WorkDir,
    pages: Option<PageServers>,
    restorer: Option<Worker>,
    criu_version: Option<crate::criu::CriuVersion>,
    /// The memory connection (the page servers read it directly).
    mem: Option<Conn>,
    fs: Option<DestSync>,
}

/// A file name the source may create: a plain name, no path.
fn safe_name(name: &str) -> Result<&str, String> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(format!(
            "the source sent an invalid image file name {name:?}"
        ));
    }
    Ok(name)
}

impl<'a> Session<'a> {
    fn preflight(
        registry: &Registry,
        opts: &'a DestOptions,
        hello: &'a Hello,
        mem: Option<Conn>,
    ) -> Result<Session<'a>, Refuse> {
        let live = hello.mode == MigrationMode::Live;
        if !hello.force && !compatible(&hello.phaul_version, PHAUL_VERSION) {
            return Err(Refuse(
                Refusal::Version,
                format!(
                    "source phaul {} and destination phaul {PHAUL_VERSION} are not compatible (use --force to try anyway)",
                    hello.phaul_version
                ),
            ));
        }
        if !compatible(&hello.abi_version, ABI_VERSION) {
            return Err(Refuse(
                Refusal::Version,
                format!(
                    "source plugin ABI {} and destination plugin ABI {ABI_VERSION} differ",
                    hello.abi_version
                ),
            ));
        }
        let mut driver = registry
            .instantiate(&hello.htype)
            .map_err(|e| Refuse(Refusal::Htype, e.to_string()))?;
        let free = free_bytes(&opts.work_root);
        let need = hello.need_bytes + hello.need_bytes / 10;
        if free < need {
            return Err(Refuse(
                Refusal::Space,
                format!(
                    "the work directory {} has {} MiB free, the images need about {} MiB",
                    opts.work_root.display(),
                    free >> 20,
                    need >> 20
                ),
            ));
        }
        let mut work = WorkDir::create(&opts.work_root, "dst", hello.session)
            .map_err(|e| Refuse(Refusal::Other, e.to_string()))?;
        work.keep(opts.keep_images || hello.keep_images);
        let other = |e: crate::criu::CriuError| Refuse(Refusal::Other, e.to_string());
        // CRIU only in live mode: its workers start now, before anything
        // is frozen, so their start-up is not part of the downtime.
        let mut criu = None;
        if live {
            // The page servers read straight from the memory connection.
            let mem = mem.ok_or_else(|| {
                Refuse(
                    Refusal::Other,
                    "the source opened no memory connection".into(),
                )
            })?;
            let ps_fd = mem.as_raw_fd();
            let mut pages =
                Worker::spawn(&opts.criu, "pages", &work.criu(), &[ps_fd]).map_err(other)?;
            let restorer =
                Worker::spawn(&opts.criu, "restore", &work.criu(), &[]).map_err(other)?;
            let version = pages.version().map_err(other)?;
            if let Some(src) = hello.criu_version.filter(|v| !hello.force && version < *v) {
                return Err(Refuse(
                    Refusal::Criu,
                    format!("destination CRIU {version} is older than source CRIU {src} (upgrade it, or --force)"),
                ));
            }
            if !hello.force {
                let cpu_dir = work.path().join("cpuinfo");
                std::fs::create_dir_all(&cpu_dir)
                    .map_err(|e| Refuse(Refusal::Other, e.to_string()))?;
                std::fs::write(cpu_dir.join("cpuinfo.img"), &hello.cpuinfo)
                    .map_err(|e| Refuse(Refusal::Other, e.to_string()))?;
                pages.cpuinfo_check(&cpu_dir).map_err(|e| {
                    Refuse(
                        Refusal::Cpu,
                        format!("this CPU cannot run the source's processes ({e}); --force skips the check"),
                    )
                })?;
            }
            let images_root = work.path().join("images");
            criu = Some((
                PageServers::new(pages, ps_fd, images_root),
                restorer,
                version,
                mem,
            ));
        }
        let host = EngineHost::new(
            &hello.htype,
            &opts.criu.display().to_string(),
            &criu
                .as_ref()
                .map_or("none".to_string(), |c| c.2.to_string()),
            std::sync::Arc::new(|_| {
                Err("feature checks are only available on the source".to_string())
            }),
        );
        let drv_err = |e: crate::Error| Refuse(Refusal::Driver, e.to_string());
        driver
            .init(super::init_context(
                Side::Destination,
                hello.mode,
                &hello.id,
                &hello.options,
                &work,
                host,
            ))
            .map_err(drv_err)?;
        let ours = fs_roots(&driver.fs_sync().map_err(drv_err)?);
        if ours != hello.fs_roots {
            return Err(Refuse(
                Refusal::Driver,
                format!(
                    "the source syncs {:?} but this side's {} driver expects {:?}",
                    hello.fs_roots, hello.htype, ours
                ),
            ));
        }
        let (pages, restorer, criu_version, mem) = match criu {
            Some((p, r, v, s)) => (Some(p), Some(r), Some(v), Some(s)),
            None => (None, None, None, None),
        };
        let mut s = Session {
            hello,
            opts,
            driver,
            mounted: false,
            work,
            pages,
            restorer,
            criu_version,
            mem,
            fs: None,
        };
        s.driver.mount().map_err(drv_err)?;
        s.mounted = true;
        Ok(s)
    }

    fn receive_file(
        &mut self,
        control: &mut Control,
        name: &str,
        mode: u32,
        size: u64,
    ) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = safe_name(name)?;
        // Live: images (and meta files) join the last pass's pages.
        // Restart: only meta files travel.
        let dir = if self.hello.mode == MigrationMode::Live {
            let pages = self
                .pages
                .as_ref()
                .ok_or("the source sent an image after the restore began")?;
            if pages.last() == 0 {
                return Err("the source sent an image before any memory pass".into());
            }
            pages.dir(pages.last())
        } else {
            self.work.meta()
        };
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut got = 0u64;
        while got < size {
            match control.read() {
                Ok(Msg::Chunk(data)) => {
                    got += data.len() as u64;
                    if got > size {
                        return Err(format!(
                            "the source sent more than the announced {size} bytes of {name}"
                        ));
                    }
                    f.write_all(&data)
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                }
                Ok(other) => {
                    return Err(format!("expected a chunk of {name}, got {}", other.name()))
                }
                Err(e) => return Err(format!("receiving {name}: {e}")),
            }
        }
        Ok(())
    }

    /// Restores, holding at `post-restore` until the source commits.
    /// Returns the restored root's pid and the time CRIU worked (the
    /// restore request's wall time less the wait for the commit).
    fn restore(
        &mut self,
        control: &mut Control,
        iter: u32,
        meta: &[String],
    ) -> Result<(i32, Duration), String> {
        let mut pages = self
            .pages
            .take()
            .ok_or("the source asked to restore twice")?;
        if iter != pages.last() {
            return Err(format!(
                "the source asked to restore pass {iter}, the last pass was {}",
                pages.last()
            ));
        }
        pages.wait(Duration::from_secs(60))?;
        // Memory is complete: the page-server worker and the memory
        // connection are done.
        drop(pages);
        self.files_complete()?;
        if let Some(m) = self.mem.take() {
            m.shutdown();
        }
        let images = self.work.images(iter);
        let meta_dir = self.work.meta();
        for m in meta {
            let m = safe_name(m)?;
            std::fs::rename(images.join(m), meta_dir.join(m))
                .map_err(|e| format!("meta file {m}: {e}"))?;
        }
        self.driver
            .meta_files_in(&meta_dir.display().to_string(), meta)
            .map_err(|e| e.to_string())?;
        let mut copts = CriuOpts {
            tcp_established: self.hello.tcp_established,
            ..CriuOpts::default()
        };
        self.driver
            .adjust_restore_opts(&mut copts)
            .map_err(|e| e.to_string())?;
        let outcome = self
            .driver
            .restore(&RestoreContext {
                images_dir: images.display().to_string().into(),
                opts: copts.clone(),
            })
            .map_err(|e| e.to_string())?;
        if outcome.handled {
            return Err("drivers that restore through their own tooling are not supported by this engine yet".into());
        }
        let w = self.restorer.as_mut().ok_or("the restore worker is gone")?;
        let mut o = w.opts(&images, "restore.log");
        o.notify_scripts = Some(true);
        criu_opts_to_rpc(&copts, &mut o);
        let started = Instant::now();
        // Time spent waiting for the source's commit is not CRIU's.
        let mut held = Duration::ZERO;
        w.start(ReqType::Restore, o).map_err(|e| e.to_string())?;
        let mut committed = false;
        let mut failure: Option<String> = None;
        loop {
            let w = self.restorer.as_mut().expect("restore worker");
            match w.next_event(ReqType::Restore).map_err(|e| e.to_string())? {
                Event::Notify { script, .. } => {
                    tracing::debug!(%script, "CRIU notification");
                    let ok = match script.as_str() {
                        "post-restore" => {
                            let t = Instant::now();
                            let verdict = self.await_commit(control);
                            held = t.elapsed();
                            match verdict {
                                Ok(()) => {
                                    committed = true;
                                    true
                                }
                                Err(e) => {
                                    failure = Some(e);
                                    false
                                }
                            }
                        }
                        "network-unlock" => {
                            if let Err(e) = self.driver.net_unlock() {
                                tracing::warn!("{e}");
                            }
                            true
                        }
                        _ => true,
                    };
                    self.restorer
                        .as_mut()
                        .expect("restore worker")
                        .answer_notify(ok)
                        .map_err(|e| e.to_string())?;
                }
                Event::Done(resp) => {
                    let w = self.restorer.as_ref().expect("restore worker");
                    if let Some(f) = failure {
                        return Err(f);
                    }
                    w.check_done(ReqType::Restore, &resp, "restore.log")
                        .map_err(|e| e.to_string())?;
                    if !committed {
                        return Err(
                            "CRIU finished the restore without a post-restore notification".into(),
                        );
                    }
                    let pid = resp.restore.map_or(0, |r| r.pid);
                    if let Some(mut w) = self.restorer.take() {
                        w.wait_exit(Duration::from_secs(5));
                    }
                    return Ok((pid, started.elapsed().saturating_sub(held)));
                }
            }
        }
    }

    /// Waits until the file sync (if any) finished its final pass.
    fn files_complete(&mut self) -> Result<(), String> {
        if let Some(fs) = self.fs.take() {
            let passes = fs.finished(Duration::from_secs(60))?;
            tracing::info!(passes = passes.len(), "file sync complete");
        }
        Ok(())
    }

    /// Restart mode: installs the meta files and starts the workload.
    fn start(&mut self, meta: &[String]) -> Result<i32, String> {
        self.files_complete()?;
        for m in meta {
            safe_name(m)?;
        }
        self.driver
            .meta_files_in(&self.work.meta().display().to_string(), meta)
            .map_err(|e| e.to_string())?;
        if self.hello.no_start {
            tracing::info!("--no-start: the workload stays stopped here");
            return Ok(0);
        }
        self.driver.start().map_err(|e| e.to_string())
    }

    /// Tells the source the copy is ready and waits for its verdict.
    fn await_commit(&mut self, control: &mut Control) -> Result<(), String> {
        control
            .write(&Msg::Restored)
            .map_err(|e| format!("telling the source: {e}"))?;
        let _ = control
            .conn()
            .set_read_timeout(Some(self.opts.commit_timeout));
        let r = control.read();
        let _ = control.conn().set_read_timeout(None);
        match r {
            Ok(Msg::Commit) => Ok(()),
            Ok(Msg::Abort { reason }) => Err(format!("the source aborted: {reason}")),
            Ok(other) => Err(format!("expected Commit, got {}", other.name())),
            Err(e) => Err(format!("no commit from the source: {e}")),
        }
    }

    fn complete(&mut self, pid: i32, took: Duration) -> DestSummary {
        if let Err(e) = self.driver.migration_complete() {
            tracing::warn!("{e}");
        }
        DestSummary {
            session: self.hello.session,
            pid,
            restore_time: took,
        }
    }

    fn rollback(&mut self) {
        if let Some(mut p) = self.pages.take() {
            p.kill();
        }
        if let Some(m) = self.mem.take() {
            m.shutdown();
        }
        drop(self.pages.take());
        drop(self.restorer.take());
        if self.mounted {
            if let Err(e) = self.driver.umount() {
                tracing::warn!("{e}");
            }
        }
        if let Err(e) = self.driver.migration_fail() {
            tracing::warn!("{e}");
        }
    }
}

/// Runs one migration on the destination, from its `Hello` on. `mem` is
/// the memory connection (already attached); `record` learns the outcome
/// as it changes, for sources that lose the connection and ask later.
pub fn serve_session(
    registry: &Registry,
    opts: &DestOptions,
    hello: &Hello,
    mut control: Control,
    mem: Option<Conn>,
    fs: Option<Conn>,
    record: &dyn Fn(Outcome),
) -> Result<DestSummary, String> {
    record(Outcome::InProgress);
    let prepared = Session::preflight(registry, opts, hello, mem).and_then(|mut s| {
        let missing = |what: &str| {
            Refuse(
                Refusal::Other,
                format!("the source opened no {what} connection"),
            )
        };
        if !hello.fs_roots.is_empty() {
            let fs = fs.ok_or_else(|| missing("file"))?;
            let roots = hello.fs_roots.iter().map(PathBuf::from).collect();
            s.fs = Some(DestSync::start(fs, roots).map_err(|e| Refuse(Refusal::Other, e))?);
        }
        Ok(s)
    });
    let mut s = match prepared {
        Ok(s) => s,
        Err(Refuse(kind, reason)) => {
            tracing::warn!("refused: {reason}");
            let _ = control.write(&Msg::Refused {
                kind,
                reason: reason.clone(),
            });
            record(Outcome::RolledBack);
            return Err(format!("refused: {reason}"));
        }
    };
    let welcome = Welcome {
        phaul_version: PHAUL_VERSION.into(),
        criu_version: s.criu_version,
        free_bytes: free_bytes(&opts.work_root),
    };
    let r = (|| -> Result<DestSummary, String> {
        control
            .write(&Msg::Welcome(welcome))
            .map_err(|e| e.to_string())?;
        loop {
            let msg = control.read().map_err(|e| match e {
                FrameError::Closed => "the source closed the connection".to_string(),
                e => e.to_string(),
            })?;
            match msg {
                Msg::StartIter { iter, parent } => {
                    s.pages
                        .as_mut()
                        .ok_or("a memory pass in restart mode, or after the restore began")?
                        .start(iter, parent)?;
                    control
                        .write(&Msg::IterReady { iter })
                        .map_err(|e| e.to_string())?;
                }
                Msg::File { name, mode, size } => {
                    s.receive_file(&mut control, &name, mode, size)?
                }
                Msg::Restore { iter, meta_files } if hello.mode == MigrationMode::Live => {
                    // On error the caller tells the source, which may still resume its copy.
                    let (pid, took) = s.restore(&mut control, iter, &meta_files)?;
                    record(Outcome::Resumed);
                    let restore_stats = stats::read_restore(&s.work.criu()).ok();
                    if let Err(e) = control.write(&Msg::Resumed {
                        pid,
                        stats: restore_stats,
                        restore_us: took.as_micros() as u64,
                    }) {
                        tracing::warn!(
                            "the workload runs (pid {pid}) but the source did not hear it: {e}"
                        );
                    }
                    return Ok(s.complete(pid, took));
                }
                Msg::Start { meta_files } if hello.mode == MigrationMode::Restart => {
                    let started = Instant::now();
                    let pid = s.start(&meta_files)?;
                    record(Outcome::Resumed);
                    if let Err(e) = control.write(&Msg::Started { pid }) {
                        tracing::warn!(
                            "the workload started (pid {pid}) but the source did not hear it: {e}"
                        );
                    }
                    return Ok(s.complete(pid, started.elapsed()));
                }
                Msg::Abort { reason } => return Err(format!("the source aborted: {reason}")),
                other => return Err(format!("unexpected {} from the source", other.name())),
            }
        }
    })();
    match r {
        Ok(sum) => Ok(sum),
        Err(e) => {
            tracing::warn!("rolling back: {e}");
            let _ = control.write(&Msg::Abort { reason: e.clone() });
            s.rollback();
            record(Outcome::RolledBack);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_from_the_source_are_plain_names() {
        assert!(safe_name("pages-1.img").is_ok());
        for bad in ["", ".", "..", "../x", "/etc/passwd", "a/b", "x\0y"] {
            assert!(safe_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn version_compatibility_follows_semver_zero_rules() {
        assert!(compatible("0.1.0", "0.1.7"));
        assert!(!compatible("0.1.0", "0.2.0"));
        assert!(compatible("1.2.0", "1.5.0"));
        assert!(!compatible("1.0.0", "2.0.0"));
    }
}
