//! Between hosts: mutual TLS on every connection, and a destination that
//! accepts only the peers it should. The "other host" is a network
//! namespace joined to this one by a veth pair the test creates (private
//! addresses on that veth only); refusals are checked on loopback, where
//! any local user could otherwise reach the service.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use phaul_tests::harness::{ip, migrate, setup, wait_for, Migration, Serve, Workload};
use phaul_tests::pki::pki;
use phaul_tests::plugin_dir;

const PID: &[(&str, &str)] = &[("phaul_pid", "libphaul_pid.so")];

/// A network namespace reached over a veth pair: 10.252.T.1 here,
/// 10.252.T.2 there. Removed (with its veth) on drop.
struct OtherHost {
    ns: String,
    addr: String,
}

impl OtherHost {
    fn new() -> OtherHost {
        let tag = std::process::id() % 200 + 20;
        let ns = format!("phaul-t{tag}");
        let (here, there) = (format!("phth{tag}"), format!("phtd{tag}"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let h = OtherHost {
            ns: ns.clone(),
            addr: format!("10.252.{tag}.2"),
        };
        ip(&[
            "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("10.252.{tag}.1/30"), "dev", &here]);
        ip(&["link", "set", &here, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/30", h.addr),
            "dev",
            &there,
        ]);
        ip(&["-n", &ns, "link", "set", &there, "up"]);
        h
    }

    fn net_ns_inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.ns))
            .unwrap()
            .ino()
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn net_ns_of(pid: i32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

#[test]
fn a_live_migration_over_mutual_tls_reaches_a_service_on_another_host() {
    if !setup() {
        return;
    }
    let other = OtherHost::new();
    let serve = Serve::start_on(
        &["ip", "netns", "exec", &other.ns],
        PID,
        &format!("{}:0", other.addr),
        &["--allow-peer", "src"],
        None,
    );
    let mut w = Workload::spawn(&["--mem-mib", "64", "--dirty-pct", "5"]);
    let before = w.report();
    let src = plugin_dir(PID);
    // The destination's certificate names it `dst` (and 10.252.x.y is not
    // among its addresses): the source checks that name.
    let (out, json) = migrate(
        src.path(),
        "pid",
        w.pid,
        &serve.addr,
        &["--peer-name", "dst"],
    );
    assert_eq!(out.status.code(), Some(0), "migrated");
    let r = json.unwrap();
    assert!(
        r["transport"].as_str().unwrap().starts_with("mutual TLS"),
        "{r}"
    );
    let pid = r["destination_pid"].as_i64().unwrap() as i32;
    assert_eq!(
        net_ns_of(pid),
        other.net_ns_inode(),
        "the copy runs on the other host"
    );
    w.moved_to(pid);
    let after = w.report();
    w.assert_intact(&after);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(after["pages_verified"].as_u64().unwrap() >= 64 * 256);
    // Without --peer-name the source expects the address in the
    // certificate, and stops before anything is frozen.
    let again = Workload::spawn(&["--mem-mib", "8"]);
    let (out, _) = migrate(src.path(), "pid", again.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--peer-name"), "{stderr}");
    again.assert_intact(&again.report());
}

/// Runs `phaul migrate` of `w` to `serve` with `extra`; requires a refusal
/// before anything froze (empty source journal), saying each of `expect`,
/// with the workload untouched and nothing recorded on the destination.
fn refused(w: &Workload, serve: &Serve, extra: &[&str], expect: &[&str]) {
    let before = w.report();
    let journal = tempfile::tempdir().unwrap();
    let mut args = vec!["--journal-dir", journal.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    let src = plugin_dir(PID);
    let (out, json) = migrate(src.path(), "pid", w.pid, &serve.addr, &args);
    assert_eq!(out.status.code(), Some(3), "refused: {extra:?}");
    let json = json.expect("--json failure");
    assert_eq!(
        (json["error"].as_str(), json["phase"].as_str()),
        (Some("refused"), Some("preflight"))
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for e in expect {
        assert!(
            stderr.contains(e),
            "{extra:?}: the message says {e:?}: {stderr}"
        );
    }
    assert_eq!(std::fs::read_dir(journal.path()).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(serve.journal.path()).unwrap().count(),
        0,
        "the destination recorded no session"
    );
    let after = w.report();
    w.assert_intact(&after);
    assert_eq!(after["pid"], before["pid"]);
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
}

#[test]
fn peers_without_the_right_certificate_are_refused_before_anything_freezes() {
    if !setup() {
        return;
    }
    let p = pki();
    let log = tempfile::NamedTempFile::new().unwrap();
    let serve = Serve::start_on(
        &[],
        PID,
        "127.0.0.1:0",
        &["--allow-peer", "src"],
        Some(log.path()),
    );
    let w = Workload::spawn(&["--mem-mib", "16"]);
    let tls = |d: &std::path::Path| d.to_str().unwrap().to_string();
    // A certificate from another CA.
    let rogue = tls(&p.rogue);
    refused(
        &w,
        &serve,
        &["--tls-dir", &rogue],
        &[
            "rejected this host's certificate",
            "what to do:",
            "--allow-peer",
        ],
    );
    // The right CA, a name the service does not allow.
    let stranger = tls(&p.stranger);
    refused(
        &w,
        &serve,
        &["--tls-dir", &stranger],
        &["\"stranger\"", "accepts only [\"src\"]", "--allow-peer"],
    );
    // Plain TCP to a TLS service.
    refused(
        &w,
        &serve,
        &["--insecure"],
        &["the peer answered in TLS", "--tls-dir"],
    );
    // A TLS client with no certificate at all (openssl's).
    let addr = serve.addr.clone();
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr, "-tls1_3", "-CAfile"])
        .arg(p.ca.join("ca.pem"))
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CONNECTED"),
        "openssl reached the service"
    );
    // The service refuses it in the handshake (openssl may be gone before
    // it reads the alert, so the service's log is the witness).
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(
            log.path()
        )
        .unwrap()
        .contains("peer sent no certificates")),
        "{}",
        std::fs::read_to_string(log.path()).unwrap()
    );
    // And the service still works for the right peer.
    let mut w = w;
    let (out, json) = migrate(plugin_dir(PID).path(), "pid", w.pid, &serve.addr, &[]);
    assert_eq!(out.status.code(), Some(0));
    w.moved_to(json.unwrap()["destination_pid"].as_i64().unwrap() as i32);
    w.assert_intact(&w.report());
}

/// The bytes a source sends first: the preamble and a well-formed `Hello`
/// (a dry run of a restart-mode migration, so even if it were accepted
/// nothing would be restored or started).
fn hello_bytes() -> Vec<u8> {
    use phaul_core::proto::{FrameWriter, Hello, MigrationMode, Msg};
    let hello = Hello {
        session: 0x5eed_0000_0000_0001,
        phaul_version: phaul_core::PHAUL_VERSION.into(),
        abi_version: phaul_core::ABI_VERSION.into(),
        criu_version: None,
        htype: "pid".into(),
        id: "1".into(),
        mode: MigrationMode::Restart,
        options: Vec::new(),
        cpuinfo: Vec::new(),
        need_bytes: 0,
        force: false,
        tcp_established: false,
        keep_images: false,
        fs_roots: Vec::new(),
        no_start: true,
        pids: Vec::new(),
        bound: Vec::new(),
        dry_run: true,
        post_copy: false,
        source_facts: Vec::new(),
    };
    let mut v = Vec::new();
    phaul_core::proto::write_preamble(&mut v).unwrap();
    FrameWriter::new(&mut v)
        .write(&Msg::Hello(Box::new(hello)))
        .unwrap();
    v
}

/// Sends `bytes` to `addr` as `uid` (through bash's /dev/tcp) and returns
/// what came back within a few seconds.
fn send_as(uid: Option<u32>, addr: &str, bytes: &std::path::Path) -> Vec<u8> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port}; cat '{}' >&3; timeout 5 cat <&3",
        bytes.display()
    );
    let mut cmd = match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                &format!("--regid={u}"),
                "--clear-groups",
                "bash",
                "-c",
                &script,
            ]);
            c
        }
        None => {
            let mut c = Command::new("bash");
            c.args(["-c", &script]);
            c
        }
    };
    cmd.output().expect("send bytes").stdout
}

#[test]
fn a_local_user_who_is_not_root_cannot_cause_a_restore_or_a_start() {
    if !setup() {
        return;
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    let serve = Serve::start_on(&[], PID, "127.0.0.1:0", &["--insecure"], Some(log.path()));
    let dir = tempfile::tempdir().unwrap();
    let bytes = dir.path().join("hello");
    std::fs::write(&bytes, hello_bytes()).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&bytes, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // As nobody: the plain-TCP service sees a socket that is not root's,
    // and closes it without a word.
    let answer = send_as(Some(65534), &serve.addr, &bytes);
    assert!(answer.is_empty(), "nobody got an answer: {answer:?}");
    assert!(wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(log.path())
            .unwrap()
            .contains("belongs to uid 65534, not root")
    }));
    // The same bytes from root are a well-formed request the service
    // answers (so the refusal above was the uid, not the bytes).
    let answer = send_as(None, &serve.addr, &bytes);
    assert!(!answer.is_empty(), "root is answered");
    assert_eq!(
        std::fs::read_dir(serve.journal.path()).unwrap().count(),
        0,
        "no session was recorded"
    );
    // Over TLS, nobody cannot even use a host's identity: it is root's.
    let tls = Serve::start(PID, &[]);
    let w = Workload::spawn(&["--mem-mib", "8"]);
    // A plugin directory nobody can read (tests' temporary directories
    // may sit where nobody cannot look).
    let plugins = phaul_tests::harness::shm_dir("nobody-plugins");
    std::fs::copy(
        phaul_tests::plugin("phaul_pid"),
        plugins.path().join("libphaul_pid.so"),
    )
    .unwrap();
    std::fs::set_permissions(
        plugins.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(phaul_tests::bin("phaul"))
        .arg("--plugin-dir")
        .arg(plugins.path())
        .args([
            "migrate",
            "pid",
            &w.pid.to_string(),
            "--to",
            &tls.addr,
            "--tls-dir",
        ])
        .arg(&pki().src)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It cannot read the host's TLS files (root's), so it cannot connect.
    let error = stderr
        .lines()
        .find(|l| l.starts_with("phaul: error:"))
        .unwrap_or_default();
    assert!(
        error.contains(&format!("cannot read {}", pki().src.display()))
            && error.matches("Permission denied").count() == 1,
        "{stderr}"
    );
    w.assert_intact(&w.report());
}

#[test]
fn idle_trickling_and_thousands_of_clients_do_not_keep_a_migration_out() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &[]);
    // More idle connections than the service keeps in their handshake,
    // and some that trickle bytes.
    let idle: Vec<_> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&serve.addr).ok())
        .collect();
    let trickle: Vec<_> = (0..8)
        .filter_map(|_| std::net::TcpStream::connect(&serve.addr).ok())
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let trickler = std::thread::spawn(move || {
        let mut trickle = trickle;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            for t in &mut trickle {
                let _ = t.write_all(&[0x16]);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // Thousands of connections that come and go.
    for _ in 0..3000 {
        if let Ok(mut c) = std::net::TcpStream::connect(&serve.addr) {
            let _ = c.write_all(b"\x16\x03\x01\x00\x05hello");
        }
    }
    // A legitimate migration still gets in, at once.
    let mut w = Workload::spawn(&["--mem-mib", "16"]);
    let t = Instant::now();
    let (out, json) = migrate(plugin_dir(PID).path(), "pid", w.pid, &serve.addr, &[]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(0), "migrated");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    w.moved_to(json.unwrap()["destination_pid"].as_i64().unwrap() as i32);
    w.assert_intact(&w.report());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
    // The idle ones were closed by the service (evicted, or at the
    // handshake deadline).
    let closed = idle
        .into_iter()
        .filter(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            matches!(c.read(&mut [0u8; 16]), Ok(0) | Err(_))
        })
        .count();
    assert_eq!(closed, 300);
}

#[test]
fn max_concurrent_lets_two_migrations_run_at_once() {
    if !setup() {
        return;
    }
    let serve = Serve::start(PID, &["--max-concurrent", "2"]);
    let src = plugin_dir(PID);
    let mut ws: Vec<Workload> = (0..2)
        .map(|_| Workload::spawn(&["--mem-mib", "96", "--dirty-pct", "2"]))
        .collect();
    let journals: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut ms: Vec<Migration> = ws
        .iter()
        .zip(&journals)
        .map(|(w, j)| Migration::start(src.path(), "pid", w.pid, &serve.addr, j.path(), &[], None))
        .collect();
    for (w, m) in ws.iter_mut().zip(&mut ms) {
        let st = m.wait_timeout(Duration::from_secs(60)).expect("finished");
        assert!(st.success(), "{:?}", m.json());
        let j = m.json().unwrap();
        w.moved_to(j["destination_pid"].as_i64().unwrap() as i32);
        w.assert_intact(&w.report());
    }
}
