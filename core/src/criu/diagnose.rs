//! Reading a failed CRIU run's log the way a person would: the line that
//! says what failed (not the first line with "Error" — on these machines
//! that is the harmless `RLIMIT_NOFILE` complaint every run logs — and not
//! the summaries CRIU prints on the way out), and phaul's explanation of
//! the failures it knows, with what to do.

use std::path::Path;

/// Error lines that never explain a failure: harmless complaints, and the
/// summaries CRIU logs while unwinding after the real error.
const NOT_THE_CAUSE: &[&str] = &[
    "RLIMIT_NOFILE",
    "Dumping FAILED",
    "Restoring FAILED",
    "Pre-dumping FAILED",
    "failed with -1",
    "One of more action scripts failed",
    "Script ",
    "RPC client reported script error",
    "Aborting restore due to",
    "Unable to connect a transport socket",
];

/// Drops CRIU's `(00.123456) ` timestamp and `Error (file.c:123): `
/// prefix.
fn strip(line: &str) -> String {
    let mut l = line.trim();
    if l.starts_with('(') {
        if let Some(i) = l.find(") ") {
            l = l[i + 2..].trim_start();
        }
    }
    if let Some(rest) = l.strip_prefix("Error (") {
        if let Some(i) = rest.find("): ") {
            return rest[i + 3..].trim().to_string();
        }
    }
    l.to_string()
}

/// The line of a CRIU log that says what failed: the first error that is
/// not a harmless complaint or an unwinding summary (the last error line
/// if every one is).
pub fn failing_line(text: &str) -> Option<String> {
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error (")).collect();
    errors
        .iter()
        .find(|l| !NOT_THE_CAUSE.iter().any(|n| l.contains(n)))
        .or_else(|| errors.iter().rev().find(|l| !l.contains("RLIMIT_NOFILE")))
        .map(|l| strip(l))
}

/// [`failing_line`] of the log file at `path`.
pub fn failing_line_in(path: &Path) -> Option<String> {
    failing_line(&std::fs::read_to_string(path).ok()?)
}

/// phaul's explanation of a CRIU failure it recognises, with what to do.
pub fn hint(line: &str, errno: Option<i32>) -> Option<String> {
    let l = line.to_ascii_lowercase();
    if l.contains("can't fork for") || (l.contains("fork") && errno == Some(libc::EEXIST)) {
        let pid = line
            .split_whitespace()
            .find_map(|w| w.trim_end_matches(':').parse::<i32>().ok());
        return Some(format!(
            "the process id{} is already in use on the destination: CRIU restores the \
             same pids, so a tree in the host PID namespace needs them free there (a workload \
             in its own PID namespace, as containers are, does not have this limit)",
            pid.map(|p| format!(" {p}")).unwrap_or_default()
        ));
    }
    if l.contains("address already in use") || errno == Some(libc::EADDRINUSE) {
        return Some(
            "an address the workload listens on or is bound to is in use on the destination: \
             stop what uses it there, or give the workload its own network namespace"
                .into(),
        );
    }
    if l.contains("file locks") || l.contains("file_locks") {
        return Some(
            "the workload holds file locks: they migrate by default; run without \
             -o file-locks=false"
                .into(),
        );
    }
    if l.contains("external socket") || l.contains("ext-unix-sk") || l.contains("extern unix") {
        return Some(
            "the workload has a unix socket connected to a process outside the tree: \
             -o ext-unix-sk lets it migrate (the peer must reconnect), or migrate the peer too"
                .into(),
        );
    }
    if l.contains("tty") || l.contains("shell-job") || l.contains("session leader") {
        return Some(
            "the workload uses a terminal or session that is not its own (started from a \
             shell?): -o shell-job migrates it with its terminal, or start it detached \
             (setsid, stdio redirected)"
                .into(),
        );
    }
    if l.contains("lookup mount") || (l.contains("mnt") && l.contains("no mapping")) {
        return Some(
            "a file or mount of the workload lies on a mount CRIU does not handle: declare it \
             external (-o external=mnt[PATH]:KEY) or let the workload run in its own mount \
             namespace"
                .into(),
        );
    }
    if l.contains("ghost") && l.contains("limit") {
        return Some(
            "the workload holds a large deleted file open: -o ghost-limit=BYTES raises the limit \
             for copying it"
                .into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP_LOG: &str = "\
(00.000870) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.010000) Warn  (criu/x.c:1): something harmless
(00.020000) Error (criu/files-reg.c:1790): Can't lookup mount=24 for fd=0 path=/dev/null
(00.020100) Error (criu/cr-dump.c:1545): Dump files (pid: 12445) failed with -1
(00.030000) Error (criu/cr-dump.c:1975): Dumping FAILED.
";

    #[test]
    fn the_failing_line_is_the_cause_not_the_rlimit_complaint_or_the_summary() {
        assert_eq!(
            failing_line(DUMP_LOG).as_deref(),
            Some("Can't lookup mount=24 for fd=0 path=/dev/null")
        );
        let only_summary = "(0.1) Error (criu/util.c:1): rlimit: Can't setup RLIMIT_NOFILE\n\
                            (0.2) Error (criu/cr-dump.c:1975): Dumping FAILED.\n";
        assert_eq!(
            failing_line(only_summary).as_deref(),
            Some("Dumping FAILED.")
        );
        assert_eq!(failing_line("(0.1) Info: all good\n"), None);
    }

    #[test]
    fn extra_spaces_after_the_timestamp_do_not_keep_the_prefix() {
        // Found by the criu_rpc fuzz target: the `Error (file:line): `
        // prefix and a leading space stayed when two spaces followed the
        // timestamp.
        assert_eq!(
            failing_line("(00.02000)  Error (criu/cr-restore.c:1): Can't fork for 4242\n")
                .as_deref(),
            Some("Can't fork for 4242")
        );
    }

    #[test]
    fn known_failures_get_an_explanation() {
        let h = hint("Can't fork for 4242: File exists", Some(libc::EEXIST)).unwrap();
        assert!(h.contains("4242") && h.contains("PID namespace"), "{h}");
        assert!(hint("Can't lookup mount=24 for fd=0 path=/dev/null", None)
            .unwrap()
            .contains("external"));
        assert!(hint("bind: Address already in use", None)
            .unwrap()
            .contains("in use"));
        assert!(hint("something new", None).is_none());
    }
}
