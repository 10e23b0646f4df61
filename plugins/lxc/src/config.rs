//! An LXC container configuration as the driver needs it: parsed (with its
//! `lxc.include` files), checked for what CRIU cannot checkpoint, and
//! rewritten for the destination's container directory.
//!
//! The format is liblxc's (`lxc.container.conf(5)`): one `key = value` per
//! line, `#` comments, keys repeated for lists (`lxc.mount.entry`),
//! `lxc.include` naming a file or a directory of `*.conf` files.

use std::path::{Path, PathBuf};

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key (`lxc.rootfs.path`).
    pub key: String,
    /// The value, trimmed (empty for `key =`).
    pub value: String,
}

/// A bind mount of the container (`lxc.mount.entry` with `bind`): CRIU
/// dumps it as an external mount keyed by its target as written, which is
/// how liblxc maps it back on restore (`--ext-mount-map TARGET:SOURCE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// The host path mounted.
    pub source: String,
    /// The target as written in the configuration (relative to the rootfs).
    pub target: String,
}

impl BindMount {
    /// The mount point inside the container (`/lib` for target `lib`).
    pub fn mountpoint(&self) -> String {
        format!("/{}", self.target.trim_start_matches('/'))
    }

    /// The CRIU `--external` entry for the dump (`mnt[/lib]:lib`).
    pub fn external(&self) -> String {
        format!("mnt[{}]:{}", self.mountpoint(), self.target)
    }
}

/// A container configuration: the main file's own lines (what travels and
/// is rewritten) and every line liblxc would read (with includes).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The main file's lines, verbatim (comments and blanks kept).
    pub lines: Vec<String>,
    /// Every entry, includes expanded in place.
    pub entries: Vec<Entry>,
}

/// Why a configuration cannot be read.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let (k, v) = t.split_once('=')?;
    Some(Entry {
        key: k.trim().to_string(),
        value: v.trim().to_string(),
    })
}

fn read_into(
    path: &Path,
    depth: u32,
    entries: &mut Vec<Entry>,
) -> Result<Vec<String>, ConfigError> {
    if depth > 8 {
        return Err(ConfigError(format!(
            "{}: lxc.include nested more than 8 deep",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    for line in &lines {
        let Some(e) = parse_line(line) else { continue };
        if e.key == "lxc.include" {
            let inc = PathBuf::from(&e.value);
            if inc.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(&inc)
                    .map_err(|err| ConfigError(format!("cannot read {}: {err}", inc.display())))?
                    .filter_map(|d| d.ok().map(|d| d.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                    .collect();
                files.sort();
                for f in files {
                    read_into(&f, depth + 1, entries)?;
                }
            } else if inc.exists() {
                read_into(&inc, depth + 1, entries)?;
            }
            continue;
        }
        entries.push(e);
    }
    Ok(lines)
}

impl Config {
    /// Reads `path` and the files it includes.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let mut entries = Vec::new();
        let lines = read_into(path, 0, &mut entries)?;
        Ok(Config { lines, entries })
    }

    /// Parses a main file's text (includes are not followed).
    pub fn parse(text: &str) -> Config {
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let entries = lines.iter().filter_map(|l| parse_line(l)).collect();
        Config { lines, entries }
    }

    /// The last value of `key` (liblxc: a later line overrides), if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    }

    /// Every value of `key`, in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.key == key)
            .map(|e| e.value.as_str())
    }

    /// The rootfs directory (`lxc.rootfs.path`, `dir:` prefix removed), or
    /// why it is not a plain directory.
    pub fn rootfs(&self) -> Result<PathBuf, String> {
        let v = self
            .get("lxc.rootfs.path")
            .ok_or("the configuration has no lxc.rootfs.path")?;
        let path = v.strip_prefix("dir:").unwrap_or(v);
        if !path.starts_with('/') {
            return Err(format!(
                "lxc.rootfs.path = {v}: not a directory rootfs (this driver copies a `dir:` \
                 rootfs; for other backing stores both hosts must see it: --shared-storage)"
            ));
        }
        Ok(PathBuf::from(path))
    }

    /// The bind mounts among `lxc.mount.entry` lines.
    pub fn bind_mounts(&self) -> Vec<BindMount> {
        self.all("lxc.mount.entry")
            .filter_map(|v| {
                let f: Vec<&str> = v.split_whitespace().collect();
                let opts = f.get(3)?;
                opts.split(',')
                    .any(|o| o == "bind" || o == "rbind")
                    .then(|| BindMount {
                        source: f[0].to_string(),
                        target: f[1].to_string(),
                    })
            })
            .collect()
    }

    /// The indices of the configured networks (`lxc.net.N.*`), ascending.
    pub fn networks(&self) -> Vec<u32> {
        let mut n: Vec<u32> = self
            .entries
            .iter()
            .filter_map(|e| {
                e.key
                    .strip_prefix("lxc.net.")?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        n.sort();
        n.dedup();
        n
    }

    /// What CRIU (through this driver) cannot checkpoint or restore in this
    /// configuration: one message per problem, each naming the key to
    /// change. `lsms` lists the kernel's security modules.
    pub fn problems(&self, file: &Path, lsms: &Lsms, shared_storage: bool) -> Vec<String> {
        let f = file.display();
        let mut out = Vec::new();
        if let Some(n) = self.get("lxc.tty.max").filter(|n| n.trim() != "0") {
            out.push(format!(
                "lxc.tty.max = {n}: CRIU cannot checkpoint the container's ttys (\"tty: Unable \
                 to find a master\"); set lxc.tty.max = 0 in {f}"
            ));
        }
        match self.get("lxc.console.path") {
            Some("none") => {}
            v => out.push(format!(
                "lxc.console.path = {}: CRIU cannot checkpoint the container's console; set \
                 lxc.console.path = none in {f}",
                v.unwrap_or("(unset: a console)")
            )),
        }
        for (key, lsm, present) in [
            ("lxc.apparmor.profile", "AppArmor", lsms.apparmor),
            ("lxc.selinux.context", "SELinux", lsms.selinux),
        ] {
            if let Some(v) = self.get(key).filter(|_| !present) {
                out.push(format!(
                    "{key} = {v}: this kernel has no {lsm}, and liblxc hands the profile to \
                     CRIU's restore, which refuses it; remove {key} from {f} (and from what \
                     it includes, e.g. /etc/lxc/default.conf's `generated`)"
                ));
            }
        }
        if self.get("lxc.idmap").is_some() {
            out.push(format!(
                "lxc.idmap is set: this driver does not move unprivileged (user-namespace) \
                 containers; remove lxc.idmap from {f} or move it with --mode restart"
            ));
        }
        for n in self.networks() {
            let key = format!("lxc.net.{n}.type");
            match self.get(&key) {
                Some("veth") | Some("empty") | Some("none") | None => {}
                Some(t) => out.push(format!(
                    "{key} = {t}: this driver moves veth, empty and none networks only"
                )),
            }
        }
        if !shared_storage {
            if let Err(e) = self.rootfs() {
                out.push(e);
            }
        }
        out
    }

    /// The main file rewritten for the destination: every path under the
    /// source's container directory `from` moved under `to`; with
    /// `rootfs`, `lxc.rootfs.path` set to that directory; with `bridge`,
    /// every veth network attached to it.
    pub fn rewritten(
        &self,
        from: &Path,
        to: &Path,
        rootfs: Option<&Path>,
        bridge: Option<&str>,
    ) -> String {
        let (from, to) = (from.display().to_string(), to.display().to_string());
        let mut out = String::new();
        for line in &self.lines {
            let mut l = line.clone();
            if let Some(e) = parse_line(line) {
                if let (Some(r), "lxc.rootfs.path") = (rootfs, e.key.as_str()) {
                    l = format!("{} = dir:{}", e.key, r.display());
                } else if let (Some(br), Some(n)) = (bridge, net_index(&e.key, "link")) {
                    if self.get(&format!("lxc.net.{n}.type")) == Some("veth") {
                        l = format!("{} = {br}", e.key);
                    }
                } else if e.value.contains(&from) {
                    l = format!("{} = {}", e.key, replace_dir(&e.value, &from, &to));
                }
            }
            out.push_str(&l);
            out.push('\n');
        }
        out
    }
}

/// `N` for `lxc.net.N.<field>`.
fn net_index(key: &str, field: &str) -> Option<u32> {
    let rest = key.strip_prefix("lxc.net.")?;
    let (n, f) = rest.split_once('.')?;
    (f == field).then(|| n.parse().ok()).flatten()
}

/// `value` with each occurrence of the directory `from` (as a whole path
/// component) replaced by `to`.
fn replace_dir(value: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find(from) {
        let after = &rest[i + from.len()..];
        let whole =
            after.is_empty() || after.starts_with('/') || after.starts_with(char::is_whitespace);
        out.push_str(&rest[..i]);
        out.push_str(if whole { to } else { from });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Which of the security modules LXC can configure the kernel has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lsms {
    /// AppArmor is enabled.
    pub apparmor: bool,
    /// SELinux is enabled.
    pub selinux: bool,
}

impl Lsms {
    /// This kernel's (AppArmor: `/sys/module/apparmor/parameters/enabled`
    /// says `Y`; SELinux: `/sys/fs/selinux` exists).
    pub fn probe() -> Lsms {
        let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|s| s.trim() == "Y");
        Lsms {
            apparmor,
            selinux: Path::new("/sys/fs/selinux/enforce").exists(),
        }
    }
}

/// Whether `name` is a usable container name (one path component).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "\
# Template used to create this container
lxc.net.0.type = veth
lxc.net.0.link = lxtbr0
lxc.net.0.flags = up
lxc.net.0.ipv4.address = 10.253.0.10/24
lxc.tty.max = 0
lxc.console.path = none
lxc.rootfs.path = dir:/var/lib/lxc/c1/rootfs
lxc.uts.name = \"c1\"
lxc.log.file = /var/lib/lxc/c1/c1.log
lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0
lxc.mount.entry = /usr/lib lib none ro,bind 0 0
lxc.mount.entry = /srv/data srv/data none rbind,create=dir 0 0
";

    #[test]
    fn reads_rootfs_bind_mounts_and_networks() {
        let c = Config::parse(TEMPLATE);
        assert_eq!(c.rootfs().unwrap(), PathBuf::from("/var/lib/lxc/c1/rootfs"));
        let b = c.bind_mounts();
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0].external(), "mnt[/lib]:lib");
        assert_eq!(b[1].external(), "mnt[/srv/data]:srv/data");
        assert_eq!(c.networks(), vec![0]);
        assert!(c
            .problems(Path::new("cfg"), &Lsms::default(), false)
            .is_empty());
    }

    #[test]
    fn problems_name_the_key_to_change() {
        let c = Config::parse(
            "lxc.tty.max = 5\nlxc.apparmor.profile = generated\nlxc.net.0.type = macvlan\n\
             lxc.rootfs.path = overlay:/a:/b\nlxc.idmap = u 0 100000 65536\n",
        );
        let p = c.problems(Path::new("/x/config"), &Lsms::default(), false);
        let all = p.join("\n");
        for want in [
            "lxc.tty.max = 0 in /x/config",
            "lxc.console.path = none",
            "remove lxc.apparmor.profile",
            "lxc.net.0.type = macvlan",
            "--shared-storage",
            "lxc.idmap",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert_eq!(p.len(), 6, "{all}");
        let with_apparmor = Lsms {
            apparmor: true,
            selinux: false,
        };
        let p = c.problems(Path::new("/x/config"), &with_apparmor, true);
        assert!(!p.join("\n").contains("apparmor"), "{p:?}");
        assert_eq!(p.len(), 4, "{p:?}");
    }

    #[test]
    fn rewrite_moves_paths_and_bridges_but_nothing_else() {
        let c = Config::parse(TEMPLATE);
        let out = c.rewritten(
            Path::new("/var/lib/lxc/c1"),
            Path::new("/srv/lxc/web"),
            None,
            Some("br9"),
        );
        assert!(
            out.contains("lxc.rootfs.path = dir:/srv/lxc/web/rootfs\n"),
            "{out}"
        );
        assert!(
            out.contains("lxc.log.file = /srv/lxc/web/c1.log\n"),
            "{out}"
        );
        assert!(out.contains("lxc.net.0.link = br9\n"), "{out}");
        assert!(out.contains("lxc.uts.name = \"c1\"\n"), "{out}");
        assert!(out.contains("# Template used"), "{out}");
        assert!(out.contains("lxc.mount.entry = /usr/lib lib none ro,bind 0 0\n"));
        // A directory that merely shares the prefix is not the container's.
        assert_eq!(
            replace_dir(
                "/var/lib/lxc/c10/x /var/lib/lxc/c1",
                "/var/lib/lxc/c1",
                "/n"
            ),
            "/var/lib/lxc/c10/x /n"
        );
        let same = c.rewritten(
            Path::new("/var/lib/lxc/c1"),
            Path::new("/var/lib/lxc/c1"),
            None,
            None,
        );
        assert_eq!(same, TEMPLATE);
        let elsewhere = c.rewritten(
            Path::new("/var/lib/lxc/c1"),
            Path::new("/srv/lxc/c1"),
            Some(Path::new("/data/c1-root")),
            None,
        );
        assert!(
            elsewhere.contains("lxc.rootfs.path = dir:/data/c1-root\n"),
            "{elsewhere}"
        );
    }

    #[test]
    fn includes_are_followed_and_later_lines_win() {
        let d = tempfile::tempdir().unwrap();
        let inc = d.path().join("common.conf");
        std::fs::write(
            &inc,
            "lxc.tty.max = 4\nlxc.mount.entry = /a a none bind 0 0\n",
        )
        .unwrap();
        let main = d.path().join("config");
        std::fs::write(
            &main,
            format!("lxc.include = {}\nlxc.tty.max = 0\n", inc.display()),
        )
        .unwrap();
        let c = Config::read(&main).unwrap();
        assert_eq!(c.get("lxc.tty.max"), Some("0"));
        assert_eq!(c.bind_mounts().len(), 1);
        assert_eq!(c.lines.len(), 2, "only the main file's own lines travel");
    }

    #[test]
    fn names() {
        assert!(valid_name("web-1.a_b"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
