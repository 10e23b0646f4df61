//! Which pages of a restored task its pager must fetch: the lazy entries
//! of CRIU's `pagemap-<pid>.img` (private memory a lazy dump left out of
//! the images).

use std::path::Path;

use prost::Message;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// `PE_LAZY`: the pages are fetched after the restore.
const PE_LAZY: u32 = 1 << 1;

#[derive(Clone, PartialEq, Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// The lazy ranges `[start, end)` of task `pid` in `images`, sorted.
pub fn lazy_ranges(images: &Path, pid: i32) -> Result<Vec<(u64, u64)>, String> {
    let path = images.join(format!("pagemap-{pid}.img"));
    let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&data).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a pagemap image (public for the fuzz targets).
pub fn parse(data: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let word = |at: usize| -> Result<u32, String> {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| "truncated".to_string())
    };
    if word(0)? != IMG_COMMON_MAGIC || word(4)? != PAGEMAP_MAGIC {
        return Err("not a CRIU pagemap image".into());
    }
    let mut at = 8;
    let mut first = true;
    let mut out: Vec<(u64, u64)> = Vec::new();
    while at < data.len() {
        let len = word(at)? as usize;
        let body = data
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| "truncated entry".to_string())?;
        at += 4 + len;
        if first {
            PagemapHead::decode(body).map_err(|e| e.to_string())?;
            first = false;
            continue;
        }
        let e = PagemapEntry::decode(body).map_err(|e| e.to_string())?;
        if e.flags.unwrap_or(0) & PE_LAZY == 0 {
            continue;
        }
        let pages = e.nr_pages.unwrap_or(e.compat_nr_pages as u64);
        let end = pages
            .checked_mul(super::uffd::PAGE)
            .and_then(|len| e.vaddr.checked_add(len))
            .ok_or("an entry past the end of the address space")?;
        match out.last_mut() {
            Some(last) if last.1 == e.vaddr => last.1 = end,
            _ => out.push((e.vaddr, end)),
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(buf: &mut Vec<u8>, m: &impl Message) {
        let b = m.encode_to_vec();
        buf.extend((b.len() as u32).to_le_bytes());
        buf.extend(b);
    }

    #[test]
    fn only_lazy_entries_count_and_neighbours_merge() {
        let mut img = Vec::new();
        img.extend(IMG_COMMON_MAGIC.to_le_bytes());
        img.extend(PAGEMAP_MAGIC.to_le_bytes());
        entry(&mut img, &PagemapHead { pages_id: 1 });
        let e = |vaddr, n: u64, flags| PagemapEntry {
            vaddr,
            compat_nr_pages: n as u32,
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(n),
        };
        entry(&mut img, &e(0x1000, 2, PE_LAZY));
        entry(&mut img, &e(0x3000, 1, PE_LAZY | 4));
        entry(&mut img, &e(0x10000, 4, 4));
        entry(&mut img, &e(0x20000, 1, PE_LAZY));
        assert_eq!(
            parse(&img).unwrap(),
            vec![(0x1000, 0x4000), (0x20000, 0x21000)]
        );
        assert!(parse(&img[..img.len() - 1]).is_err());
        assert!(parse(b"not an image").is_err());
    }
}
