//! End-to-end tests: a sender and a receiver in two threads over a unix
//! socketpair, on real trees under /dev/shm.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::msg::{Bytes, EntryKind, FsMsg, Meta};
use super::testutil::*;
use super::{sys, FsyncError, Receiver, Sender};
use crate::proto::frame::{FrameReader, FrameWriter};

const MIB: u64 = 1 << 20;

fn pwrite(p: &Path, data: &[u8], off: u64) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    sys::pwrite_all(f.as_fd(), data, off).unwrap();
}

/// A file of `size` bytes of a non-repeating pattern (fast: one pattern
/// buffer, stamped per MiB).
fn pattern_file(p: &Path, size: u64, seed: u64) {
    let mut base = vec![0u8; MIB as usize];
    let mut rng = Rng(seed | 1);
    for chunk in base.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let mut f = fs::File::create(p).unwrap();
    let mut left = size;
    let mut i = 0u64;
    while left > 0 {
        base[..8].copy_from_slice(&(i ^ seed).to_le_bytes());
        let n = left.min(MIB) as usize;
        f.write_all(&base[..n]).unwrap();
        left -= n as u64;
        i += 1;
    }
}

/// A tree with every kind of entry and metadata phaul must keep.
fn build_everything(src: &Path) {
    fs::create_dir_all(src.join("dir1/dir2/dir3")).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("small.txt"), b"hello\n").unwrap();
    fs::write(src.join("dir1/dir2/dir3/deep.txt"), b"deep").unwrap();
    fs::write(
        src.join(OsStr::from_bytes(b"caf\xe9 \x01 name")),
        b"latin-1 name",
    )
    .unwrap();
    fs::write(src.join("-dash file"), b"x").unwrap();
    // Symlinks: absolute, relative, dangling, into a parent.
    symlink("/etc/passwd", src.join("abs-link")).unwrap();
    symlink("dir1/dir2", src.join("rel-link")).unwrap();
    symlink("nowhere/at/all", src.join("dangling")).unwrap();
    symlink("../small.txt", src.join("dir1/up")).unwrap();
    // Hard links: a pair and a triple across directories.
    fs::create_dir(src.join("hl")).unwrap();
    fs::write(src.join("hl/a"), b"pair").unwrap();
    fs::hard_link(src.join("hl/a"), src.join("hl/b")).unwrap();
    fs::write(src.join("t1"), b"triple").unwrap();
    fs::hard_link(src.join("t1"), src.join("hl/t2")).unwrap();
    fs::hard_link(src.join("t1"), src.join("dir1/t3")).unwrap();
    // A 64 MiB sparse file with three data regions.
    let f = fs::File::create(src.join("sparse.img")).unwrap();
    f.set_len(64 * MIB).unwrap();
    drop(f);
    pwrite(&src.join("sparse.img"), &[0x11; 4096], 0);
    pwrite(&src.join("sparse.img"), &[0x22; 100 << 10], 10 * MIB);
    pwrite(&src.join("sparse.img"), b"the very end!", 64 * MIB - 13);
    // Owners other than root, then modes (a chown clears setuid).
    fs::write(src.join("owned"), b"mine").unwrap();
    lchown(&src.join("owned"), 1234, 5678);
    fs::create_dir(src.join("owned-dir")).unwrap();
    lchown(&src.join("owned-dir"), 1234, 5678);
    symlink("owned", src.join("owned-link")).unwrap();
    lchown(&src.join("owned-link"), 1234, 5678);
    fs::write(src.join("suid"), b"#!/bin/sh\n").unwrap();
    lchown(&src.join("suid"), 1234, 5678);
    chmod(&src.join("suid"), 0o6755);
    fs::create_dir(src.join("sgid-dir")).unwrap();
    chmod(&src.join("sgid-dir"), 0o2775);
    fs::create_dir(src.join("sticky")).unwrap();
    chmod(&src.join("sticky"), 0o1777);
    fs::write(src.join("odd"), b"odd").unwrap();
    chmod(&src.join("odd"), 0o604);
    fs::write(src.join("noperm"), b"none").unwrap();
    chmod(&src.join("noperm"), 0o000);
    fs::create_dir(src.join("x-only")).unwrap();
    fs::write(src.join("x-only/inside"), b"in").unwrap();
    chmod(&src.join("x-only"), 0o311);
    // Extended attributes on files, directories and a symlink.
    set_xattr(&src.join("small.txt"), "user.color", b"blue");
    set_xattr(&src.join("small.txt"), "trusted.secret", b"\x00\x01\xff");
    set_xattr(&src.join("dir1"), "user.dir", b"yes");
    set_xattr(&src.join("dir1"), "trusted.t", b"1");
    set_xattr(&src.join("abs-link"), "trusted.link", b"L");
    set_xattr(&src.join("empty"), "user.big", &[7u8; 3000]);
    set_xattr(&src.join("hl/a"), "user.linked", b"both names");
    // Nodes: /dev/null's twin and a FIFO; a socket, which is skipped.
    mknod(
        &src.join("null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    mknod(&src.join("pipe"), libc::S_IFIFO | 0o640, 0);
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    // Fixed mtimes on everything, root included.
    for (i, e) in walkdir::WalkDir::new(src).into_iter().enumerate() {
        set_mtime(e.unwrap().path(), 1_600_000_000 + i as i64, 123_456_789);
    }
}

#[test]
fn every_kind_of_entry_survives_one_pass() {
    let t = scratch();
    let src = t.path().join("src");
    let dst = t.path().join("dst/deeper");
    build_everything(&src);
    let mut s = Sender::new(vec![src.clone()]);
    let mut p = Pair::start(vec![dst.clone()]);
    let st = p.pass(&mut s, false).unwrap();
    assert_same(&src, &dst);
    assert_eq!(st.pass, 1);
    // Every entry but the socket.
    assert_eq!(st.files_scanned, 32, "{st:?}");
    // Data regions only: the sparse file's 64 MiB are not sent...
    assert!(st.bytes_sent < MIB, "{st:?}");
    // ... and stay holes on the destination.
    assert!(allocated(&dst.join("sparse.img")) < MIB);
    assert!(!dst.join("sock").exists());

    // Nothing changed: nothing is sent.
    let st2 = p.pass(&mut s, true).unwrap();
    assert_eq!(
        (st2.files_sent, st2.bytes_sent, st2.deleted),
        (0, 0, 0),
        "{st2:?}"
    );
    assert!(st2.final_pass);
    assert_same(&src, &dst);
    let theirs = p.finish(&mut s);
    assert_eq!(theirs.len(), 2);
    assert_eq!(theirs[0].bytes_sent, st.bytes_sent);
    assert_eq!(theirs[0].files_sent, st.files_sent);
}

#[test]
fn later_passes_send_only_changes() {
    let t = scratch();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    fs::create_dir_all(src.join("sub")).unwrap();
    pattern_file(&src.join("big"), 200 * MIB, 1);
    pattern_file(&src.join("trunc"), 3 * MIB, 2);
    pattern_file(&src.join("ext"), 2 * MIB, 3);
    pattern_file(&src.join("ext-hole"), 100 << 10, 4);
    pattern_file(&src.join("holes"), 4 * MIB, 5);
    fs::write(src.join("f2d"), b"a file, then a dir").unwrap();
    fs::create_dir_all(src.join("d2f/sub")).unwrap();
    fs::write(src.join("d2f/sub/x"), b"x").unwrap();
    fs::write(src.join("d2f/y"), b"y").unwrap();
    symlink("big", src.join("l2f")).unwrap();
    fs::create_dir_all(src.join("gone/a/b/c")).unwrap();
    fs::write(src.join("gone/a/b/c/file"), b"f").unwrap();
    fs::write(src.join("gone/z"), b"z").unwrap();
    fs::write(src.join("del.txt"), b"bye").unwrap();
    fs::write(src.join("small"), b"same size").unwrap();
    pattern_file(&src.join("hl1"), 3 * MIB, 6);
    fs::hard_link(src.join("hl1"), src.join("hl2")).unwrap();
    fs::hard_link(src.join("hl1"), src.join("sub/hl3")).unwrap();

    let mut s = Sender::new(vec![src.clone()]);
    let mut p = Pair::start(vec![dst.clone()]);
    let t0 = Instant::now();
    let st = p.pass(&mut s, false).unwrap();
    let took = t0.elapsed();
    assert!(st.bytes_sent >= 210 * MIB, "{st:?}");
    // How long it took is the benchmark's business, not a test's: printed
    // only (a loaded machine must not fail the suite).
    eprintln!("first pass: {st:?} in {took:?}");
    assert_same(&src, &dst);

    // 1 MiB of the 200 changes, in three places.
    let big = src.join("big");
    pwrite(&big, &[0xab; 350 << 10], 10 * MIB + 4097);
    pwrite(&big, &[0xcd; 350 << 10], 100 * MIB + 77);
    pwrite(&big, &[0xef; 324 << 10], 200 * MIB - (324 << 10));
    let st = p.pass(&mut s, false).unwrap();
    eprintln!("second pass: {st:?}");
    assert!(st.bytes_sent >= MIB && st.bytes_sent <= 2 * MIB, "{st:?}");
    assert_eq!(st.files_sent, 1, "{st:?}");
    assert_same(&src, &dst);

    // Structural changes.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(src.join("trunc"))
        .unwrap();
    f.set_len(1_500_001).unwrap();
    drop(f);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(src.join("ext"))
        .unwrap();
    f.write_all(&vec![0x5a; 3 * MIB as usize]).unwrap();
    drop(f);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(src.join("ext-hole"))
        .unwrap();
    f.set_len(10 * MIB).unwrap();
    drop(f);
    punch(&src.join("holes"), MIB, MIB);
    punch(&src.join("holes"), 3 * MIB + 5000, 100 << 10);
    fs::remove_file(src.join("f2d")).unwrap();
    fs::create_dir(src.join("f2d")).unwrap();
    fs::write(src.join("f2d/child"), b"child").unwrap();
    fs::remove_dir_all(src.join("d2f")).unwrap();
    fs::write(src.join("d2f"), b"now a file").unwrap();
    fs::remove_file(src.join("l2f")).unwrap();
    fs::write(src.join("l2f"), b"was a symlink").unwrap();
    fs::remove_dir_all(src.join("gone")).unwrap();
    fs::remove_file(src.join("del.txt")).unwrap();
    fs::write(src.join("small"), b"SAME SIZE").unwrap();
    let before = allocated(&dst.join("holes"));
    let st = p.pass(&mut s, false).unwrap();
    eprintln!("third pass: {st:?}");
    assert_same(&src, &dst);
    // gone, a, b, c, file, z; del.txt; d2f/sub, x, y; f2d, d2f and l2f changed kind.
    assert_eq!(st.deleted, 13, "{st:?}");
    assert!(
        allocated(&dst.join("holes")) <= before - MIB,
        "holes were not punched"
    );
    // The truncated and extended files went as deltas.
    assert!(st.bytes_sent < 4 * MIB, "{st:?}");

    // Metadata only: no data.
    chmod(&big, 0o600);
    let st = p.pass(&mut s, false).unwrap();
    assert_eq!((st.files_sent, st.bytes_sent), (1, 0), "{st:?}");
    assert_same(&src, &dst);

    // A hard-linked file's content changes: its three names stay one inode.
    pwrite(&src.join("hl2"), &[1u8; 1000], MIB + 5);
    let st = p.pass(&mut s, false).unwrap();
    assert!(st.bytes_sent <= 2 * (64 << 10), "{st:?}");
    assert_same(&src, &dst);

    // A new first name for the inode, and the old first name removed.
    fs::hard_link(src.join("hl2"), src.join("a-new-name")).unwrap();
    fs::remove_file(src.join("hl1")).unwrap();
    let st = p.pass(&mut s, true).unwrap();
    assert_eq!(st.deleted, 1, "{st:?}");
    assert_same(&src, &dst);
    assert_eq!(p.finish(&mut s).len(), 6);
}

#[test]
fn live_passes_under_a_writer_then_a_final_pass() {
    let t = scratch();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for d in 0..8 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..16 {
            let n = rng.below(200 << 10) as usize;
            fs::write(src.join(format!("d{d}/f{f}")), vec![(d * 16 + f) as u8; n]).unwrap();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let src = src.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(12345);
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                churn(&src, &mut rng);
                ops += 1;
                if ops % 8 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            ops
        })
    };
    let mut s = Sender::new(vec![src.clone()]);
    let mut p = Pair::start(vec![dst.clone()]);
    for _ in 0..4 {
        let st = p.pass(&mut s, false).unwrap();
        eprintln!("live pass: {st:?}");
        std::thread::sleep(Duration::from_millis(30));
    }
    stop.store(true, Ordering::Relaxed);
    let ops = writer.join().unwrap();
    let st = p.pass(&mut s, true).unwrap();
    eprintln!("final pass after {ops} writer operations: {st:?}");
    assert!(ops > 50, "the writer hardly ran ({ops} operations)");
    assert_same(&src, &dst);
    assert_eq!(p.finish(&mut s).len(), 5);
}

/// One random change to the tree (errors from racing with itself, like a
/// file already gone, are ignored).
fn churn(src: &Path, rng: &mut Rng) {
    let d = src.join(format!("d{}", rng.below(8)));
    let pick = |rng: &mut Rng, dir: &Path| -> Option<PathBuf> {
        let names: Vec<_> = fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        if names.is_empty() {
            None
        } else {
            Some(names[rng.below(names.len() as u64) as usize].clone())
        }
    };
    let f = d.join(format!("n{}", rng.below(40)));
    match rng.below(13) {
        0..=2 => {
            let n = rng.below(300 << 10) as usize;
            let _ = fs::write(&f, vec![rng.next() as u8; n]);
        }
        3 | 4 => {
            if let Some(p) = pick(rng, &d).filter(|p| p.is_file()) {
                if let Ok(fh) = fs::OpenOptions::new().write(true).open(&p) {
                    let len = fh.metadata().map(|m| m.len()).unwrap_or(0);
                    let _ =
                        sys::pwrite_all(fh.as_fd(), &[rng.next() as u8; 5000], rng.below(len + 1));
                }
            }
        }
        5 => {
            if let Some(p) = pick(rng, &d) {
                let _ = fs::remove_file(&p);
            }
        }
        6 => {
            if let Some(p) = pick(rng, &d).filter(|p| p.is_file()) {
                if let Ok(fh) = fs::OpenOptions::new().write(true).open(&p) {
                    let _ = fh.set_len(rng.below(400 << 10));
                }
            }
        }
        7 => {
            let s = d.join(format!("s{}", rng.below(4)));
            let _ = fs::create_dir_all(s.join("deeper"));
            let _ = fs::write(s.join("deeper/file"), vec![3u8; rng.below(10_000) as usize]);
        }
        8 => {
            let _ = fs::remove_dir_all(d.join(format!("s{}", rng.below(4))));
        }
        9 => {
            if let Some(p) = pick(rng, &d) {
                let _ = fs::rename(&p, &f);
            }
        }
        10 => {
            if let Some(p) = pick(rng, &d).filter(|p| p.is_file()) {
                let _ = fs::remove_file(&f);
                let _ = fs::hard_link(&p, &f);
            }
        }
        11 => {
            let _ = fs::remove_file(&f);
            let _ = symlink(format!("target-{}", rng.below(5)), &f);
        }
        _ => {
            if let Some(p) = pick(rng, &d).filter(|p| p.is_file()) {
                chmod(&p, 0o600 | (rng.below(0o100) as u32));
            }
        }
    }
}

#[test]
fn several_roots_and_xattr_changes() {
    let t = scratch();
    let (s1, s2) = (t.path().join("s1"), t.path().join("s2"));
    let (d1, d2) = (t.path().join("d1"), t.path().join("d2"));
    fs::create_dir_all(s1.join("x")).unwrap();
    fs::create_dir_all(&s2).unwrap();
    fs::write(s1.join("x/f"), b"one").unwrap();
    fs::write(s2.join("f"), b"two").unwrap();
    set_xattr(&s2.join("f"), "user.a", b"1");
    set_xattr(&s2.join("f"), "user.b", b"2");
    let mut s = Sender::new(vec![s1.clone(), s2.clone()]);
    let mut p = Pair::start(vec![d1.clone(), d2.clone()]);
    p.pass(&mut s, false).unwrap();
    assert_same(&s1, &d1);
    assert_same(&s2, &d2);
    remove_xattr(&s2.join("f"), "user.a");
    set_xattr(&s2.join("f"), "user.b", b"changed");
    set_xattr(&s1.join("x"), "trusted.new", b"dir attr");
    chmod(&s1.join("x"), 0o700);
    let st = p.pass(&mut s, true).unwrap();
    assert_eq!(st.bytes_sent, 0, "{st:?}");
    assert_same(&s1, &d1);
    assert_same(&s2, &d2);
    p.finish(&mut s);
}

#[test]
fn a_destination_changed_behind_our_back_is_refused_and_cleaned_up() {
    let t = scratch();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(&src).unwrap();
    pattern_file(&src.join("f"), 3 * MIB, 9);
    let mut s = Sender::new(vec![src.clone()]);
    let mut p = Pair::start(vec![dst.clone()]);
    p.pass(&mut s, false).unwrap();
    pwrite(&dst.join("f"), b"tampered", 2 * MIB);
    pwrite(&src.join("f"), b"changed", 100);
    let e = p.pass(&mut s, false).unwrap_err();
    assert!(
        matches!(e, FsyncError::Peer(ref m) if m.contains("changed behind phaul's back")),
        "{e}"
    );
    let theirs = p.join().unwrap_err();
    assert!(matches!(theirs, FsyncError::Changed { .. }), "{theirs}");
    let names: Vec<_> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![OsStr::new("f").to_owned()],
        "temporary file left behind"
    );
    // The sender does not go on after a failed pass.
    assert!(matches!(
        s.pass(&mut p.conn, false),
        Err(FsyncError::Poisoned)
    ));
}

#[test]
fn a_missing_source_root_is_a_clear_error() {
    let t = scratch();
    let mut s = Sender::new(vec![t.path().join("nope")]);
    let (mut a, _b) = UnixStream::pair().unwrap();
    let e = s.pass(&mut a, false).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("No such file"), "{e}");
    assert!(Receiver::new(vec![PathBuf::from("relative")]).is_err());
}

fn meta() -> Meta {
    Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    }
}

fn b(s: &str) -> Bytes {
    Bytes(s.as_bytes().to_vec())
}

fn file(path: &str) -> Vec<FsMsg> {
    vec![
        FsMsg::File {
            root: 0,
            path: b(path),
            size: 6,
            delta: false,
        },
        FsMsg::Data {
            offset: 0,
            data: b("pwned\n"),
        },
        FsMsg::FileEnd {
            meta: meta(),
            hash: 0,
        },
    ]
}

fn symlink_msg(path: &str, target: &str) -> FsMsg {
    FsMsg::Symlink {
        root: 0,
        path: b(path),
        target: b(target),
        meta: meta(),
    }
}

/// Plays a hand-written sender against a receiver; returns the
/// receiver's error and what the sender was told, after checking that
/// nothing outside the root changed and no temporary file is left.
fn hostile(msgs: impl FnOnce(&Path) -> Vec<FsMsg>) -> (FsyncError, String) {
    let t = scratch();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), b"precious").unwrap();
    let (mut a, mut bsock) = UnixStream::pair().unwrap();
    let r = root.clone();
    let h = std::thread::spawn(move || Receiver::new(vec![r])?.serve(&mut bsock));
    let msgs = msgs(&outside);
    {
        let mut w = FrameWriter::new(&mut a);
        let _ = w.write(&FsMsg::Begin {
            pass: 1,
            final_pass: false,
            roots: 1,
        });
        for m in &msgs {
            let _ = w.write(m);
        }
        let _ = w.write(&FsMsg::End {
            files_scanned: 0,
            files_sent: 0,
            bytes_sent: 0,
            deleted: 0,
        });
    }
    let told = match FrameReader::new(&mut a).read::<FsMsg>() {
        Ok(FsMsg::Error(m)) => m,
        other => panic!("the receiver did not send an error frame: {other:?}"),
    };
    let err = h.join().unwrap().unwrap_err();
    let outside_now: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        outside_now,
        vec![OsStr::new("keep").to_owned()],
        "outside was touched"
    );
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"precious");
    for e in walkdir::WalkDir::new(t.path()) {
        let e = e.unwrap();
        let n = e.file_name().as_bytes();
        assert!(
            !n.starts_with(b".phaul-tmp-"),
            "temporary file left: {}",
            e.path().display()
        );
        assert_ne!(n, b"pwned", "{}", e.path().display());
    }
    (err, told)
}

#[track_caller]
fn assert_unsafe((err, told): (FsyncError, String), path: &str) {
    match &err {
        FsyncError::Unsafe { path: p, .. } => assert_eq!(p, path, "{err}"),
        other => panic!("expected Unsafe for {path}, got {other}"),
    }
    assert!(told.contains("unsafe path"), "{told}");
}

#[test]
fn hostile_paths_are_refused() {
    assert_unsafe(hostile(|_| file("../escape")), "../escape");
    let abs = Arc::new(std::sync::Mutex::new(String::new()));
    let abs2 = abs.clone();
    let r = hostile(move |out| {
        let p = format!("{}/pwned", out.display());
        *abs2.lock().unwrap() = p.clone();
        file(&p)
    });
    let p = abs.lock().unwrap().clone();
    assert_unsafe(r, &p);
    assert_unsafe(
        hostile(|_| {
            vec![FsMsg::Dir {
                root: 7,
                path: b("x"),
                meta: meta(),
            }]
        }),
        "x",
    );
    assert_unsafe(
        hostile(|_| {
            let mut v = vec![FsMsg::Dir {
                root: 0,
                path: b("a"),
                meta: meta(),
            }];
            v.extend(file("a/../../x"));
            v
        }),
        "a/../../x",
    );
    assert_unsafe(hostile(|_| file("a\0b")), "a\0b");
    assert_unsafe(hostile(|_| file("a//b")), "a//b");
    assert_unsafe(hostile(|_| file("./x")), "./x");
    assert_unsafe(
        hostile(|_| {
            vec![FsMsg::Delete {
                root: 0,
                path: b("../outside/keep"),
            }]
        }),
        "../outside/keep",
    );
}

#[test]
fn hostile_symlinks_are_never_followed() {
    // A symlink to the outside directory, then a file through it.
    assert_unsafe(
        hostile(|out| {
            let mut v = vec![symlink_msg("link", &out.display().to_string())];
            v.extend(file("link/pwned"));
            v
        }),
        "link/pwned",
    );
    // A relative symlink climbing out, then entries through it.
    assert_unsafe(
        hostile(|_| {
            vec![
                symlink_msg("up", "../outside"),
                FsMsg::Dir {
                    root: 0,
                    path: b("up/pwned"),
                    meta: meta(),
                },
            ]
        }),
        "up/pwned",
    );
    assert_unsafe(
        hostile(|_| vec![symlink_msg("up", "../.."), symlink_msg("up/pwned", "x")]),
        "up/pwned",
    );
    // Deleting or hard-linking through a planted symlink.
    assert_unsafe(
        hostile(|_| {
            vec![
                symlink_msg("link", "../outside"),
                FsMsg::Delete {
                    root: 0,
                    path: b("link/keep"),
                },
            ]
        }),
        "link/keep",
    );
    assert_unsafe(
        hostile(|_| {
            vec![
                symlink_msg("link", "../outside"),
                FsMsg::Link {
                    root: 0,
                    path: b("stolen"),
                    target: b("link/keep"),
                },
            ]
        }),
        "link/keep",
    );
    // A hard link whose target is outside.
    assert_unsafe(
        hostile(|_| {
            vec![FsMsg::Link {
                root: 0,
                path: b("stolen"),
                target: b("../outside/keep"),
            }]
        }),
        "../outside/keep",
    );
    // Replacing a planted symlink is fine: it is the symlink that goes.
    let (err, _) = hostile(|_| {
        let mut v = vec![
            symlink_msg("link", "../outside"),
            FsMsg::Dir {
                root: 0,
                path: b("link"),
                meta: meta(),
            },
        ];
        v.extend(file("link/ok"));
        v.push(FsMsg::Dir {
            root: 9,
            path: b(""),
            meta: meta(),
        });
        v
    });
    assert!(matches!(err, FsyncError::Unsafe { .. }), "{err}");
}

#[test]
fn protocol_violations_end_the_session_cleanly() {
    // Data outside a file.
    let (err, told) = hostile(|_| {
        vec![FsMsg::Data {
            offset: 0,
            data: b("x"),
        }]
    });
    assert!(matches!(err, FsyncError::Protocol(_)), "{err}");
    assert!(told.contains("Data outside a file"), "{told}");
    // A file left incomplete: its temporary file is removed (checked by hostile()).
    let (err, _) = hostile(|_| {
        let mut v = file("f");
        v.pop();
        v.push(FsMsg::Attr {
            root: 0,
            path: b("f"),
            kind: EntryKind::File,
            meta: meta(),
        });
        v
    });
    assert!(err.to_string().contains("incomplete"), "{err}");
    // Data beyond the announced size.
    let (err, _) = hostile(|_| {
        vec![
            FsMsg::File {
                root: 0,
                path: b("f"),
                size: 2,
                delta: false,
            },
            FsMsg::Data {
                offset: 1,
                data: b("xyz"),
            },
        ]
    });
    assert!(err.to_string().contains("beyond"), "{err}");
    // Counts that do not match.
    let (err, _) = hostile(|_| file("f"));
    assert!(err.to_string().contains("counted"), "{err}");
}

#[test]
fn the_sender_never_reads_through_a_symlink_swapped_in_during_a_pass() {
    let t = scratch();
    let (src, dst, outside) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("outside"),
    );
    fs::create_dir_all(src.join("d/sub")).unwrap();
    fs::write(src.join("d/f"), b"inside").unwrap();
    fs::write(src.join("d/sub/g"), b"inside too").unwrap();
    fs::write(src.join("top"), b"top").unwrap();
    // The same names outside, with secrets in them.
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("f"), b"SECRET").unwrap();
    fs::write(outside.join("sub/g"), b"SECRET").unwrap();
    set_xattr(&outside.join("f"), "user.secret", b"SECRET");
    let mut s = Sender::new(vec![src.clone()]);
    // After the walk saw d as a directory, the workload swaps it for a
    // symlink to the outside directory.
    let (srcc, outc) = (src.clone(), outside.clone());
    s.after_scan = Some(Box::new(move || {
        if srcc.join("d").is_dir() && !srcc.join("d").is_symlink() {
            fs::rename(srcc.join("d"), srcc.join("d.old")).unwrap();
            symlink(&outc, srcc.join("d")).unwrap();
        }
    }));
    let mut p = Pair::start(vec![dst.clone()]);
    let st = p.pass(&mut s, false).unwrap();
    eprintln!("{st:?}");
    for e in walkdir::WalkDir::new(&dst) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            assert_ne!(
                fs::read(e.path()).unwrap(),
                b"SECRET",
                "{} leaked",
                e.path().display()
            );
        }
    }
    assert!(
        !dst.join("d").exists(),
        "d was sent though it is no longer a directory of the tree"
    );
    assert_eq!(fs::read(dst.join("top")).unwrap(), b"top");
    // The next pass sees the tree as it now is.
    s.after_scan = None;
    p.pass(&mut s, true).unwrap();
    assert_same(&src, &dst);
    assert!(dst.join("d").is_symlink());
    p.finish(&mut s);
}

#[test]
fn a_delta_onto_a_fifo_or_device_node_never_opens_it() {
    // Found while writing the fsync_receiver fuzz target: a delta `File`
    // onto a name that an earlier message had made a device node opened
    // the node (read-only) before looking at what it was, and opening a
    // device can act (a watchdog starts, a tape rewinds). Seen here with a
    // FIFO: opening it for reading wakes a writer blocked in open(2).
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let fifo = root.join("f");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let opened = Arc::new(AtomicBool::new(false));
    let writer = {
        let (fifo, opened) = (fifo.clone(), opened.clone());
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(&fifo);
            opened.store(true, Ordering::SeqCst);
            f
        })
    };
    // Let the writer block in open.
    std::thread::sleep(Duration::from_millis(100));
    let (mut a, mut bsock) = UnixStream::pair().unwrap();
    {
        let mut w = FrameWriter::new(&mut a);
        w.write(&FsMsg::Begin {
            pass: 2,
            final_pass: false,
            roots: 1,
        })
        .unwrap();
        w.write(&FsMsg::File {
            root: 0,
            path: b("f"),
            size: 6,
            delta: true,
        })
        .unwrap();
    }
    let err = Receiver::new(vec![root.clone()])
        .unwrap()
        .serve(&mut bsock)
        .unwrap_err();
    assert!(matches!(err, FsyncError::Changed { .. }), "{err}");
    std::thread::sleep(Duration::from_millis(100));
    let woke = opened.load(Ordering::SeqCst);
    // Release the writer (a reader of our own), then check.
    let _reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    writer.join().unwrap().unwrap();
    assert!(!woke, "the receiver opened the FIFO");
}
