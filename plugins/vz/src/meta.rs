//! The files the source sends besides CRIU's images (the driver's meta
//! files), and what the destination does with them.
//!
//! - `vz-ct.conf`: the container's configuration as the source has it. The
//!   destination must have the container's configuration before the
//!   migration (vzmigrate copies it first; the file sync needs its
//!   `VE_PRIVATE` before any meta file arrives): it refuses a migration
//!   whose copy describes another container (private area, root,
//!   interfaces, disks) and warns about other differences.
//! - `vz_*.img` (live mode): the values of the container's `ve` cgroup that
//!   libvzctl's `vz-rst` reads from the dump directory and hands to CRIU or
//!   the `ve` cgroup: the clock offsets (`ve.clock_bootbased`,
//!   `ve.clock_monotonic`), `ve.iptables_mask`, `ve.os_release`,
//!   `ve.features`, `ve.aio_max_nr`, `ve.pid_max`, and the core pattern.
//!   They are read with `cgget`/`cgexec` as P.Haul read them; a value that
//!   cannot be read is left out with a warning, as P.Haul did (vz-rst then
//!   uses its defaults). The destination copies them into the dump
//!   directory it gives `vzctl restore`. With the stand-in these come from
//!   plain files of a fake tree: the format of the real values is not
//!   checked anywhere.
//! - `vz-shared-disks.json`: for shared disks, which snapshot the
//!   destination merges once the container runs there
//!   ([`crate::shared::HandoffFile`]). It is written right after the
//!   engine's `storage_snapshot`, while frozen, so the destination knows it
//!   before it restores and needs no data at commit time.

use std::path::Path;

use crate::error::{Result, VzError};
use crate::tools::{VzCommand, VzTools};

/// The container's configuration.
pub const CONF: &str = "vz-ct.conf";

/// The shared-disk hand-off.
pub const SHARED: &str = "vz-shared-disks.json";

/// `ve` cgroup values and the files vz-rst reads them from.
pub const VE_IMAGES: &[(&str, &str)] = &[
    ("vz_clock_bootbased.img", "ve.clock_bootbased"),
    ("vz_clock_monotonic.img", "ve.clock_monotonic"),
    ("vz_iptables_mask.img", "ve.iptables_mask"),
    ("vz_os_release.img", "ve.os_release"),
    ("vz_features.img", "ve.features"),
    ("vz_aio_max_nr.img", "ve.aio_max_nr"),
    ("vz_pid_max.img", "ve.pid_max"),
];

/// The core pattern, read inside the container's `ve` cgroup.
pub const CORE_PATTERN: &str = "vz_core_pattern.img";

/// Whether `name` is one of the `vz_*.img` files.
pub fn is_ve_image(name: &str) -> bool {
    name == CORE_PATTERN || VE_IMAGES.iter().any(|(f, _)| *f == name)
}

/// Writes the `vz_*.img` files into `dir`; the names written, and a warning
/// for each value that could not be read.
pub fn write_ve_images(
    tools: &mut dyn VzTools,
    ctid: &str,
    dir: &Path,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut names = Vec::new();
    let mut warnings = Vec::new();
    let mut each = |file: &str, cmd: VzCommand| -> Result<()> {
        match tools.run(&cmd) {
            Ok(out) => {
                let p = dir.join(file);
                std::fs::write(&p, out.trim_end()).map_err(|e| VzError::io(&p, e))?;
                names.push(file.to_string());
            }
            Err(e) => warnings.push(format!("{file} left out: {e}")),
        }
        Ok(())
    };
    for (file, var) in VE_IMAGES {
        each(
            file,
            VzCommand::VeValue {
                ctid: ctid.to_string(),
                var: var.to_string(),
            },
        )?;
    }
    each(
        CORE_PATTERN,
        VzCommand::CorePattern {
            ctid: ctid.to_string(),
        },
    )?;
    Ok((names, warnings))
}
