//! Certificates for phaul's mutual TLS: a private CA (`phaul certs init`)
//! and host certificates it signs (`phaul certs issue`). Every host
//! certificate serves both roles (a host is a source one day and a
//! destination the next), so it carries both the server and the client
//! extended key usage. Keys are ECDSA P-256, written 0600.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::TlsError;

/// The CA's certificate, in a CA directory and in every host directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (only in the CA directory).
pub const CA_KEY: &str = "ca-key.pem";
/// A host's certificate.
pub const CERT: &str = "cert.pem";
/// A host's private key.
pub const KEY: &str = "key.pem";

/// How long certificates are valid, in days.
const CA_DAYS: i64 = 3650;
const HOST_DAYS: i64 = 825;

fn write_new(path: &Path, mode: u32, data: &str, overwrite: bool) -> Result<(), TlsError> {
    let mut o = OpenOptions::new();
    o.write(true).mode(mode);
    if overwrite {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => TlsError::Exists(path.to_path_buf()),
        _ => TlsError::Write {
            path: path.to_path_buf(),
            source,
        },
    })?;
    f.write_all(data.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // An hour of slack for clocks that disagree a little.
    let from = rcgen::date_time_ymd(1970, 1, 1) + time_secs(now - 3600);
    p.not_before = from;
    p.not_after = from + time_secs(days * 86_400 + 3600);
}

fn time_secs(s: i64) -> std::time::Duration {
    std::time::Duration::from_secs(s.max(0) as u64)
}

fn rcgen_err(what: &'static str) -> impl Fn(rcgen::Error) -> TlsError {
    move |e| TlsError::Generate(format!("{what}: {e}"))
}

/// Creates a CA in `dir` ([`CA_CERT`] and [`CA_KEY`], the key 0600).
/// Refuses to overwrite an existing CA. Returns the certificate's path.
pub fn init_ca(dir: &Path, name: &str) -> Result<PathBuf, TlsError> {
    create_dir(dir)?;
    let key = KeyPair::generate().map_err(rcgen_err("CA key"))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "phaul");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, CA_DAYS);
    let cert = p.self_signed(&key).map_err(rcgen_err("CA certificate"))?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if cert_path.exists() {
        return Err(TlsError::Exists(cert_path));
    }
    write_new(&key_path, 0o600, &key.serialize_pem(), false)?;
    write_new(&cert_path, 0o644, &cert.pem(), false)?;
    Ok(cert_path)
}

/// What a host certificate names.
#[derive(Debug, Clone)]
pub struct HostNames {
    /// The host's name: its certificate's common name and first DNS name
    /// (or IP address, if it is one); what `--allow-peer` and a source's
    /// `--peer-name` match.
    pub name: String,
    /// More names it answers to (DNS names or IP addresses).
    pub also: Vec<String>,
}

/// Issues a certificate for a host, signed by the CA in `ca_dir`, into
/// `out` ([`CERT`], [`KEY`] 0600, and a copy of [`CA_CERT`]: a directory
/// ready for `--tls-dir`). Existing host files in `out` are replaced.
pub fn issue(ca_dir: &Path, names: &HostNames, out: &Path) -> Result<(), TlsError> {
    let ca_pem = super::read(&ca_dir.join(CA_CERT))?;
    let ca_key_path = ca_dir.join(CA_KEY);
    super::check_key_mode(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&super::read(&ca_key_path)?).map_err(|e| TlsError::Bad {
        path: ca_key_path.clone(),
        what: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::Bad {
        path: ca_dir.join(CA_CERT),
        what: e.to_string(),
    })?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names.name.as_str());
    dn.push(DnType::OrganizationName, "phaul");
    p.distinguished_name = dn;
    for n in std::iter::once(&names.name).chain(&names.also) {
        let san =
            match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into().map_err(|e| {
                    TlsError::Generate(format!("{n:?} is not a valid host name: {e}"))
                })?),
            };
        p.subject_alt_names.push(san);
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, HOST_DAYS);
    let key = KeyPair::generate().map_err(rcgen_err("host key"))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(rcgen_err("host certificate"))?;
    create_dir(out)?;
    write_new(&out.join(KEY), 0o600, &key.serialize_pem(), true)?;
    write_new(&out.join(CERT), 0o644, &cert.pem(), true)?;
    if out.join(CA_CERT) != ca_dir.join(CA_CERT) {
        write_new(&out.join(CA_CERT), 0o644, &ca_pem, true)?;
    }
    Ok(())
}
