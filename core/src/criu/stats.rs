//! CRIU's statistics images, `stats-dump` and `stats-restore`: a service
//! image (two magic numbers) holding one size-prefixed `stats_entry`.

use std::path::Path;

use prost::Message;
use serde::Serialize;

use super::rpc::StatsEntry;

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// Dump statistics, with CRIU's field names (times in microseconds).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DumpStats {
    /// Time to freeze the tree.
    pub freezing_time: u64,
    /// Time the tree was frozen (as CRIU saw it).
    pub frozen_time: u64,
    /// Time to collect the memory.
    pub memdump_time: u64,
    /// Time to write (send) the memory.
    pub memwrite_time: u64,
    /// Pages examined.
    pub pages_scanned: u64,
    /// Pages not written because an earlier iteration had them.
    pub pages_skipped_parent: u64,
    /// Pages written.
    pub pages_written: u64,
}

/// Restore statistics, with CRIU's field names (times in microseconds).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RestoreStats {
    /// Time to fork the tree.
    pub forking_time: u64,
    /// Time of the whole restore.
    pub restore_time: u64,
    /// Pages compared (deduplication).
    pub pages_compared: u64,
    /// Pages skipped as COW-shared.
    pub pages_skipped_cow: u64,
    /// Pages restored.
    pub pages_restored: u64,
}

/// Why a stats image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Reading the file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a stats image.
    #[error("{path} is not a CRIU stats image: {detail}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// A stats image holding `entry`, laid out as CRIU writes one (for the
/// tests and the fuzz seeds).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn image(entry: &StatsEntry) -> Vec<u8> {
    let body = entry.encode_to_vec();
    let mut img = Vec::with_capacity(12 + body.len());
    img.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
    img.extend_from_slice(&STATS_MAGIC.to_le_bytes());
    img.extend_from_slice(&(body.len() as u32).to_le_bytes());
    img.extend_from_slice(&body);
    img
}

/// A dump's statistics as CRIU records them (frozen 2000 us, 99 pages
/// written), for the tests and the fuzz seeds.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn sample_dump_entry() -> StatsEntry {
    StatsEntry {
        dump: Some(crate::criu::rpc::DumpStatsEntry {
            freezing_time: 10,
            frozen_time: 2000,
            memdump_time: 300,
            memwrite_time: 400,
            pages_scanned: 100,
            pages_skipped_parent: 1,
            pages_written: 99,
            irmap_resolve: None,
            pages_lazy: 0,
            page_pipes: None,
            page_pipe_bufs: None,
        }),
        restore: None,
    }
}

fn read_entry(path: &Path) -> Result<StatsEntry, StatsError> {
    let p = path.display().to_string();
    let buf = std::fs::read(path).map_err(|source| StatsError::Io {
        path: p.clone(),
        source,
    })?;
    parse_entry(&buf).map_err(|detail| StatsError::Format { path: p, detail })
}

pub(crate) fn parse_entry(buf: &[u8]) -> Result<StatsEntry, String> {
    let word = |at: usize| -> Result<u32, String> {
        buf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| "truncated".to_string())
    };
    if word(0)? != IMG_SERVICE_MAGIC || word(4)? != STATS_MAGIC {
        return Err("bad magic".into());
    }
    let len = word(8)? as usize;
    let body = buf.get(12..12 + len).ok_or("truncated entry")?;
    StatsEntry::decode(body).map_err(|e| e.to_string())
}

/// Reads `stats-dump` from a CRIU work directory.
pub fn read_dump(dir: &Path) -> Result<DumpStats, StatsError> {
    let path = dir.join("stats-dump");
    let e = read_entry(&path)?;
    let d = e.dump.ok_or_else(|| StatsError::Format {
        path: path.display().to_string(),
        detail: "no dump entry".into(),
    })?;
    Ok(DumpStats {
        freezing_time: d.freezing_time.into(),
        frozen_time: d.frozen_time.into(),
        memdump_time: d.memdump_time.into(),
        memwrite_time: d.memwrite_time.into(),
        pages_scanned: d.pages_scanned,
        pages_skipped_parent: d.pages_skipped_parent,
        pages_written: d.pages_written,
    })
}

/// Reads `stats-restore` from a CRIU work directory.
pub fn read_restore(dir: &Path) -> Result<RestoreStats, StatsError> {
    let path = dir.join("stats-restore");
    let e = read_entry(&path)?;
    let r = e.restore.ok_or_else(|| StatsError::Format {
        path: path.display().to_string(),
        detail: "no restore entry".into(),
    })?;
    Ok(RestoreStats {
        forking_time: r.forking_time.into(),
        restore_time: r.restore_time.into(),
        pages_compared: r.pages_compared,
        pages_skipped_cow: r.pages_skipped_cow,
        pages_restored: r.pages_restored.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stats_image_and_rejects_garbage() {
        let entry = sample_dump_entry();
        let img = image(&entry);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stats-dump"), &img).unwrap();
        let s = read_dump(dir.path()).unwrap();
        assert_eq!(s.frozen_time, 2000);
        assert_eq!(s.pages_written, 99);

        assert!(parse_entry(&img[..10]).is_err());
        assert!(parse_entry(b"not a stats image at all").is_err());
    }
}
