//! ploop's disk descriptor, `DiskDescriptor.xml`: the images (delta files)
//! of a disk, its snapshots (each a GUID with its parent's GUID) and the
//! top GUID (the snapshot whose image is the active, writable delta).
//!
//! The format is ploop's own (lib/xml.c in OpenVZ's ploop):
//!
//! ```text
//! <Parallels_disk_image>            (Virtuozzo_disk_image in newer ploop)
//!   <Disk_Parameters>...</Disk_Parameters>
//!   <StorageData><Storage>
//!     <Start>0</Start><End>..</End><Blocksize>2048</Blocksize>
//!     <Image><GUID>{..}</GUID><Type>Compressed</Type><File>root.hds</File></Image>
//!     ...
//!   </Storage></StorageData>
//!   <Snapshots>
//!     <TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>
//!     <Shot><GUID>{..}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>
//!     ...
//!   </Snapshots>
//! </Parallels_disk_image>
//! ```
//!
//! The driver reads descriptors (which delta is active, which file a
//! snapshot created); only the stand-in ([`crate::standin`]) changes them,
//! imitating what `ploop snapshot` and `ploop snapshot-delete` do.

use std::path::{Path, PathBuf};

use crate::error::{Result, VzError};
use crate::xml::Element;

/// The descriptor's file name inside a disk's directory.
pub const DESCRIPTOR: &str = "DiskDescriptor.xml";

/// The parent GUID of a base image.
pub const NONE_GUID: &str = "{00000000-0000-0000-0000-000000000000}";

/// The top GUID ploop gives a disk's active delta.
pub const TOP_GUID: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";

/// The root element names ploop writes (older and newer releases).
const ROOTS: [&str; 2] = ["Parallels_disk_image", "Virtuozzo_disk_image"];

/// One image (delta file) of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The snapshot GUID the image belongs to.
    pub guid: String,
    /// The file, as written (relative to the descriptor's directory, or
    /// absolute).
    pub file: String,
}

/// One snapshot of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shot {
    /// Its GUID.
    pub guid: String,
    /// Its parent's GUID ([`NONE_GUID`] for the base).
    pub parent: String,
}

/// A parsed `DiskDescriptor.xml`.
#[derive(Debug, Clone)]
pub struct DiskDescriptor {
    path: PathBuf,
    tree: Element,
}

/// The descriptor of the disk at `path`: `path` itself when it names a
/// file, `path/DiskDescriptor.xml` when it names the disk's directory.
pub fn descriptor_path(path: &Path) -> PathBuf {
    if path.file_name().is_some_and(|n| n == DESCRIPTOR) {
        path.to_path_buf()
    } else {
        path.join(DESCRIPTOR)
    }
}

/// A GUID in ploop's form (`{xxxxxxxx-...}`), from the kernel's generator.
pub fn new_guid() -> Result<String> {
    let p = "/proc/sys/kernel/random/uuid";
    let raw = std::fs::read_to_string(p).map_err(|e| VzError::io(p, e))?;
    Ok(format!("{{{}}}", raw.trim()))
}

impl DiskDescriptor {
    /// Reads and checks the descriptor at `path`.
    pub fn load(path: &Path) -> Result<DiskDescriptor> {
        let text = std::fs::read_to_string(path).map_err(|e| VzError::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses and checks descriptor text read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<DiskDescriptor> {
        let tree = Element::parse(text).map_err(|e| VzError::descriptor(path, e))?;
        let d = DiskDescriptor {
            path: path.to_path_buf(),
            tree,
        };
        d.check()?;
        Ok(d)
    }

    /// Where it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory relative file names are resolved against.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    fn storage(&self) -> Option<&Element> {
        self.tree.child("StorageData")?.child("Storage")
    }

    fn storage_mut(&mut self) -> Option<&mut Element> {
        self.tree.child_mut("StorageData")?.child_mut("Storage")
    }

    fn snapshots(&self) -> Option<&Element> {
        self.tree.child("Snapshots")
    }

    /// The images, in the order written.
    pub fn images(&self) -> Vec<Image> {
        self.storage()
            .map(|s| {
                s.children_named("Image")
                    .map(|i| Image {
                        guid: i.child_text("GUID").unwrap_or("").to_string(),
                        file: i.child_text("File").unwrap_or("").to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The snapshots, in the order written.
    pub fn shots(&self) -> Vec<Shot> {
        self.snapshots()
            .map(|s| {
                s.children_named("Shot")
                    .map(|i| Shot {
                        guid: i.child_text("GUID").unwrap_or("").to_string(),
                        parent: i.child_text("ParentGUID").unwrap_or("").to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The GUID of the active snapshot.
    pub fn top_guid(&self) -> &str {
        self.snapshots()
            .and_then(|s| s.child_text("TopGUID"))
            .unwrap_or("")
    }

    /// The image of snapshot `guid`.
    pub fn image(&self, guid: &str) -> Option<Image> {
        self.images().into_iter().find(|i| i.guid == guid)
    }

    /// The absolute path of an image's file.
    pub fn file_path(&self, image: &Image) -> PathBuf {
        let f = Path::new(&image.file);
        if f.is_absolute() {
            f.to_path_buf()
        } else {
            self.dir().join(f)
        }
    }

    /// The images from the base up to the top (the order reads overlay).
    pub fn chain(&self) -> Vec<Image> {
        let shots = self.shots();
        let mut out = Vec::new();
        let mut at = self.top_guid().to_string();
        while at != NONE_GUID && out.len() <= shots.len() {
            let Some(image) = self.image(&at) else { break };
            out.push(image);
            match shots.iter().find(|s| s.guid == at) {
                Some(s) => at = s.parent.clone(),
                None => break,
            }
        }
        out.reverse();
        out
    }

    /// The active (top) delta's path.
    pub fn active_delta(&self) -> PathBuf {
        let top = self.image(self.top_guid()).unwrap_or(Image {
            guid: String::new(),
            file: String::new(),
        });
        self.file_path(&top)
    }

    /// The checks ploop makes when it opens a descriptor: a known root, a
    /// top GUID with an image, as many images as snapshots, every image's
    /// snapshot present, every parent present, and one chain from the top
    /// down to a base.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(VzError::descriptor(&self.path, m));
        if !ROOTS.contains(&self.tree.name.as_str()) {
            return bad(format!(
                "root element <{}> is not a ploop disk image",
                self.tree.name
            ));
        }
        if self.storage().is_none() {
            return bad("no StorageData/Storage".into());
        }
        if self.snapshots().is_none() {
            return bad("no Snapshots".into());
        }
        let images = self.images();
        let shots = self.shots();
        if images.is_empty() {
            return bad("no images".into());
        }
        if images.len() != shots.len() {
            return bad(format!(
                "images({}) != snapshots({})",
                images.len(),
                shots.len()
            ));
        }
        for i in &images {
            if i.guid.is_empty() || i.file.is_empty() {
                return bad("an image without GUID or File".into());
            }
            if !shots.iter().any(|s| s.guid == i.guid) {
                return bad(format!("image {} has no snapshot", i.guid));
            }
        }
        for s in &shots {
            if s.parent != NONE_GUID && !shots.iter().any(|p| p.guid == s.parent) {
                return bad(format!(
                    "snapshot {} has a missing parent {}",
                    s.guid, s.parent
                ));
            }
        }
        if self.image(self.top_guid()).is_none() {
            return bad(format!("top delta {} is not found", self.top_guid()));
        }
        let chain = self.chain();
        match chain.first() {
            Some(base)
                if shots
                    .iter()
                    .any(|s| s.guid == base.guid && s.parent == NONE_GUID) => {}
            _ => return bad("the top snapshot does not lead down to a base image".into()),
        }
        Ok(())
    }

    /// Writes the descriptor to `path` (a temporary file renamed into
    /// place, so a reader sees the old or the new one, never half).
    pub fn store(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("xml.tmp");
        std::fs::write(&tmp, self.tree.to_document()).map_err(|e| VzError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| VzError::io(path, e))
    }

    /// Renames snapshot `old` to `new` in its image, its shot and its
    /// children's parents; the top GUID is left as it is (ploop keeps the
    /// top GUID when it snapshots or merges).
    pub fn rename_guid(&mut self, old: &str, new: &str) {
        fn walk(e: &mut Element, old: &str, new: &str) {
            if matches!(e.name.as_str(), "GUID" | "ParentGUID") && e.text == old {
                e.text = new.to_string();
            }
            for c in &mut e.children {
                walk(c, old, new);
            }
        }
        walk(&mut self.tree, old, new);
    }

    /// Adds an image and its snapshot.
    pub fn add_image(&mut self, guid: &str, file: &str, parent: &str) {
        if let Some(s) = self.storage_mut() {
            s.children.push(Element::with(
                "Image",
                vec![
                    Element::text("GUID", guid),
                    Element::text("Type", "Compressed"),
                    Element::text("File", file),
                ],
            ));
        }
        if let Some(s) = self.tree.child_mut("Snapshots") {
            s.children.push(Element::with(
                "Shot",
                vec![
                    Element::text("GUID", guid),
                    Element::text("ParentGUID", parent),
                ],
            ));
        }
    }

    /// Removes snapshot `guid` and its image.
    pub fn remove_image(&mut self, guid: &str) {
        let is = |e: &Element| e.child_text("GUID") == Some(guid);
        if let Some(s) = self.storage_mut() {
            s.children.retain(|e| !(e.name == "Image" && is(e)));
        }
        if let Some(s) = self.tree.child_mut("Snapshots") {
            s.children.retain(|e| !(e.name == "Shot" && is(e)));
        }
    }

    /// Sets the parent of snapshot `guid`.
    pub fn set_parent(&mut self, guid: &str, parent: &str) {
        if let Some(s) = self.tree.child_mut("Snapshots") {
            for shot in s.children.iter_mut().filter(|e| e.name == "Shot") {
                if shot.child_text("GUID") == Some(guid) {
                    if let Some(p) = shot.child_mut("ParentGUID") {
                        p.text = parent.to_string();
                    }
                }
            }
        }
    }

    /// A one-image descriptor (what `ploop init` writes), for the stand-in
    /// and the tests.
    pub fn single(path: &Path, file: &str) -> DiskDescriptor {
        let tree = Element::with(
            "Parallels_disk_image",
            vec![
                Element::with(
                    "Disk_Parameters",
                    vec![
                        Element::text("Disk_size", "2097152"),
                        Element::text("Cylinders", "2080"),
                        Element::text("Heads", "16"),
                        Element::text("Sectors", "63"),
                        Element::text("Padding", "0"),
                    ],
                ),
                Element::with(
                    "StorageData",
                    vec![Element::with(
                        "Storage",
                        vec![
                            Element::text("Start", "0"),
                            Element::text("End", "2097152"),
                            Element::text("Blocksize", "2048"),
                            Element::with(
                                "Image",
                                vec![
                                    Element::text("GUID", TOP_GUID),
                                    Element::text("Type", "Compressed"),
                                    Element::text("File", file),
                                ],
                            ),
                        ],
                    )],
                ),
                Element::with(
                    "Snapshots",
                    vec![
                        Element::text("TopGUID", TOP_GUID),
                        Element::with(
                            "Shot",
                            vec![
                                Element::text("GUID", TOP_GUID),
                                Element::text("ParentGUID", NONE_GUID),
                            ],
                        ),
                    ],
                ),
            ],
        );
        DiskDescriptor {
            path: path.to_path_buf(),
            tree,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_descriptor_reads_back_with_one_image_on_top() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(DESCRIPTOR);
        DiskDescriptor::single(&p, "root.hds").store(&p).unwrap();
        let d = DiskDescriptor::load(&p).unwrap();
        assert_eq!(d.top_guid(), TOP_GUID);
        assert_eq!(d.chain().len(), 1);
        assert_eq!(d.active_delta(), dir.path().join("root.hds"));
    }

    #[test]
    fn inconsistent_descriptors_are_refused() {
        let p = Path::new("/x/DiskDescriptor.xml");
        let good = DiskDescriptor::single(p, "root.hds").tree.to_document();
        assert!(DiskDescriptor::parse(p, &good).is_ok());
        let no_top = good.replace(
            &format!("<TopGUID>{TOP_GUID}</TopGUID>"),
            "<TopGUID>{11111111-0000-0000-0000-000000000000}</TopGUID>",
        );
        assert!(DiskDescriptor::parse(p, &no_top).is_err());
        let orphan = good.replace(
            &format!("<ParentGUID>{NONE_GUID}</ParentGUID>"),
            "<ParentGUID>{22222222-0000-0000-0000-000000000000}</ParentGUID>",
        );
        assert!(DiskDescriptor::parse(p, &orphan).is_err());
        let other = good.replace("Parallels_disk_image", "Something");
        assert!(DiskDescriptor::parse(p, &other).is_err());
        assert_eq!(
            descriptor_path(Path::new("/d/root.hdd")),
            Path::new("/d/root.hdd/DiskDescriptor.xml")
        );
    }
}
