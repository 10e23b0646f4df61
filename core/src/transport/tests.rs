//! The transport without the engine: certificates made by [`certs`],
//! real TLS over loopback TCP through the relay, refusals.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::certs::{self, HostNames};
use super::*;

struct Pki {
    dir: tempfile::TempDir,
    dst: Identity,
    src: Identity,
    rogue: Identity,
}

fn host(ca: &Path, name: &str, also: &[&str], out: &Path) -> Identity {
    let names = HostNames {
        name: name.into(),
        also: also.iter().map(|s| s.to_string()).collect(),
    };
    certs::issue(ca, &names, out).unwrap();
    Identity::load(&TlsFiles::in_dir(out)).unwrap()
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (dir.path().join("ca"), dir.path().join("other"));
    certs::init_ca(&ca, "test CA").unwrap();
    certs::init_ca(&other, "other CA").unwrap();
    // The rogue trusts the real CA but its certificate is another's.
    host(&other, "src", &[], &dir.path().join("rogue"));
    let rogue = Identity::load(&TlsFiles {
        ca: ca.join(certs::CA_CERT),
        ..TlsFiles::in_dir(&dir.path().join("rogue"))
    })
    .unwrap();
    Pki {
        dst: host(&ca, "dst", &["127.0.0.1"], &dir.path().join("dst")),
        src: host(&ca, "src", &[], &dir.path().join("src")),
        rogue,
        dir,
    }
}

impl Pki {
    /// The rogue host as issued: trusting only its own CA.
    fn rogue_trusting_other(&self) -> Identity {
        Identity::load(&TlsFiles::in_dir(&self.dir.path().join("rogue"))).unwrap()
    }
}

/// A server accepting one connection with `allow`, and a client dialling
/// it as `client` expecting `name`.
fn pair(
    p: &Pki,
    client: &Identity,
    name: &str,
    allow: &[&str],
) -> (Result<Conn, DialError>, Result<(Conn, String), TlsError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server =
        Arc::new(TlsServer::new(&p.dst, allow.iter().map(|s| s.to_string()).collect()).unwrap());
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        Acceptor::Tls(server).accept(s, Instant::now() + Duration::from_secs(5))
    });
    let remote = Remote::tls(addr, Arc::new(TlsClient::new(client).unwrap()), name);
    let c = remote.dial(Duration::from_secs(5));
    (c, t.join().unwrap())
}

#[test]
fn bulk_data_crosses_both_ways_at_once_and_half_closes_travel() {
    let p = pki();
    let (c, s) = pair(&p, &p.src, "dst", &[]);
    let (c, (s, who)) = (c.unwrap(), s.unwrap());
    assert_eq!(who, "src");
    const N: usize = 48 << 20;
    let data = |seed: u8| -> Vec<u8> {
        (0..N)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let (a, b) = (data(1), data(2));
    let (a2, b2) = (a.clone(), b.clone());
    let c2 = c.try_clone().unwrap();
    let s2 = s.try_clone().unwrap();
    // Both write everything, then half-close; both read to end-of-file.
    let w1 = std::thread::spawn(move || {
        (&c2).write_all(&a2).unwrap();
        c2.shutdown_write();
    });
    let w2 = std::thread::spawn(move || {
        (&s2).write_all(&b2).unwrap();
        s2.shutdown_write();
    });
    let r1 = std::thread::spawn(move || {
        let mut got = Vec::new();
        (&s).read_to_end(&mut got).unwrap();
        got
    });
    let mut got_b = Vec::new();
    (&c).read_to_end(&mut got_b).unwrap();
    w1.join().unwrap();
    w2.join().unwrap();
    assert!(r1.join().unwrap() == a, "source to destination intact");
    assert!(got_b == b, "destination to source intact");
    assert!(c.relayed().unwrap() >= N as u64);
}

#[test]
fn a_client_of_another_ca_is_refused_with_the_reason() {
    let p = pki();
    let (c, s) = pair(&p, &p.rogue, "dst", &[]);
    let e = c.unwrap_err().to_string();
    assert!(e.contains("rejected this host's certificate"), "{e}");
    let e = s.unwrap_err().to_string();
    assert!(e.contains("TLS handshake"), "{e}");
}

#[test]
fn a_name_not_allowed_is_refused_and_told_why() {
    let p = pki();
    let (c, s) = pair(&p, &p.src, "dst", &["other-host"]);
    let e = c.unwrap_err().to_string();
    assert!(
        e.contains("refused this host") && e.contains("--allow-peer") && e.contains("\"src\""),
        "{e}"
    );
    assert!(matches!(s, Err(TlsError::NotAllowed(_))));
    let (c, s) = pair(&p, &p.src, "dst", &["SRC"]);
    assert!(c.is_ok() && s.is_ok(), "names match case-insensitively");
}

#[test]
fn the_destination_must_carry_the_expected_name() {
    let p = pki();
    let (c, _) = pair(&p, &p.src, "elsewhere", &[]);
    let e = c.unwrap_err().to_string();
    assert!(e.contains("--peer-name"), "{e}");
    // A destination signed by a CA this host does not trust.
    let (c, _) = pair(&p, &p.rogue_trusting_other(), "dst", &[]);
    let e = c.unwrap_err().to_string();
    assert!(e.contains("not signed by the CA this host trusts"), "{e}");
    // The IP address it was issued for works too.
    let (c, _) = pair(&p, &p.src, "127.0.0.1", &[]);
    assert!(c.is_ok());
}

#[test]
fn a_plain_client_to_a_tls_service_is_refused_quickly() {
    let p = pki();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = Arc::new(TlsServer::new(&p.dst, vec![]).unwrap());
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        Acceptor::Tls(server).accept(s, Instant::now() + Duration::from_secs(5))
    });
    let mut plain = std::net::TcpStream::connect(addr).unwrap();
    plain.write_all(b"PHAUL\0\0\x02garbage").unwrap();
    assert!(t.join().unwrap().is_err());
    // A silent one is dropped at the deadline.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = Arc::new(TlsServer::new(&p.dst, vec![]).unwrap());
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let start = Instant::now();
        let r = Acceptor::Tls(server).accept(s, Instant::now() + Duration::from_millis(300));
        (r, start.elapsed())
    });
    let _silent = std::net::TcpStream::connect(addr).unwrap();
    let (r, took) = t.join().unwrap();
    assert!(r.unwrap_err().to_string().contains("in time"));
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn keys_others_can_read_are_refused_and_the_ca_is_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "CA").unwrap();
    let key = ca.join(certs::CA_KEY);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(matches!(
        certs::init_ca(&ca, "CA"),
        Err(TlsError::Exists(_))
    ));
    let out = dir.path().join("h");
    host(&ca, "h", &[], &out);
    assert!(!out.join(certs::CA_KEY).exists(), "the CA key stays home");
    std::fs::set_permissions(out.join(certs::KEY), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Identity::load(&TlsFiles::in_dir(&out)).unwrap_err();
    assert!(matches!(e, TlsError::KeyExposed { mode: 0o644, .. }), "{e}");
    assert!(e.to_string().contains("chmod 600"));
}

#[test]
fn insecure_is_loopback_only() {
    assert!(Remote::insecure("10.1.2.3:7070".parse().unwrap()).is_err());
    assert!(Remote::insecure("127.0.0.1:7070".parse().unwrap()).is_ok());
    assert!(Acceptor::Insecure
        .check_listen("0.0.0.0:7070".parse().unwrap())
        .is_err());
}

#[test]
fn a_side_that_closes_at_once_still_delivers_everything_and_both_relays_end() {
    let p = pki();
    let (c, s) = pair(&p, &p.src, "dst", &[]);
    let (c, (s, _)) = (c.unwrap(), s.unwrap());
    let relays = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "tls-relay")
            })
            .count()
    };
    // Everything written, then the end closed altogether, while the other
    // side reads only later: nothing may be lost (neither in the closing
    // side's relay nor in the reader's, whose buffers are full when the
    // connection ends).
    const N: usize = 8 << 20;
    let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
    let d2 = data.clone();
    let w = std::thread::spawn(move || {
        (&c).write_all(&d2).unwrap();
        drop(c);
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut got = Vec::new();
    (&s).read_to_end(&mut got).unwrap();
    w.join().unwrap();
    assert!(got == data, "{} of {N} bytes arrived intact", got.len());
    // The other side talks on a little (dropped: nobody reads there any
    // more), then closes too: both relays end.
    (&s).write_all(&[7u8; 100_000]).unwrap();
    drop(s);
    let end = Instant::now() + Duration::from_secs(5);
    while relays() > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(relays(), 0, "both relays ended");
}
