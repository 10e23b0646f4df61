//! Helpers for reading `/proc/PID/mountinfo`, which drivers that map a
//! workload's mounts (external bind mounts, cgroup mounts) need alike.
//! Plain Rust, compiled into each plugin: not part of the ABI.

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011` for a tab,
/// `\012` for a newline, `\134` for a backslash) in a mount point or root.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_are_undone_and_the_rest_kept() {
        assert_eq!(super::unescape(r"/srv/my\040data\134x"), r"/srv/my data\x");
        assert_eq!(super::unescape(r"/a\04"), r"/a\04");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
