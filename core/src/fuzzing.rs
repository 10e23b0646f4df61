//! Entry points for the fuzz targets in `fuzz/` (only with the non-default
//! `fuzzing` feature; nothing else uses this module).
//!
//! Each function takes the raw bytes libFuzzer generates, feeds them to the
//! code that reads that kind of untrusted input, and checks an oracle: it
//! panics (a finding) only when the code under test panics or the oracle
//! says something is wrong, never for input that is merely refused.
//!
//! - [`frame`]: a control-connection byte stream (length-prefixed postcard
//!   frames) decoded as [`Msg`]s and as fs-sync [`FsMsg`]s; whatever decodes
//!   must re-encode to something that decodes the same; image file names
//!   in the messages go through the destination's name check.
//! - [`hello`]: what the destination service does with a new connection
//!   before any side effect (`server::route`): the preamble, the first
//!   frame, and for a `Hello` the destination's side-effect-free checks.
//! - [`criu_rpc`]: one packet from a `criu swrk` worker, decoded and
//!   interpreted as the worker does; the same bytes as a CRIU stats image.
//! - [`fsync_receiver`]: a fs-sync [`Receiver`] fed an arbitrary frame
//!   stream on a scratch root, then checked that nothing outside the root
//!   changed; every wire path in the stream also goes through
//!   [`check_path`](crate::fsync::check_path) with an independent oracle.
//!
//! [`seeds`] makes the seed corpus (valid inputs, so the fuzzer starts from
//! real structure); `fuzz/corpus/` holds its output.

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::criu::rpc::{self, ReqType, Resp};
use crate::criu::{diagnose, stats, CriuError, Event, MIN_VERSION};
use crate::engine::dest;
use crate::fsync::msg::{Bytes, EntryKind, Meta};
use crate::fsync::{check_path, FsMsg, FsyncError, PassStats, Receiver};
use crate::proto::frame::{FrameReader, FrameWriter, MAX_FRAME};
use crate::proto::{read_preamble, write_preamble, Hello, MigrationMode, Msg};

/// Decodes `data` as a stream of control frames, then as a stream of
/// fs-sync frames, checking that every message that decodes round-trips.
pub fn frame(data: &[u8]) {
    let mut r = FrameReader::new(data);
    while let Ok(m) = r.read::<Msg>() {
        let again: Msg = round_trip(&m);
        assert_eq!(again, m, "a Msg does not survive re-encoding");
        check_names(&m);
    }
    let mut r = FrameReader::new(data);
    while let Ok(m) = r.read::<FsMsg>() {
        let bytes = encode(&m);
        let again: FsMsg = round_trip(&m);
        assert_eq!(
            encode(&again),
            bytes,
            "an FsMsg does not survive re-encoding"
        );
    }
    // The post-copy page protocol's headers, and the pagemap parser the
    // destination's pager runs on the images the source sent.
    for h in data.chunks_exact(32) {
        if let Ok(f) = crate::postcopy::wire::Frame::decode(h.try_into().expect("32 bytes")) {
            assert_eq!(
                crate::postcopy::wire::Frame::decode(&f.encode()),
                Ok(f),
                "a post-copy frame does not survive re-encoding"
            );
        }
    }
    // A destination storing a userfaultfd pre-copy pass from a hostile
    // source: it errs or stores, within its limit, without panicking.
    if let Ok(mut st) = crate::precopy::store::Store::new(64) {
        if st.receive_pass(data).is_ok() {
            assert!(st.pages() <= 3 * 64, "the store outgrew its limit");
        }
    }
    if let Ok(ranges) = crate::postcopy::image::parse(data) {
        assert!(
            ranges.windows(2).all(|w| w[0].0 <= w[1].0),
            "lazy ranges out of order: {ranges:?}"
        );
        assert!(
            ranges.iter().all(|r| r.0 <= r.1),
            "an inverted range: {ranges:?}"
        );
    }
}

/// The destination service's first steps on a new connection: preamble,
/// first frame, and for a Hello the checks that need only the Hello.
pub fn hello(data: &[u8]) {
    let mut r = data;
    if read_preamble(&mut r).is_err() {
        return;
    }
    let Ok(first) = FrameReader::new(r).read::<Msg>() else {
        return;
    };
    let Msg::Hello(h) = first else {
        return;
    };
    match dest::check_hello(&h) {
        Ok(c) => {
            // The space the images need is never less than they announced.
            assert!(
                c.need_bytes >= h.need_bytes,
                "need_bytes wrapped: {} for {}",
                c.need_bytes,
                h.need_bytes
            );
            // Every option is either the engine's or the driver's.
            let engine = h
                .options
                .iter()
                .filter(|(k, _)| crate::engine::CriuDefaults::KEYS.contains(&k.as_str()))
                .count();
            assert_eq!(engine + c.driver_options.len(), h.options.len());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// One packet from a CRIU worker: the first byte picks the request phaul
/// sent (a raw request type, valid or not), the rest is the packet.
pub fn criu_rpc(data: &[u8]) {
    let Some((&sent, packet)) = data.split_first() else {
        return;
    };
    let sent = i32::from(sent % 16);
    // CRIU also writes the stats images phaul reads.
    if let Ok(e) = stats::parse_entry(packet) {
        let _ = format!("{e:?}");
    }
    let resp = match crate::criu::worker::decode_resp(packet, "fuzzing") {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let again = Resp::decode(resp.encode_to_vec().as_slice()).expect("re-encoded Resp decodes");
    assert_eq!(again, resp, "a Resp does not survive re-encoding");
    if let Err(e) = crate::criu::worker::check_answer_type(sent, &resp) {
        let _ = e.to_string();
    }
    match crate::criu::worker::version_of(&resp) {
        Ok(v) => assert!(v >= MIN_VERSION, "accepted CRIU {v}"),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = crate::criu::worker::page_server_pid(&resp);
    let line = crate::criu::worker::errmsg_line(&resp);
    if let Some(l) = &line {
        assert!(!l.is_empty() && l.trim() == l, "errmsg line {l:?}");
    }
    let t = ReqType::try_from(sent).unwrap_or(ReqType::Empty);
    let failed = CriuError::Failed {
        request: "fuzzing",
        errno: resp.cr_errno.filter(|e| *e != 0),
        line,
        log: None,
    };
    let _ = (failed.to_string(), failed.hint());
    match crate::criu::worker::event(resp) {
        Event::Notify { script, pid } => {
            let _ = diagnose::hint(&script, pid);
        }
        Event::Done(r) => assert_ne!(r.r#type, ReqType::Notify as i32, "{t:?}"),
    }
}

/// Runs a fs-sync receiver on a scratch root with `data` as everything the
/// sender says, then checks that nothing outside the root changed.
///
/// The scratch directory (under `/dev/shm` when it is writable, else the
/// temporary directory; one per process) holds `root/` — with a symlink
/// to `outside/` and one to its absolute path planted in it, the obvious
/// ways out — and `outside/` with a file and a directory. Inputs that
/// would only make the receiver work for a long time (a file of more than
/// 16 MiB, whose hash it computes) are skipped, and device nodes are made
/// harmless (every character device becomes `/dev/null`'s number, every
/// block device 0:0) since the fuzzer runs as root.
pub fn fsync_receiver(data: &[u8]) {
    let _ = receive(data);
}

/// [`fsync_receiver`], with what the receiver returned (None: skipped).
fn receive(data: &[u8]) -> Option<Result<Vec<PassStats>, FsyncError>> {
    let stream = sanitise_fs_stream(data)?;
    let sandbox = Sandbox::get();
    sandbox.reset();
    let mut conn = Duplex {
        input: io::Cursor::new(stream),
    };
    let mut r = Receiver::new(vec![sandbox.root()]).expect("the scratch root opens");
    let result = r.serve(&mut conn);
    sandbox.check();
    Some(result)
}

/// Decodes the frames of `data` (checking every wire path on the way) and
/// re-encodes them with device numbers made harmless; undecodable bytes
/// after the last good frame are kept as they are. None to skip the input.
fn sanitise_fs_stream(data: &[u8]) -> Option<Vec<u8>> {
    let mut rest = data;
    let mut out = Vec::new();
    loop {
        let before = rest;
        let mut rd = FrameReader::new(&mut rest);
        let Ok(mut m) = rd.read::<FsMsg>() else {
            out.extend_from_slice(before);
            return Some(out);
        };
        for p in wire_paths(&m) {
            check_path_oracle(p);
        }
        match &mut m {
            FsMsg::File { size, .. } if *size > 16 << 20 => return None,
            FsMsg::Special { kind, rdev, .. } => {
                *rdev = match kind {
                    EntryKind::Char => libc::makedev(1, 3),
                    _ => 0,
                }
            }
            _ => {}
        }
        FrameWriter::new(&mut out).write(&m).expect("re-encodes");
    }
}

/// The wire paths of a message.
fn wire_paths(m: &FsMsg) -> Vec<&[u8]> {
    match m {
        FsMsg::Delete { path, .. }
        | FsMsg::Dir { path, .. }
        | FsMsg::File { path, .. }
        | FsMsg::Symlink { path, .. }
        | FsMsg::Special { path, .. }
        | FsMsg::Attr { path, .. } => vec![path.as_slice()],
        FsMsg::Link { path, target, .. } => vec![path.as_slice(), target.as_slice()],
        _ => Vec::new(),
    }
}

/// [`check_path`] against a plain restatement of its rule.
fn check_path_oracle(p: &[u8]) {
    for allow_root in [false, true] {
        let safe = (p.is_empty() && allow_root)
            || (!p.is_empty()
                && p.len() <= 4096
                && !p.contains(&0)
                && p.split(|&b| b == b'/')
                    .all(|c| !c.is_empty() && c != b"." && c != b".." && c.len() <= 255));
        match check_path(p, allow_root) {
            Ok(comps) => {
                assert!(safe, "check_path accepted {:?}", Bytes::from(p));
                assert_eq!(
                    comps.concat().len() + comps.len().saturating_sub(1),
                    p.len()
                );
            }
            Err(_) => assert!(!safe, "check_path refused {:?}", Bytes::from(p)),
        }
    }
}

/// The receiver's connection: reads the input, swallows its answers.
struct Duplex {
    input: io::Cursor<Vec<u8>>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The scratch directory of [`fsync_receiver`].
struct Sandbox {
    base: PathBuf,
    /// The modes `reset` gives a new directory and a new file (umask).
    dir_mode: u32,
    file_mode: u32,
}

const SENTINEL: &[u8] = b"outside the root: must never change\n";
/// The mtime of everything in `outside/`.
const OLD: std::time::SystemTime = std::time::SystemTime::UNIX_EPOCH;

impl Sandbox {
    fn get() -> &'static Sandbox {
        static S: std::sync::OnceLock<Sandbox> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            let shm = Path::new("/dev/shm");
            let parent = if shm.is_dir()
                && std::fs::metadata(shm).is_ok_and(|m| m.permissions().mode() & 0o002 != 0)
            {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            // Earlier processes' directories (libFuzzer exits without
            // unwinding, so nobody removed them) go first.
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("phaul-fuzz-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = force_remove(&e.path());
                    }
                }
            }
            let base = parent.join(format!("phaul-fuzz-{}", std::process::id()));
            let _ = force_remove(&base);
            std::fs::create_dir_all(&base).expect("creating the scratch directory");
            let probe = base.join("probe");
            std::fs::create_dir(&probe).unwrap();
            let dir_mode = std::fs::metadata(&probe).unwrap().mode() & 0o7777;
            std::fs::remove_dir(&probe).unwrap();
            std::fs::write(&probe, b"").unwrap();
            let file_mode = std::fs::metadata(&probe).unwrap().mode() & 0o7777;
            std::fs::remove_file(&probe).unwrap();
            Sandbox {
                base,
                dir_mode,
                file_mode,
            }
        })
    }

    fn root(&self) -> PathBuf {
        self.base.join("run/root")
    }

    fn outside(&self) -> PathBuf {
        self.base.join("run/outside")
    }

    /// A fresh `run/`: the root with its planted symlinks, and `outside/`.
    fn reset(&self) {
        let run = self.base.join("run");
        force_remove(&run).expect("removing the last run's files");
        std::fs::create_dir_all(self.root()).unwrap();
        std::fs::create_dir_all(self.outside().join("dir")).unwrap();
        std::fs::write(self.outside().join("file"), SENTINEL).unwrap();
        for p in [
            self.outside().join("file"),
            self.outside().join("dir"),
            self.outside(),
        ] {
            std::fs::File::open(&p)
                .and_then(|f| f.set_modified(OLD))
                .unwrap();
        }
        std::os::unix::fs::symlink("../outside", self.root().join("up")).unwrap();
        std::os::unix::fs::symlink(self.outside(), self.root().join("abs")).unwrap();
    }

    /// Panics if anything outside the root differs from what `reset` made.
    fn check(&self) {
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let run = self.base.join("run");
        assert_eq!(names(&self.base), ["run"], "something next to run/");
        assert_eq!(
            names(&run),
            ["outside", "root"],
            "something next to the root"
        );
        let root = std::fs::symlink_metadata(self.root()).unwrap();
        assert!(root.is_dir(), "the root is no longer a directory");
        assert_eq!(names(&self.outside()), ["dir", "file"], "outside/ changed");
        for p in [
            self.outside().join("file"),
            self.outside().join("dir"),
            self.outside(),
        ] {
            let t = std::fs::symlink_metadata(&p).unwrap().modified().unwrap();
            assert_eq!(t, OLD, "the mtime of {} changed", p.display());
        }
        let dir = self.outside().join("dir");
        let d = std::fs::symlink_metadata(&dir).unwrap();
        assert!(d.is_dir(), "outside/dir is no longer a directory");
        assert_eq!(d.mode() & 0o7777, self.dir_mode, "outside/dir changed mode");
        assert_eq!(
            d.uid(),
            nix::unistd::getuid().as_raw(),
            "outside/dir changed owner"
        );
        assert!(names(&dir).is_empty(), "outside/dir changed");
        let f = self.outside().join("file");
        let m = std::fs::symlink_metadata(&f).unwrap();
        assert!(m.is_file(), "outside/file is no longer a file");
        assert_eq!(m.nlink(), 1, "outside/file got a hard link");
        assert_eq!(
            m.uid(),
            nix::unistd::getuid().as_raw(),
            "outside/file changed owner"
        );
        assert_eq!(std::fs::read(&f).unwrap(), SENTINEL, "outside/file changed");
        assert_eq!(
            m.mode() & 0o7777,
            self.file_mode,
            "outside/file changed mode"
        );
    }
}

/// `rm -rf`, first making every directory writable (a hostile sender may
/// have left one mode 000).
fn force_remove(p: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    for e in walkdir::WalkDir::new(p)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        if e.file_type().is_dir() {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o700));
        }
    }
    std::fs::remove_dir_all(p)
}

fn encode<T: serde::Serialize>(m: &T) -> Vec<u8> {
    let mut out = Vec::new();
    FrameWriter::new(&mut out).write(m).expect("encodes");
    out
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(m: &T) -> T {
    let bytes = encode(m);
    assert!(bytes.len() - 4 <= MAX_FRAME);
    FrameReader::new(&bytes[..])
        .read()
        .expect("a re-encoded message decodes")
}

/// The destination's image-name check against a plain restatement.
fn check_names(m: &Msg) {
    let names: Vec<&str> = match m {
        Msg::File { name, .. } => vec![name],
        Msg::Restore { meta_files, .. } | Msg::Start { meta_files } => {
            meta_files.iter().map(String::as_str).collect()
        }
        _ => Vec::new(),
    };
    for n in names {
        let plain = !n.is_empty()
            && n != "."
            && n != ".."
            && !n.contains('/')
            && !n.contains('\0')
            && n.len() <= 255;
        assert_eq!(dest::safe_name(n).is_ok(), plain, "safe_name({n:?})");
    }
}

/// Valid inputs for each target, as (target, file name, bytes).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let hello = Hello {
        session: 0x3f2a_9c0d_1b2e_4f60,
        phaul_version: crate::PHAUL_VERSION.into(),
        abi_version: crate::ABI_VERSION.into(),
        criu_version: Some(MIN_VERSION),
        htype: "pid".into(),
        id: "4242".into(),
        mode: MigrationMode::Live,
        options: vec![
            ("file-locks".into(), "true".into()),
            ("ghost-limit".into(), "1048576".into()),
            ("shell-job".into(), String::new()),
        ],
        cpuinfo: vec![0x5d, 0x3a, 0x12, 0x61, 1, 2, 3, 4],
        need_bytes: 256 << 20,
        force: false,
        tcp_established: true,
        keep_images: false,
        fs_roots: vec!["/srv/data".into()],
        no_start: false,
        pids: vec![4242, 4243],
        bound: vec![crate::engine::checks::BoundSocket {
            tcp: true,
            addr: "127.0.0.1:8080".parse().unwrap(),
        }],
        dry_run: false,
        post_copy: false,
        source_facts: vec![("image".into(), "sha256:0123".into())],
    };
    let restart = Hello {
        mode: MigrationMode::Restart,
        criu_version: None,
        cpuinfo: Vec::new(),
        options: Vec::new(),
        ..hello.clone()
    };
    let with_preamble = |m: &Msg| {
        let mut v = Vec::new();
        write_preamble(&mut v).unwrap();
        v.extend(encode(m));
        v
    };
    // The regression input of the need_bytes overflow (see the README).
    let huge = Hello {
        need_bytes: u64::MAX - 5,
        ..hello.clone()
    };
    let firsts = [
        ("hello-live", Msg::Hello(Box::new(hello.clone()))),
        ("hello-huge-need-bytes", Msg::Hello(Box::new(huge))),
        ("hello-restart", Msg::Hello(Box::new(restart))),
        ("attach-memory", Msg::AttachMemory { session: 1 }),
        ("query", Msg::Query { session: 1 }),
    ];
    for (name, m) in &firsts {
        out.push(("hello", name.to_string(), with_preamble(m)));
    }
    // A whole conversation, as the destination reads it.
    let conversation = [
        Msg::Hello(Box::new(hello)),
        Msg::StartIter {
            iter: 1,
            parent: None,
            lazy: false,
        },
        Msg::File {
            name: "inventory.img".into(),
            mode: 0o600,
            size: 3,
        },
        Msg::Chunk(vec![1, 2, 3]),
        Msg::Restore {
            iter: 1,
            meta_files: vec!["meta.json".into()],
        },
        Msg::Commit,
        Msg::Abort {
            reason: "x".into(),
            criu_log: Some("/var/log/criu.log".into()),
            hint: None,
        },
    ];
    out.push((
        "frame",
        "conversation".into(),
        conversation.iter().flat_map(encode).collect(),
    ));
    out.push(("frame", "fs-pass".into(), fs_pass(false)));
    // A userfaultfd pre-copy pass as the memory channel carries it.
    let mut pass = Vec::new();
    {
        use crate::postcopy::wire::{write_frame, Frame};
        let page = [7u8; 4096];
        let frames = [
            (
                Frame::Put {
                    vpid: 1,
                    addr: 0x1000,
                    pages: 1,
                },
                &page[..],
            ),
            (
                Frame::Zero {
                    vpid: 1,
                    addr: 0x2000,
                    pages: 2,
                },
                &[][..],
            ),
            (
                Frame::Drop {
                    vpid: 1,
                    addr: 0x1000,
                    pages: 1,
                },
                &[][..],
            ),
            (Frame::End { pages: 1 }, &[][..]),
        ];
        for (f, data) in frames {
            write_frame(&mut pass, &f, data).expect("a Vec");
        }
    }
    out.push(("frame", "uffd-pass".into(), pass));

    // CRIU answers: (request sent, packet).
    let resp = |t: ReqType| Resp {
        r#type: t as i32,
        success: true,
        ..Default::default()
    };
    let packets = [
        (
            "version",
            ReqType::Version,
            Resp {
                version: Some(rpc::Version {
                    major_number: 4,
                    minor_number: 2,
                    sublevel: Some(1),
                    gitid: Some("v4.2.1".into()),
                    extra: None,
                    name: Some("CRIU".into()),
                }),
                ..resp(ReqType::Version)
            },
        ),
        (
            "notify-post-dump",
            ReqType::Dump,
            Resp {
                notify: Some(rpc::Notify {
                    script: Some("post-dump".into()),
                    pid: Some(4242),
                }),
                ..resp(ReqType::Notify)
            },
        ),
        (
            "page-server",
            ReqType::PageServerChld,
            Resp {
                ps: Some(rpc::PageServerInfo {
                    pid: Some(777),
                    ..Default::default()
                }),
                ..resp(ReqType::PageServer)
            },
        ),
        (
            "restore-failed",
            ReqType::Restore,
            Resp {
                success: false,
                cr_errno: Some(libc::EEXIST),
                cr_errmsg: Some(
                    "(00.000870) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE\n\
                     (00.020000) Error (criu/cr-restore.c:1): Can't fork for 4242: File exists\n"
                        .into(),
                ),
                ..resp(ReqType::Restore)
            },
        ),
        (
            "features",
            ReqType::FeatureCheck,
            Resp {
                features: Some(rpc::Features {
                    mem_track: Some(false),
                    lazy_pages: Some(true),
                    pidfd_store: None,
                }),
                ..resp(ReqType::FeatureCheck)
            },
        ),
    ];
    for (name, sent, r) in packets {
        let mut v = vec![sent as u8];
        v.extend(r.encode_to_vec());
        out.push(("criu_rpc", name.to_string(), v));
    }
    let entry = stats::sample_dump_entry();
    let mut img = vec![ReqType::Empty as u8];
    img.extend(stats::image(&entry));
    out.push(("criu_rpc", "stats-dump".into(), img));

    out.push(("fsync_receiver", "pass".into(), fs_pass(false)));
    out.push(("fsync_receiver", "two-passes".into(), fs_pass(true)));
    out.push(("fsync_receiver", "hostile".into(), fs_hostile()));
    out
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        xattrs: vec![crate::fsync::msg::Xattr {
            name: b"user.phaul"[..].into(),
            value: b"1"[..].into(),
        }],
    }
}

fn b(s: &str) -> Bytes {
    s.as_bytes().into()
}

/// A full pass of a small tree (and, with `second`, a delta pass that
/// changes and deletes some of it), as the sender sends it.
fn fs_pass(second: bool) -> Vec<u8> {
    let mut ms = vec![
        FsMsg::Begin {
            pass: 1,
            final_pass: false,
            roots: 1,
        },
        FsMsg::Dir {
            root: 0,
            path: b(""),
            meta: meta(0o755),
        },
        FsMsg::Dir {
            root: 0,
            path: b("d"),
            meta: meta(0o750),
        },
        FsMsg::File {
            root: 0,
            path: b("d/f"),
            size: 10,
            delta: false,
        },
        FsMsg::Data {
            offset: 0,
            data: b("hello"),
        },
        FsMsg::FileEnd {
            meta: meta(0o644),
            hash: 0,
        },
        FsMsg::Symlink {
            root: 0,
            path: b("d/s"),
            target: b("../outside/file"),
            meta: Meta {
                xattrs: Vec::new(),
                ..meta(0o777)
            },
        },
        FsMsg::Link {
            root: 0,
            path: b("g"),
            target: b("d/f"),
        },
        FsMsg::Special {
            root: 0,
            path: b("p"),
            kind: EntryKind::Fifo,
            rdev: 0,
            meta: Meta {
                xattrs: Vec::new(),
                ..meta(0o600)
            },
        },
        FsMsg::Attr {
            root: 0,
            path: b("d/f"),
            kind: EntryKind::File,
            meta: meta(0o600),
        },
        FsMsg::End {
            files_scanned: 7,
            files_sent: 7,
            bytes_sent: 5,
            deleted: 0,
        },
    ];
    if second {
        ms.extend([
            FsMsg::Begin {
                pass: 2,
                final_pass: true,
                roots: 1,
            },
            FsMsg::Delete {
                root: 0,
                path: b("p"),
            },
            FsMsg::File {
                root: 0,
                path: b("d/f"),
                size: 12,
                delta: true,
            },
            FsMsg::Punch { offset: 0, len: 2 },
            FsMsg::Data {
                offset: 10,
                data: b("!!"),
            },
            FsMsg::FileEnd {
                meta: meta(0o644),
                hash: 0x1234,
            },
            FsMsg::End {
                files_scanned: 5,
                files_sent: 1,
                bytes_sent: 2,
                deleted: 1,
            },
        ]);
    }
    ms.push(FsMsg::Finish);
    ms.iter().flat_map(encode).collect()
}

/// A pass that tries the ways out of the root (each one ends it, so the
/// fuzzer has to splice them into valid passes).
fn fs_hostile() -> Vec<u8> {
    [
        FsMsg::Begin {
            pass: 1,
            final_pass: false,
            roots: 1,
        },
        FsMsg::File {
            root: 0,
            path: b("up/file"),
            size: 1,
            delta: false,
        },
        FsMsg::Link {
            root: 0,
            path: b("x"),
            target: b("abs/file"),
        },
        FsMsg::Delete {
            root: 0,
            path: b("../outside/file"),
        },
        FsMsg::Dir {
            root: 0,
            path: b("abs/dir/new"),
            meta: meta(0o755),
        },
        FsMsg::Attr {
            root: 0,
            path: b("up"),
            kind: EntryKind::Symlink,
            meta: meta(0o777),
        },
        FsMsg::End {
            files_scanned: 1,
            files_sent: 1,
            bytes_sent: 0,
            deleted: 0,
        },
        FsMsg::Finish,
    ]
    .iter()
    .flat_map(encode)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed runs through its target (and, with
    /// `PHAUL_FUZZ_WRITE_SEEDS=DIR`, is written to `DIR/<target>/`, which
    /// is how `fuzz/corpus/` is made).
    #[test]
    fn seeds_run_through_their_targets() {
        let write = std::env::var_os("PHAUL_FUZZ_WRITE_SEEDS").map(PathBuf::from);
        for (target, name, bytes) in seeds() {
            match target {
                "frame" => frame(&bytes),
                "hello" => hello(&bytes),
                "criu_rpc" => criu_rpc(&bytes),
                "fsync_receiver" => fsync_receiver(&bytes),
                other => panic!("unknown target {other}"),
            }
            if target == "fsync_receiver" {
                let r = receive(&bytes).expect("not skipped");
                match name.as_str() {
                    "pass" => assert_eq!(r.unwrap().len(), 1),
                    "two-passes" => assert!(matches!(r, Err(FsyncError::Changed { .. })), "{r:?}"),
                    _ => assert!(matches!(r, Err(FsyncError::Unsafe { .. })), "{r:?}"),
                }
            }
            if let Some(dir) = &write {
                let d = dir.join(target);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join(name), &bytes).unwrap();
            }
        }
    }
}
