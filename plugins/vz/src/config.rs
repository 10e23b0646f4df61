//! A container's configuration as Virtuozzo keeps it: `/etc/vz/conf/<ctid>.conf`
//! over the defaults in `/etc/vz/vz.conf`, both shell-style `KEY="value"`
//! files, and the init pid in `/var/run/ve/<ctid>.init.pid`.
//!
//! Every host path goes through [`Layout`], which puts it under a root
//! directory (`-o vz-root=DIR`, default `/`): on a Virtuozzo host the root
//! is `/`; the tests point it at a temporary tree (the stand-in's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, VzError};
use crate::ploop;

/// Where a host's Virtuozzo files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            root: PathBuf::from("/"),
        }
    }
}

impl Layout {
    /// Host paths under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The root every host path is under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A host path (absolute, as a Virtuozzo host names it) under the
    /// root.
    pub fn host(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// `/etc/vz/vz.conf`.
    pub fn global_conf(&self) -> PathBuf {
        self.host("/etc/vz/vz.conf")
    }

    /// `/etc/vz/conf/<ctid>.conf`.
    pub fn ct_conf(&self, ctid: &str) -> PathBuf {
        self.host(&format!("/etc/vz/conf/{ctid}.conf"))
    }

    /// `/var/run/ve/<ctid>.init.pid`.
    pub fn init_pid_file(&self, ctid: &str) -> PathBuf {
        self.host(&format!("/var/run/ve/{ctid}.init.pid"))
    }

    /// The pid of the container's init, if the container runs.
    pub fn init_pid(&self, ctid: &str) -> Result<Option<i32>> {
        let p = self.init_pid_file(ctid);
        match std::fs::read_to_string(&p) {
            Ok(s) => s.trim().parse::<i32>().map(Some).map_err(|_| {
                VzError::Config(format!("{}: `{}` is not a pid", p.display(), s.trim()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(VzError::io(&p, e)),
        }
    }
}

/// Parses a shell-style configuration file: `KEY=value`, `KEY="value"`
/// (backslash escapes), `KEY='value'`, `#` comments, blank lines. The last
/// assignment of a key wins, as when the shell sources the file.
pub fn parse_shell_conf(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, rest)) = line.split_once('=') else {
            return Err(format!("line {}: `{line}` is not KEY=value", n + 1));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {}: `{key}` is not a variable name", n + 1));
        }
        let mut value = String::new();
        let mut chars = rest.chars().peekable();
        loop {
            match chars.next() {
                None => break,
                Some('"') => loop {
                    match chars.next() {
                        None => return Err(format!("line {}: unterminated \"", n + 1)),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => value.push(c),
                            Some(c) => {
                                value.push('\\');
                                value.push(c);
                            }
                            None => return Err(format!("line {}: unterminated \"", n + 1)),
                        },
                        Some(c) => value.push(c),
                    }
                },
                Some('\'') => loop {
                    match chars.next() {
                        None => return Err(format!("line {}: unterminated '", n + 1)),
                        Some('\'') => break,
                        Some(c) => value.push(c),
                    }
                },
                Some(c) if c.is_whitespace() => {
                    // Only a comment may follow the value.
                    let rest: String = chars.collect();
                    if !rest.trim_start().is_empty() && !rest.trim_start().starts_with('#') {
                        return Err(format!("line {}: text after the value of {key}", n + 1));
                    }
                    break;
                }
                Some(c) => value.push(c),
            }
        }
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

/// Replaces `$VEID` and `${VEID}` with the container id, as vzctl does.
pub fn expand_veid(value: &str, ctid: &str) -> String {
    value.replace("${VEID}", ctid).replace("$VEID", ctid)
}

/// One veth interface of the container (`NETIF` entry).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetIf {
    /// The interface name inside the container (`ifname`).
    pub ifname: String,
    /// Its MAC address (`mac`).
    pub mac: Option<String>,
    /// The host-side end of the pair (`host_ifname`).
    pub host_ifname: String,
    /// The host-side end's MAC address (`host_mac`).
    pub host_mac: Option<String>,
    /// The bridge the host side is attached to (`bridge`).
    pub bridge: Option<String>,
}

impl NetIf {
    /// CRIU's `--external` for the restore: `veth[IFNAME]:HOST_IFNAME[@BRIDGE]`.
    pub fn criu_external(&self) -> String {
        match &self.bridge {
            Some(b) => format!("veth[{}]:{}@{}", self.ifname, self.host_ifname, b),
            None => format!("veth[{}]:{}", self.ifname, self.host_ifname),
        }
    }
}

/// Parses `NETIF`: entries separated by `;`, each `key=value` pairs
/// separated by `,`. An entry without `ifname` or `host_ifname` is refused.
pub fn parse_netif(value: &str) -> Result<Vec<NetIf>> {
    let mut out = Vec::new();
    for entry in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let mut n = NetIf::default();
        for pair in entry.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.to_string();
            match k {
                "ifname" => n.ifname = v,
                "mac" => n.mac = Some(v),
                "host_ifname" => n.host_ifname = v,
                "host_mac" => n.host_mac = Some(v),
                "bridge" => n.bridge = Some(v).filter(|b| !b.is_empty()),
                _ => {} // network, gw, configure, ...: not the driver's concern
            }
        }
        if n.ifname.is_empty() || n.host_ifname.is_empty() {
            return Err(VzError::Config(format!(
                "NETIF entry `{entry}` lacks ifname or host_ifname"
            )));
        }
        out.push(n);
    }
    Ok(out)
}

/// One ploop disk of the container (`DISK` entry, or the root disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The disk's uuid (`uuid`), empty for a root disk not listed in `DISK`.
    pub uuid: String,
    /// The disk's directory or descriptor (`image`), absolute, `$VEID`
    /// expanded, as the host names it (not under the layout root).
    pub image: String,
    /// Where it is mounted inside the container (`mnt`); `None` for the
    /// root disk.
    pub mnt: Option<String>,
    /// `enabled=no` disks are not attached.
    pub enabled: bool,
}

impl Disk {
    /// The descriptor's host path (as the host names it).
    pub fn descriptor(&self) -> String {
        ploop::descriptor_path(Path::new(&self.image))
            .display()
            .to_string()
    }

    /// The root disk: mounted at `/`, or not mounted anywhere else.
    pub fn is_root(&self) -> bool {
        matches!(self.mnt.as_deref(), None | Some("/"))
    }
}

/// Parses `DISK`: entries separated by `;`, `key=value` pairs separated by
/// `,`; a relative `image` is relative to `VE_PRIVATE`.
pub fn parse_disks(value: &str, ctid: &str, private: &str) -> Result<Vec<Disk>> {
    let mut out = Vec::new();
    for entry in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let mut d = Disk {
            uuid: String::new(),
            image: String::new(),
            mnt: None,
            enabled: true,
        };
        for pair in entry.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "uuid" => d.uuid = v.to_string(),
                "image" => {
                    let v = expand_veid(v, ctid);
                    d.image = if v.starts_with('/') {
                        v
                    } else {
                        format!("{}/{v}", private.trim_end_matches('/'))
                    };
                }
                "mnt" => d.mnt = Some(v.to_string()).filter(|m| !m.is_empty()),
                "enabled" => d.enabled = v != "no",
                _ => {}
            }
        }
        if d.image.is_empty() {
            return Err(VzError::Config(format!(
                "DISK entry `{entry}` has no image"
            )));
        }
        out.push(d);
    }
    Ok(out)
}

/// What the driver needs of a container's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtConfig {
    /// The container id.
    pub ctid: String,
    /// `VE_PRIVATE`, `$VEID` expanded (a host path).
    pub private: String,
    /// `VE_ROOT`, `$VEID` expanded (a host path): where its root is mounted.
    pub root: String,
    /// Its veth interfaces (`NETIF`).
    pub netifs: Vec<NetIf>,
    /// Its ploop disks (`DISK`; the root disk `VE_PRIVATE/root.hdd` when
    /// `DISK` is absent), enabled ones only.
    pub disks: Vec<Disk>,
    /// phaul's own key `PHAUL_SHARED_DISKS` (container config over
    /// vz.conf): the disks are on storage both hosts see. vzctl does not
    /// know the key.
    pub shared_disks: Option<String>,
    /// The container's configuration file as read (it travels as a meta
    /// file).
    pub text: String,
}

impl CtConfig {
    /// Reads container `ctid`'s configuration under `layout`.
    pub fn load(layout: &Layout, ctid: &str) -> Result<CtConfig> {
        let path = layout.ct_conf(ctid);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VzError::NotFound(format!(
                    "no container {ctid} on this host ({} does not exist)",
                    path.display()
                )))
            }
            Err(e) => return Err(VzError::io(&path, e)),
        };
        let global_path = layout.global_conf();
        let global = match std::fs::read_to_string(&global_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(VzError::io(&global_path, e)),
        };
        Self::parse(ctid, &text, &global)
    }

    /// Builds the configuration from the container's file over the global
    /// one.
    pub fn parse(ctid: &str, ct_text: &str, global_text: &str) -> Result<CtConfig> {
        let ct =
            parse_shell_conf(ct_text).map_err(|e| VzError::Config(format!("{ctid}.conf: {e}")))?;
        let global =
            parse_shell_conf(global_text).map_err(|e| VzError::Config(format!("vz.conf: {e}")))?;
        let get = |k: &str| {
            ct.get(k)
                .or_else(|| global.get(k))
                .map(|v| expand_veid(v, ctid))
        };
        let private = get("VE_PRIVATE").filter(|v| !v.is_empty()).ok_or_else(|| {
            VzError::Config(format!(
                "VE_PRIVATE is set neither in {ctid}.conf nor in vz.conf"
            ))
        })?;
        let root = get("VE_ROOT").filter(|v| !v.is_empty()).ok_or_else(|| {
            VzError::Config(format!(
                "VE_ROOT is set neither in {ctid}.conf nor in vz.conf"
            ))
        })?;
        for (k, v) in [("VE_PRIVATE", &private), ("VE_ROOT", &root)] {
            if !v.starts_with('/') {
                return Err(VzError::Config(format!("{k}={v} is not an absolute path")));
            }
        }
        let netifs = parse_netif(ct.get("NETIF").map(String::as_str).unwrap_or(""))?;
        let disks = match ct.get("DISK") {
            Some(d) => parse_disks(d, ctid, &private)?,
            None => vec![Disk {
                uuid: String::new(),
                image: format!("{}/root.hdd", private.trim_end_matches('/')),
                mnt: None,
                enabled: true,
            }],
        };
        let disks: Vec<Disk> = disks.into_iter().filter(|d| d.enabled).collect();
        if disks.iter().filter(|d| d.is_root()).count() > 1 {
            return Err(VzError::Config("DISK names more than one root disk".into()));
        }
        Ok(CtConfig {
            ctid: ctid.to_string(),
            private,
            root,
            netifs,
            disks,
            shared_disks: get("PHAUL_SHARED_DISKS"),
            text: ct_text.to_string(),
        })
    }

    /// The disks other than the root disk.
    pub fn secondary_disks(&self) -> impl Iterator<Item = &Disk> {
        self.disks.iter().filter(|d| !d.is_root())
    }

    /// Whether two configurations describe the same container for a
    /// migration: the same private area, root, interfaces and disks.
    pub fn same_container(&self, other: &CtConfig) -> bool {
        self.private == other.private
            && self.root == other.root
            && self.netifs == other.netifs
            && self.disks == other.disks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GLOBAL: &str = r#"
# Global parameters
VIRTUOZZO=yes
VE_ROOT=/vz/root/$VEID
VE_PRIVATE="/vz/private/${VEID}"
"#;

    #[test]
    fn shell_values_quotes_comments_and_last_wins() {
        let c = parse_shell_conf(
            "A=1\nB=\"two words\" # c\nC='x y'\n# skip\nD=\"q\\\"q\"\nA=3\nexport E=e\n",
        )
        .unwrap();
        assert_eq!(c["A"], "3");
        assert_eq!(c["B"], "two words");
        assert_eq!(c["C"], "x y");
        assert_eq!(c["D"], "q\"q");
        assert_eq!(c["E"], "e");
        assert!(parse_shell_conf("A=\"open").is_err());
        assert!(parse_shell_conf("just words").is_err());
        assert!(parse_shell_conf("A=1 2").is_err());
    }

    #[test]
    fn veid_is_expanded_and_the_ct_config_wins_over_vz_conf() {
        let c = CtConfig::parse("101", "HOSTNAME=\"a\"\n", GLOBAL).unwrap();
        assert_eq!(c.private, "/vz/private/101");
        assert_eq!(c.root, "/vz/root/101");
        assert_eq!(c.disks.len(), 1, "the root disk without DISK");
        assert_eq!(
            c.disks[0].descriptor(),
            "/vz/private/101/root.hdd/DiskDescriptor.xml"
        );
        let c = CtConfig::parse("101", "VE_ROOT=\"/mnt/ct/$VEID\"\n", GLOBAL).unwrap();
        assert_eq!(c.root, "/mnt/ct/101");
        assert!(
            CtConfig::parse("101", "", "VE_ROOT=/r\n").is_err(),
            "no VE_PRIVATE"
        );
        assert!(CtConfig::parse("101", "VE_PRIVATE=rel\n", GLOBAL).is_err());
    }

    #[test]
    fn several_netif_entries_and_disks() {
        let ct = r#"
NETIF="ifname=eth0,mac=00:18:51:AA:00:01,host_ifname=veth101.0,host_mac=00:18:51:BB:00:01,bridge=br0;ifname=eth1,mac=00:18:51:AA:00:02,host_ifname=veth101.1,host_mac=00:18:51:BB:00:02,network=net1"
DISK="uuid={aaaa},enabled=yes,image=/vz/private/$VEID/root.hdd;uuid={bbbb},image=disk2.hdd,mnt=/data;uuid={cccc},enabled=no,image=/x/off.hdd,mnt=/off"
PHAUL_SHARED_DISKS=yes
"#;
        let c = CtConfig::parse("101", ct, GLOBAL).unwrap();
        assert_eq!(c.netifs.len(), 2);
        assert_eq!(c.netifs[0].criu_external(), "veth[eth0]:veth101.0@br0");
        assert_eq!(c.netifs[1].criu_external(), "veth[eth1]:veth101.1");
        assert_eq!(c.netifs[1].mac.as_deref(), Some("00:18:51:AA:00:02"));
        assert_eq!(c.netifs[0].host_mac.as_deref(), Some("00:18:51:BB:00:01"));
        assert_eq!(c.disks.len(), 2, "the disabled disk is left out");
        assert!(c.disks[0].is_root());
        let second: Vec<&Disk> = c.secondary_disks().collect();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].uuid, "{bbbb}");
        assert_eq!(second[0].image, "/vz/private/101/disk2.hdd");
        assert_eq!(second[0].mnt.as_deref(), Some("/data"));
        assert_eq!(c.shared_disks.as_deref(), Some("yes"));
        assert!(parse_netif("ifname=eth0").is_err(), "no host side");
    }

    #[test]
    fn layout_puts_host_paths_under_its_root() {
        let l = Layout::new("/tmp/standin");
        assert_eq!(
            l.ct_conf("101"),
            Path::new("/tmp/standin/etc/vz/conf/101.conf")
        );
        assert_eq!(
            l.init_pid_file("101"),
            Path::new("/tmp/standin/var/run/ve/101.init.pid")
        );
        assert_eq!(
            Layout::default().host("/vz/private/1"),
            Path::new("/vz/private/1")
        );
    }
}
