//! A TCP server with a connected client migrates with `--tcp-established`:
//! the client (outside the migrated tree) keeps its connection, every
//! request is answered correctly, none is lost.
//!
//! Source and destination are on one machine, so the workload runs like a
//! container: its own PID and network namespaces, joined by a veth pair to
//! a bridge the test creates in the host namespace, where the client runs.
//! While the source copy is frozen (not yet killed) the restored copy gets
//! its own network namespace with the same address and a new host-side veth
//! on the same bridge (`-o veth=eth0=NEW@BRIDGE`). The test creates and
//! removes all of this itself; no traffic leaves the machine.

use std::process::Command;
use std::time::Duration;

use phaul_tests::harness::{alive, ip, migrate, reap, setup, tcp_client, wait_for, Workload};
use phaul_tests::plugin_dir;

/// The test's own bridge, removed on drop.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
fn established_tcp_connection_survives_the_migration() {
    if !setup() {
        return;
    }
    let tag = std::process::id() % 200 + 20;
    let br = format!("phbr{tag}");
    let (host_a, host_b) = (format!("phva{tag}"), format!("phvb{tag}"));
    let (gw, addr) = (format!("10.251.{tag}.1"), format!("10.251.{tag}.2"));
    let _ = Command::new("ip").args(["link", "del", &br]).output();
    ip(&["link", "add", &br, "type", "bridge"]);
    let _bridge = Bridge(br.clone());
    // A fixed MAC: otherwise the bridge takes its lowest port's, which
    // changes when the source's port goes away.
    ip(&[
        "link",
        "set",
        &br,
        "address",
        &format!("02:00:0a:fb:{:02x}:01", tag),
    ]);
    ip(&["addr", "add", &format!("{gw}/24"), "dev", &br]);
    ip(&["link", "set", &br, "up"]);

    let mut w = Workload::spawn_with(
        &["--pidns", "--netns"],
        &["--mem-mib", "8", "--tcp-listen", "0.0.0.0:7777"],
    );
    let pid = w.pid.to_string();
    ip(&[
        "link", "add", &host_a, "type", "veth", "peer", "name", "eth0", "netns", &pid,
    ]);
    ip(&["link", "set", &host_a, "master", &br, "up"]);
    let inside =
        format!("ip link set lo up && ip addr add {addr}/24 dev eth0 && ip link set eth0 up");
    let out = Command::new("nsenter")
        .args(["-t", &pid, "-n", "sh", "-c", &inside])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let serve = phaul_tests::harness::Serve::start(&[("phaul_pid", "libphaul_pid.so")], &[]);
    let report_file = w.state.join("tcp-client.json");
    let mut client = tcp_client(&format!("{addr}:7777"), 6000, &report_file);
    assert!(
        wait_for(Duration::from_secs(10), || w.report()["tcp_requests"]
            .as_u64()
            .unwrap_or(0)
            > 50),
        "the client talks to the workload before the migration"
    );

    let src = plugin_dir(&[("phaul_pid", "libphaul_pid.so")]);
    let old = w.pid;
    let veth = format!("veth=eth0={host_b}@{br}");
    let (out, json) = migrate(
        src.path(),
        "pid",
        old,
        &serve.addr,
        &["--tcp-established", "-o", &veth],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "migration with --tcp-established failed"
    );
    let new = json.unwrap()["destination_pid"].as_i64().unwrap() as i32;
    assert!(wait_for(Duration::from_secs(5), || {
        reap(old);
        !alive(old)
    }));
    w.moved_to(new);
    let mid = w.report();

    let status = client.wait().unwrap();
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    assert!(status.success(), "the client saw an error: {r}");
    assert_eq!(r["connection_broken"], false, "{r}");
    assert_eq!(r["errors"].as_array().map(|e| e.len()), Some(0), "{r}");
    assert_eq!(r["wrong_answers"], 0, "{r}");
    assert_eq!(r["ok"], r["requests"], "every request answered: {r}");
    // The migrated server answered requests after the move, on the same
    // connection (one client, and its request count went on).
    let after = w.report();
    w.assert_intact(&after);
    assert!(
        after["tcp_requests"].as_u64() > mid["tcp_requests"].as_u64(),
        "{mid} -> {after}"
    );
    assert_eq!(mid["tcp_clients"], 1);
}
