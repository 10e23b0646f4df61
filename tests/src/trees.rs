//! Building and comparing directory trees for the file-sync tests: a tree
//! with every kind of file, and a comparison of two trees by everything
//! phaul promises to preserve (type, mode, owner, size, mtime, content,
//! symlink target, device number, xattrs, hard-link structure).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Extended attributes of `p` (not following symlinks), sorted.
pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: valid buffers and a NUL-terminated path.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut val = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m >= 0 {
            val.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), val);
        }
    }
    out
}

/// Sets an extended attribute without following symlinks.
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid pointers.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "lsetxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// One line per path describing everything that must match, plus the
/// hard-link groups. Two trees are equal when their descriptions are.
pub fn describe(root: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = Vec::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name().min_depth(1) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        let m = e.path().symlink_metadata().unwrap();
        let ft = m.file_type();
        let what = if ft.is_symlink() {
            format!(
                "link -> {}",
                std::fs::read_link(e.path()).unwrap().display()
            )
        } else if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_file() {
            let data = std::fs::read(e.path()).unwrap();
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
            format!("file {} bytes, hash {:016x}", data.len(), fnv(&data))
        } else {
            format!("special rdev {}", m.rdev())
        };
        let mtime = if ft.is_dir() {
            // Directory mtimes are set after their contents; compare to the second.
            format!("{}", m.mtime())
        } else {
            format!("{}.{:09}", m.mtime(), m.mtime_nsec())
        };
        lines.push(format!(
            "{rel}: {what}, mode {:o}, owner {}:{}, mtime {mtime}, xattrs {:?}",
            m.mode(),
            m.uid(),
            m.gid(),
            xattrs(e.path())
        ));
    }
    let mut links: Vec<Vec<String>> = inodes.into_values().filter(|v| v.len() > 1).collect();
    links.sort();
    (lines, links)
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Asserts that two trees are identical in every preserved respect.
pub fn assert_same(a: &Path, b: &Path) {
    let (la, ka) = describe(a);
    let (lb, kb) = describe(b);
    for (x, y) in la.iter().zip(lb.iter()) {
        assert_eq!(x, y, "trees differ ({} vs {})", a.display(), b.display());
    }
    assert_eq!(
        la.len(),
        lb.len(),
        "trees have different entries: {la:#?} vs {lb:#?}"
    );
    assert_eq!(ka, kb, "hard-link structure differs");
}

/// Fills `dir` with every kind of file phaul preserves.
pub fn every_kind(dir: &Path) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("plain.txt"), b"hello\n").unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("sub/deeper/data.bin"), vec![7u8; 300_000]).unwrap();
    symlink("plain.txt", dir.join("rel-link")).unwrap();
    symlink("/nonexistent/target", dir.join("dangling")).unwrap();
    std::fs::write(dir.join("hard-a"), b"linked\n").unwrap();
    std::fs::hard_link(dir.join("hard-a"), dir.join("sub/hard-b")).unwrap();
    let setuid = dir.join("setuid");
    std::fs::write(&setuid, b"#!/bin/true\n").unwrap();
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(
        dir.join("plain.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::lchown(dir.join("plain.txt"), Some(1234), Some(5678)).unwrap();
    set_xattr(&dir.join("plain.txt"), "user.phaul", b"yes");
    set_xattr(&dir.join("sub"), "trusted.phaul", b"dir attr");
    // A sparse file: 32 MiB with two small data regions.
    let f = std::fs::File::create(dir.join("sparse")).unwrap();
    f.set_len(32 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"start", 0).unwrap();
    f.write_all_at(b"middle", 16 << 20).unwrap();
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain mknod calls with valid paths.
    unsafe {
        assert_eq!(
            libc::mknod(c(&dir.join("fifo")).as_ptr(), libc::S_IFIFO | 0o644, 0),
            0
        );
        assert_eq!(
            libc::mknod(
                c(&dir.join("null")).as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3)
            ),
            0
        );
    }
}
