//! What the docker driver reads about a container: its `inspect` document
//! (checked for what cannot be migrated), the CRIU options runc would dump
//! it with (external mounts from the init's mountinfo, its freezer
//! cgroup), and the create request that makes the same container on
//! another engine.

use std::path::PathBuf;

use phaul_plugin_api::mountinfo::unescape;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The source container, as the destination needs it (the source
/// driver's `describe` fact, before anything is frozen).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceMeta {
    /// Full id on the source engine.
    pub id: String,
    /// Its name there (without the leading `/`).
    pub name: String,
    /// The image id (`sha256:...`).
    pub image_id: String,
    /// The image as the user named it (`Config.Image`).
    pub image_ref: String,
    /// `Config` of inspect.
    pub config: Value,
    /// `HostConfig` of inspect.
    pub host_config: Value,
    /// The user-defined networks it is attached to (name -> endpoint
    /// settings of inspect).
    pub networks: Map<String, Value>,
    /// Bind-mount sources the destination must have (host paths).
    pub bind_sources: Vec<String>,
    /// Its docker volumes.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Whether the image is sent along (`-o send-image`).
    pub image_sent: bool,
}

/// A docker volume of the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    /// Its name (a hash for an anonymous one).
    pub name: String,
    /// Where the container sees it.
    pub destination: String,
    /// Its data on the source host (`Mountpoint`).
    pub source: String,
    /// Copied with the file sync (a plain local volume); otherwise it is
    /// on storage both hosts see (another driver, or the local driver
    /// mounting a device or a network filesystem) and must exist on the
    /// destination under the same name.
    pub synced: bool,
}

impl Volume {
    /// Whether `GET /volumes/{name}` describes storage of this host only
    /// (the local driver without mount options).
    pub fn is_host_local(volume: &Value) -> bool {
        volume["Driver"].as_str() == Some("local")
            && !volume["Options"].as_object().is_some_and(|o| !o.is_empty())
    }
}

/// The parts of `docker inspect` the source side uses.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// Full id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// `State.Status`.
    pub status: String,
    /// `State.Running && !State.Paused`.
    pub running: bool,
    /// `State.Paused`.
    pub paused: bool,
    /// `State.Pid`.
    pub pid: i32,
    /// The writable layer (`GraphDriver.Data.UpperDir`).
    pub upper: Option<PathBuf>,
    /// The mounted rootfs (`GraphDriver.Data.MergedDir`).
    pub merged: Option<PathBuf>,
    /// The whole document.
    pub raw: Value,
}

impl Inspected {
    /// Parses an inspect document.
    pub fn parse(v: Value) -> Inspected {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let b = |p: &str| v.pointer(p).and_then(Value::as_bool).unwrap_or(false);
        let path = |p: &str| {
            let x = s(p);
            (!x.is_empty()).then(|| PathBuf::from(x))
        };
        Inspected {
            id: s("/Id").to_string(),
            name: s("/Name").trim_start_matches('/').to_string(),
            status: s("/State/Status").to_string(),
            running: b("/State/Running") && !b("/State/Paused"),
            paused: b("/State/Paused"),
            pid: v.pointer("/State/Pid").and_then(Value::as_i64).unwrap_or(0) as i32,
            upper: path("/GraphDriver/Data/UpperDir"),
            merged: path("/GraphDriver/Data/MergedDir"),
            raw: v,
        }
    }

    /// What makes this container impossible to checkpoint (live mode) or
    /// to recreate elsewhere (both modes), each with the way out.
    pub fn problems(&self, live: bool) -> Vec<String> {
        let v = &self.raw;
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let b = |p: &str| v.pointer(p).and_then(Value::as_bool).unwrap_or(false);
        let mut out = Vec::new();
        if live && b("/Config/Tty") {
            out.push(
                "it has a TTY (docker run -t): CRIU cannot checkpoint the engine's terminal; run \
                 it without -t, or use --mode restart"
                    .to_string(),
            );
        }
        if b("/HostConfig/Privileged") {
            out.push("it is privileged (--privileged): its devices are the host's".to_string());
        }
        if v.pointer("/HostConfig/Devices")
            .and_then(Value::as_array)
            .is_some_and(|d| !d.is_empty())
        {
            out.push("it has host devices (--device)".to_string());
        }
        let caps: Vec<&str> = v
            .pointer("/HostConfig/CapAdd")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|c| matches!(*c, "ALL" | "SYS_ADMIN" | "CAP_SYS_ADMIN"))
            .collect();
        if !caps.is_empty() {
            out.push(format!(
                "it adds capability {} (--cap-add): as good as privileged",
                caps.join(", ")
            ));
        }
        let graph = s("/GraphDriver/Name");
        if graph != "overlay2" {
            out.push(format!(
                "its storage driver is {graph:?}: only overlay2's writable layer can be moved"
            ));
        }
        for (key, what) in [
            ("/HostConfig/NetworkMode", "network"),
            ("/HostConfig/PidMode", "pid"),
            ("/HostConfig/IpcMode", "ipc"),
            ("/HostConfig/UTSMode", "uts"),
        ] {
            let m = s(key);
            if m == "host" || m.starts_with("container:") {
                out.push(format!(
                    "it shares the {what} namespace of {m:?} (--{what}={m}): that stays behind"
                ));
            }
        }
        for m in v
            .pointer("/Mounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let t = m.get("Type").and_then(Value::as_str).unwrap_or_default();
            let dest = m
                .get("Destination")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match t {
                "bind" | "tmpfs" => {}
                "volume" => {}
                other => out.push(format!("a {other} mount at {dest}")),
            }
        }
        out
    }

    /// Its volumes as `(name, destination, host path)`.
    pub fn volume_mounts(&self) -> Vec<(String, String, String)> {
        self.raw
            .pointer("/Mounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| m.get("Type").and_then(Value::as_str) == Some("volume"))
            .map(|m| {
                let f = |k: &str| {
                    m.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                (f("Name"), f("Destination"), f("Source"))
            })
            .collect()
    }

    /// The host path the container's mount at `destination` comes from.
    pub fn mount_source(&self, destination: &str) -> Option<PathBuf> {
        self.raw
            .pointer("/Mounts")
            .and_then(Value::as_array)?
            .iter()
            .find(|m| m.get("Destination").and_then(Value::as_str) == Some(destination))
            .and_then(|m| m.get("Source").and_then(Value::as_str))
            .map(PathBuf::from)
    }

    /// Its addresses that the destination's engine chooses anew: those on
    /// the default bridge, or without a static address (`--ip`).
    pub fn moving_addresses(&self) -> Vec<String> {
        self.raw
            .pointer("/NetworkSettings/Networks")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(name, ep)| {
                name.as_str() == "bridge"
                    || ep["IPAMConfig"]["IPv4Address"]
                        .as_str()
                        .map_or(true, str::is_empty)
            })
            .filter_map(|(_, ep)| ep["IPAddress"].as_str().filter(|a| !a.is_empty()))
            .map(str::to_string)
            .collect()
    }

    /// Host paths bind-mounted into the container.
    pub fn bind_sources(&self) -> Vec<String> {
        self.mounts_of("bind", "Source")
    }

    /// In-container destinations of its bind mounts (volumes included).
    pub fn bind_destinations(&self) -> Vec<String> {
        let mut d = self.mounts_of("bind", "Destination");
        d.extend(self.mounts_of("volume", "Destination"));
        d
    }

    fn mounts_of(&self, kind: &str, field: &str) -> Vec<String> {
        self.raw
            .pointer("/Mounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| m.get("Type").and_then(Value::as_str) == Some(kind))
            .filter_map(|m| m.get(field).and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    /// The user-defined networks it is on (not the default `bridge`).
    pub fn networks(&self) -> Map<String, Value> {
        self.raw
            .pointer("/NetworkSettings/Networks")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "bridge" | "none" | "host"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl SourceMeta {
    /// What the destination refuses to create from this description,
    /// whatever the source's driver checked: the same rules, applied by
    /// the side that runs the container as root.
    pub fn problems(&self, live: bool) -> Vec<String> {
        Inspected::parse(json!({
            "Config": self.config,
            "HostConfig": self.host_config,
            "GraphDriver": {"Name": "overlay2"},
        }))
        .problems(live)
    }
}

/// The `--external mnt[...]` options runc's checkpoint gives CRIU for a
/// container, from its init's `/proc/PID/mountinfo`: every bind mount
/// keyed by its in-container destination (runc's restore maps them back
/// by destination to the new container's sources), the cgroup v1
/// controller mounts likewise, and masked files (bind mounts of
/// `/dev/null`) as `/dev/null`. Everything else CRIU dumps itself.
pub fn external_mounts(mountinfo: &str, binds: &[String], masked: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(root), Some(point), Some(fstype)) = (f.get(3), f.get(4), f.get(sep + 1)) else {
            continue;
        };
        let point = unescape(point);
        if point == "/" {
            continue;
        }
        // Binds and cgroup v1 controllers keep their name; a masked file
        // is a bind of /dev/null.
        let spec = if binds.contains(&point) || *fstype == "cgroup" {
            format!("mnt[{point}]:{point}")
        } else if masked.contains(&point) && *root != "/" {
            format!("mnt[{point}]:/dev/null")
        } else {
            continue;
        };
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    out
}

/// The freezer cgroup directory of `pid` (cgroup v1 freezer, else the
/// unified hierarchy's), from `/proc/PID/cgroup` and this host's
/// mountinfo.
pub fn freezer_cgroup(cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    let mount_of = |want: &str, fstype: &str| {
        mountinfo.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let ok = f.get(sep + 1) == Some(&fstype)
                && (fstype == "cgroup2"
                    || f.get(sep + 3)
                        .is_some_and(|o| o.split(',').any(|x| x == want)));
            ok.then(|| (f[3].to_string(), unescape(f[4])))
        })
    };
    let join = |(root, point): (String, String), path: &str| {
        let rel = path.strip_prefix(root.as_str()).unwrap_or(path);
        PathBuf::from(format!("{point}/{}", rel.trim_start_matches('/')))
    };
    for l in cgroup.lines() {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        if ctrls.split(',').any(|c| c == "freezer") {
            return mount_of("freezer", "cgroup").map(|m| join(m, path));
        }
    }
    let unified = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    mount_of("", "cgroup2").map(|m| join(m, unified))
}

/// The body of `POST /containers/create` for the same container on
/// another engine: the source's `Config` (command, environment, hostname,
/// labels, working directory, user, ...), its `HostConfig` less what
/// belongs to the source host, and its user-defined networks.
pub fn create_body(meta: &SourceMeta, image: &str) -> Value {
    let mut body = meta.config.as_object().cloned().unwrap_or_default();
    body.insert("Image".into(), json!(image));
    let mut host = meta.host_config.as_object().cloned().unwrap_or_default();
    // The source engine's own files and choices, not the container's.
    for k in ["ContainerIDFile", "CgroupParent"] {
        host.remove(k);
    }
    body.insert("HostConfig".into(), Value::Object(host));
    if !meta.networks.is_empty() {
        let endpoints: Map<String, Value> = meta
            .networks
            .iter()
            .map(|(name, ep)| {
                let mut e = Map::new();
                // Its aliases, less the source's short id (the engine adds
                // the new container's own).
                let short = &meta.id[..meta.id.len().min(12)];
                if let Some(a) = ep.get("Aliases").and_then(Value::as_array) {
                    let kept: Vec<Value> = a
                        .iter()
                        .filter(|x| x.as_str() != Some(short))
                        .cloned()
                        .collect();
                    e.insert("Aliases".into(), Value::Array(kept));
                }
                if let Some(ipam) = ep.get("IPAMConfig").filter(|v| !v.is_null()) {
                    e.insert("IPAMConfig".into(), ipam.clone());
                }
                (name.clone(), Value::Object(e))
            })
            .collect();
        body.insert(
            "NetworkingConfig".into(),
            json!({ "EndpointsConfig": endpoints }),
        );
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A docker 20.10 container's init, cgroup v1 (as on this lab's hosts).
    const MOUNTINFO: &str = "\
100 90 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/x
101 100 0:53 / /proc rw,nosuid - proc proc rw
102 100 0:54 / /dev rw,nosuid - tmpfs tmpfs rw
105 100 0:57 / /sys ro,nosuid - sysfs sysfs ro
106 105 0:58 / /sys/fs/cgroup rw - tmpfs tmpfs rw
107 106 0:29 /phaul-dk-a/35683b /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu
108 106 0:33 /phaul-dk-a/35683b /sys/fs/cgroup/freezer ro - cgroup cgroup rw,freezer
115 100 254:0 /var/lib/d/containers/35683b/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda rw
116 100 254:0 /var/lib/d/containers/35683b/hosts /etc/hosts rw - ext4 /dev/vda rw
117 100 254:0 /srv/my\\040data /srv/my\\040data rw - ext4 /dev/vda rw
120 101 0:53 /bus /proc/bus ro - proc proc rw
121 101 0:59 / /proc/acpi ro - tmpfs tmpfs ro
122 101 0:54 /null /proc/keys rw - tmpfs tmpfs rw
";

    #[test]
    fn externals_are_keyed_like_runcs() {
        let binds = vec![
            "/etc/resolv.conf".to_string(),
            "/etc/hosts".into(),
            "/srv/my data".into(),
        ];
        let masked = vec!["/proc/keys".to_string(), "/proc/acpi".into()];
        assert_eq!(
            external_mounts(MOUNTINFO, &binds, &masked),
            vec![
                "mnt[/sys/fs/cgroup/cpu]:/sys/fs/cgroup/cpu",
                "mnt[/sys/fs/cgroup/freezer]:/sys/fs/cgroup/freezer",
                "mnt[/etc/resolv.conf]:/etc/resolv.conf",
                "mnt[/etc/hosts]:/etc/hosts",
                "mnt[/srv/my data]:/srv/my data",
                "mnt[/proc/keys]:/dev/null",
            ]
        );
    }

    #[test]
    fn freezer_v1_and_unified() {
        let host = "\
30 27 0:26 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
31 27 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        let cg = "7:freezer:/phaul-dk-a/abc\n0::/phaul-dk-a/abc\n";
        assert_eq!(
            freezer_cgroup(cg, host),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/phaul-dk-a/abc"))
        );
        assert_eq!(
            freezer_cgroup("0::/system.slice/x\n", host),
            Some(PathBuf::from("/sys/fs/cgroup/unified/system.slice/x"))
        );
        assert_eq!(freezer_cgroup("", host), None);
    }

    #[test]
    fn refusals_name_the_way_out() {
        let v = json!({
            "Id": "abc", "Name": "/w", "State": {"Status": "running", "Running": true, "Pid": 7},
            "Config": {"Tty": true},
            "HostConfig": {"Privileged": true, "NetworkMode": "host", "PidMode": ""},
            "GraphDriver": {"Name": "overlay2"},
            "Mounts": [{"Type": "npipe", "Destination": "/v"}]
        });
        let i = Inspected::parse(v);
        assert_eq!((i.name.as_str(), i.pid, i.running), ("w", 7, true));
        let p = i.problems(true).join("\n");
        for want in [
            "TTY",
            "privileged",
            "network namespace",
            "a npipe mount at /v",
        ] {
            assert!(p.contains(want), "{want} in {p}");
        }
        assert!(!i.problems(false).join("").contains("TTY"));
    }

    #[test]
    fn the_destination_applies_the_same_rules_to_a_description() {
        let meta = |host: Value| SourceMeta {
            id: "abc".into(),
            name: "w".into(),
            image_id: "sha256:1".into(),
            image_ref: String::new(),
            config: json!({"Tty": false}),
            host_config: host,
            networks: Map::new(),
            bind_sources: vec![],
            volumes: vec![],
            image_sent: false,
        };
        assert!(meta(json!({"NetworkMode": "default"}))
            .problems(true)
            .is_empty());
        let p = meta(
            json!({"Privileged": true, "CapAdd": ["NET_ADMIN", "SYS_ADMIN"],
                            "PidMode": "host"}),
        )
        .problems(true)
        .join("\n");
        for want in ["privileged", "SYS_ADMIN", "pid namespace"] {
            assert!(p.contains(want), "{want} in {p}");
        }
        assert!(!p.contains("NET_ADMIN"));
    }

    #[test]
    fn the_create_body_keeps_the_container_and_drops_the_host() {
        let meta = SourceMeta {
            id: "abc".into(),
            name: "w".into(),
            image_id: "sha256:1".into(),
            image_ref: "img:1".into(),
            config: json!({"Image": "img:1", "Hostname": "h1", "Env": ["A=1"], "Labels": {"l": "v"}}),
            host_config: json!({"CgroupParent": "/a", "Binds": ["/srv:/srv"]}),
            networks: Map::new(),
            bind_sources: vec![],
            volumes: vec![],
            image_sent: false,
        };
        let b = create_body(&meta, "sha256:1");
        assert_eq!(b["Image"], "sha256:1");
        assert_eq!(b["Hostname"], "h1");
        assert_eq!(b["Labels"]["l"], "v");
        assert_eq!(b["HostConfig"]["Binds"][0], "/srv:/srv");
        assert!(b["HostConfig"].get("CgroupParent").is_none());
        assert!(b.get("NetworkingConfig").is_none());
    }

    #[test]
    fn networks_keep_a_static_address_and_drop_the_old_id_alias() {
        let mut net = Map::new();
        net.insert(
            "appnet".into(),
            json!({"IPAMConfig": {"IPv4Address": "10.9.0.10"}, "Aliases": ["abcdef012345", "db"],
                   "IPAddress": "10.9.0.10"}),
        );
        let meta = SourceMeta {
            id: "abcdef0123456789".into(),
            name: "w".into(),
            image_id: "sha256:1".into(),
            image_ref: String::new(),
            config: json!({}),
            host_config: json!({}),
            networks: net.clone(),
            bind_sources: vec![],
            volumes: vec![],
            image_sent: false,
        };
        let ep = &create_body(&meta, "i")["NetworkingConfig"]["EndpointsConfig"]["appnet"];
        assert_eq!(ep["IPAMConfig"]["IPv4Address"], "10.9.0.10");
        assert_eq!(ep["Aliases"], json!(["db"]));
        // Only the engine-chosen address moves.
        net.insert("bridge".into(), json!({"IPAddress": "172.17.0.2"}));
        net.insert(
            "other".into(),
            json!({"IPAMConfig": null, "IPAddress": "10.8.0.3"}),
        );
        let i = Inspected::parse(json!({"NetworkSettings": {"Networks": net}}));
        let mut m = i.moving_addresses();
        m.sort();
        assert_eq!(m, vec!["10.8.0.3", "172.17.0.2"]);
    }
}
