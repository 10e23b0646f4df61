//! The certificates the tests' hosts use, made once per test process with
//! `phaul certs` itself: a CA, a destination certificate (`dst`, also valid
//! for 127.0.0.1 and the two-host tests' veth address), a source
//! certificate (`src`), and, for refusals, a second CA with a host it
//! signed (`rogue`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::bin;

/// The destination's address in the two-host tests (on their veth).
pub const DST_VETH_ADDR: &str = "10.251.0.2";

/// The test PKI's directories.
#[derive(Debug)]
pub struct Pki {
    _root: tempfile::TempDir,
    /// The CA directory (ca.pem, ca-key.pem).
    pub ca: PathBuf,
    /// The destination's --tls-dir.
    pub dst: PathBuf,
    /// The source's --tls-dir.
    pub src: PathBuf,
    /// A host signed by the same CA under the name `stranger`.
    pub stranger: PathBuf,
    /// A host signed by another CA (named `src`, like the real source),
    /// trusting the real CA.
    pub rogue: PathBuf,
}

fn certs(args: &[&str]) {
    let out = Command::new(bin("phaul"))
        .arg("certs")
        .args(args)
        .output()
        .expect("run phaul certs");
    assert!(
        out.status.success(),
        "phaul certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The PKI, made on first use.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root = tempfile::Builder::new()
            .prefix("phaul-test-pki-")
            .tempdir()
            .expect("pki dir");
        let p = |n: &str| root.path().join(n);
        let (ca, other) = (p("ca"), p("other-ca"));
        certs(&["init", "--dir", s(&ca)]);
        certs(&["init", "--dir", s(&other), "--name", "another CA"]);
        let issue = |ca: &Path, name: &str, also: &[&str], out: &Path| {
            let mut a = vec!["issue", "--dir", s(ca), "--name", name, "--out", s(out)];
            for n in also {
                a.extend(["--also", n]);
            }
            certs(&a);
        };
        issue(
            &ca,
            "dst",
            &["127.0.0.1", "localhost", DST_VETH_ADDR],
            &p("dst"),
        );
        issue(&ca, "src", &[], &p("src"));
        issue(&ca, "stranger", &[], &p("stranger"));
        issue(&other, "src", &["127.0.0.1"], &p("rogue"));
        // The rogue trusts the real CA (it can check the destination), but
        // its own certificate is the other CA's.
        std::fs::copy(ca.join("ca.pem"), p("rogue").join("ca.pem")).expect("copy CA");
        Pki {
            ca,
            dst: p("dst"),
            src: p("src"),
            stranger: p("stranger"),
            rogue: p("rogue"),
            _root: root,
        }
    })
}

/// Whether `args` already say how to connect (TLS files or --insecure).
pub fn chooses_transport(args: &[impl AsRef<str>]) -> bool {
    args.iter().any(|a| {
        let a = a.as_ref();
        a == "--insecure" || a.starts_with("--tls-")
    })
}
