//! What a check found: [`CheckReport`] and its [`Problem`]s.

use std::fmt;

/// The result of [`Qcow2::check`](crate::Qcow2::check): the counts `qemu-img check` reports
/// (QEMU's `ImageCheck`), and the problems found, each with its file offset.
///
/// With the `serde` feature it serializes to the JSON `qemu-img check --output=json` prints:
/// the same field names, zero counts left out as qemu-img leaves them out, and the fields in
/// the order qemu-img prints them (its dictionary's hash order).
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/snap.qcow2")?;
/// let report = image.check()?;
/// assert!(report.is_clean());
/// assert_eq!(report.total_clusters, 512);
/// assert!(report.allocated_clusters > 0);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CheckReport {
    /// One past the last byte of the last cluster that is referenced or has a refcount: how
    /// long the file needs to be.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "image-end-offset", skip_serializing_if = "is_zero")
    )]
    pub image_end_offset: u64,
    /// Compressed clusters of the active image.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "compressed-clusters", skip_serializing_if = "is_zero")
    )]
    pub compressed_clusters: u64,
    /// Clusters of the virtual disk (its size in clusters, rounded up).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "total-clusters", skip_serializing_if = "is_zero")
    )]
    pub total_clusters: u64,
    /// Problems that may corrupt data: a refcount lower than the references to its cluster,
    /// malformed table entries, references past the end of the file, wrong COPIED flags.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "is_zero"))]
    pub corruptions: u64,
    /// Corruptions repaired ([`Qcow2::repair`](crate::Qcow2::repair); 0 for a check).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "corruptions-fixed", skip_serializing_if = "is_zero")
    )]
    pub corruptions_fixed: u64,
    /// Problems that kept part of the check from running (a refcount that could not be read).
    #[cfg_attr(feature = "serde", serde(rename = "check-errors"))]
    pub check_errors: u64,
    /// Clusters whose refcount is higher than the references to them: wasted space.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "is_zero"))]
    pub leaks: u64,
    /// Leaks repaired ([`Qcow2::repair`](crate::Qcow2::repair); 0 for a check).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "leaks-fixed", skip_serializing_if = "is_zero")
    )]
    pub leaks_fixed: u64,
    /// Clusters of the active image that hold data (compressed, or allocated zeros included).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "allocated-clusters", skip_serializing_if = "is_zero")
    )]
    pub allocated_clusters: u64,
    /// The image's name as the caller gave it (the path, when opened by path).
    pub filename: String,
    /// Always `qcow2`.
    pub format: String,
    /// Allocated clusters of the active image that do not follow the previous one in the
    /// file (within an L2 table); every compressed cluster counts as fragmented, as in QEMU.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "fragmented-clusters", skip_serializing_if = "is_zero")
    )]
    pub fragmented_clusters: u64,
    /// The problems found, in the order `qemu-img check` reports them (at most
    /// [`CheckOptions::max_problems`](crate::CheckOptions::max_problems) of them).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub problems: Vec<Problem>,
    /// Problems found but left out of `problems` because there were too many.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub problems_omitted: u64,
}

#[cfg(feature = "serde")]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CheckReport {
    pub(crate) fn new(filename: String) -> Self {
        CheckReport {
            image_end_offset: 0,
            compressed_clusters: 0,
            total_clusters: 0,
            corruptions: 0,
            check_errors: 0,
            leaks: 0,
            allocated_clusters: 0,
            filename,
            format: "qcow2".to_owned(),
            fragmented_clusters: 0,
            corruptions_fixed: 0,
            leaks_fixed: 0,
            problems: Vec::new(),
            problems_omitted: 0,
        }
    }

    /// No corruption, no leak, no check error.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }

    /// The exit status `qemu-img check` gives this result: 1 when the check had errors,
    /// 2 for corruptions, 3 for leaks only, 0 for a clean image.
    ///
    /// ```
    /// let report = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?.check()?;
    /// assert_eq!(report.exit_status(), 0);
    /// assert!(report.is_clean());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn exit_status(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The summary `qemu-img check` prints on stdout (human output), ending in a newline.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if self.is_clean() {
            out.push_str("No errors were found on the image.\n");
        }
        if self.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it.\n",
                self.corruptions
            ));
        }
        if self.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\n\
                 This means waste of disk space, but no harm to data.\n",
                self.leaks
            ));
        }
        if self.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                self.check_errors
            ));
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let (allocated, total) = (self.allocated_clusters as f64, self.total_clusters as f64);
            out.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                allocated * 100.0 / total,
                self.fragmented_clusters as f64 * 100.0 / allocated,
                self.compressed_clusters as f64 * 100.0 / allocated,
            ));
        }
        if self.image_end_offset != 0 {
            out.push_str(&format!("Image end offset: {}\n", self.image_end_offset));
        }
        out
    }

    /// Count one problem of this class.
    pub(crate) fn count(&mut self, class: ProblemClass) {
        let n = match class {
            ProblemClass::Corruption => &mut self.corruptions,
            ProblemClass::Leak => &mut self.leaks,
            ProblemClass::CheckError => &mut self.check_errors,
        };
        *n = n.saturating_add(1);
    }
}

/// How a [`Problem`] counts in a [`CheckReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemClass {
    /// Counted in [`CheckReport::corruptions`].
    Corruption,
    /// Counted in [`CheckReport::leaks`].
    Leak,
    /// Counted in [`CheckReport::check_errors`].
    CheckError,
}

/// One inconsistency found by a check.
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/v3-dirty.qcow2")?;
/// for problem in &image.check()?.problems {
///     println!("{problem} ({:?}, at file offset {:#x})", problem.kind.class(), problem.offset);
/// }
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The file offset it concerns: the cluster, table or entry at fault.
    pub offset: u64,
}

impl fmt::Display for Problem {
    /// The line `qemu-img check` prints on stderr for this problem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

/// What is wrong, with the values QEMU prints. Each variant says which message of QEMU's
/// `qcow2_check_refcounts` it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A cluster's refcount is higher than the references to it (a leak).
    LeakedCluster {
        /// Host cluster index.
        cluster: u64,
        /// Its stored refcount.
        refcount: u64,
        /// References found.
        references: u64,
    },
    /// A cluster's refcount is lower than the references to it (0 for a used cluster
    /// included): freeing it would free data still in use.
    RefcountTooLow {
        /// Host cluster index.
        cluster: u64,
        /// Its stored refcount.
        refcount: u64,
        /// References found.
        references: u64,
    },
    /// A cluster's refcount could not be read (its refcount block offset is unaligned).
    RefcountUnreadable {
        /// Host cluster index.
        cluster: u64,
    },
    /// A cluster has more references than the refcount width can count.
    ReferenceOverflow {
        /// Host offset of the cluster.
        cluster_offset: u64,
    },
    /// A structure reaches a cluster or more past the end of the file.
    PastEndOfFile {
        /// Its offset.
        offset: u64,
        /// Its length.
        size: u64,
    },
    /// An L1 entry has reserved bits set (bits 0-8 or 56-62).
    L1EntryReserved {
        /// The entry.
        entry: u64,
    },
    /// An L1 entry's L2 table offset is not cluster aligned.
    L2TableUnaligned {
        /// The L2 table offset.
        l2_offset: u64,
    },
    /// A standard L2 entry has reserved bits set (bits 1-8 or 56-61).
    L2EntryReserved {
        /// The entry.
        entry: u64,
    },
    /// A compressed cluster's L2 entry has the COPIED flag, which must never be set there.
    CompressedCopied {
        /// The compressed data's host offset.
        host_offset: u64,
    },
    /// A compressed cluster in an image with an external data file.
    CompressedWithDataFile {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// A compressed cluster with a non-zero subcluster bitmap (extended L2).
    CompressedWithSubclusters {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// An allocated cluster's subclusters are marked both allocated and zero.
    SubclusterBitmapCorrupt {
        /// The cluster's host offset.
        host_offset: u64,
    },
    /// An unallocated cluster has allocated subclusters.
    UnallocatedWithSubclusters,
    /// A data cluster's host offset is not cluster aligned.
    DataClusterUnaligned {
        /// The host offset.
        host_offset: u64,
        /// The entry reads as zeros (a preallocated zero cluster).
        zero: bool,
    },
    /// The image has an external data file and internal snapshots.
    SnapshotsWithDataFile {
        /// How many snapshots.
        count: u32,
    },
    /// A snapshot's L1 table offset is not cluster aligned.
    SnapshotL1Unaligned {
        /// Snapshot id.
        id: String,
        /// Snapshot name.
        name: String,
        /// The L1 table offset.
        l1_offset: u64,
    },
    /// A snapshot's L1 table is larger than QEMU allows (32 MiB).
    SnapshotL1TooLarge {
        /// Snapshot id.
        id: String,
        /// Snapshot name.
        name: String,
        /// Its entries.
        l1_size: u32,
    },
    /// A refcount table entry has reserved bits set.
    RefcountTableEntryReserved {
        /// Its index.
        index: u64,
    },
    /// A refcount block offset is not cluster aligned.
    RefcountBlockUnaligned {
        /// Its refcount table index.
        index: u64,
    },
    /// A refcount block lies past the end of the file.
    RefcountBlockOutsideImage {
        /// Its refcount table index.
        index: u64,
    },
    /// A refcount block's cluster is referenced by something else too.
    RefcountBlockShared {
        /// Its refcount table index.
        index: u64,
        /// References to its cluster.
        references: u64,
    },
    /// An L1 entry's COPIED flag disagrees with its L2 table's refcount (set iff it is 1).
    CopiedFlagL2Table {
        /// Index in the active L1 table.
        l1_index: u64,
        /// The L1 entry.
        l1_entry: u64,
        /// The L2 table's stored refcount.
        refcount: u64,
    },
    /// An L2 entry's COPIED flag disagrees with its cluster's refcount (set iff it is 1).
    CopiedFlagData {
        /// The L2 entry.
        l2_entry: u64,
        /// The data cluster's stored refcount.
        refcount: u64,
    },
}

impl ProblemKind {
    /// How the problem counts.
    pub fn class(&self) -> ProblemClass {
        match self {
            ProblemKind::LeakedCluster { .. } => ProblemClass::Leak,
            ProblemKind::RefcountUnreadable { .. } => ProblemClass::CheckError,
            _ => ProblemClass::Corruption,
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProblemKind as K;
        match self {
            K::LeakedCluster {
                cluster,
                refcount,
                references,
            } => write!(
                f,
                "Leaked cluster {cluster} refcount={refcount} reference={references}"
            ),
            K::RefcountTooLow {
                cluster,
                refcount,
                references,
            } => write!(
                f,
                "ERROR cluster {cluster} refcount={refcount} reference={references}"
            ),
            K::RefcountUnreadable { cluster } => write!(
                f,
                "Can't get refcount for cluster {cluster}: Input/output error"
            ),
            K::ReferenceOverflow { cluster_offset } => write!(
                f,
                "ERROR: overflow cluster offset={cluster_offset:#x}\n\
                 Use qemu-img amend to increase the refcount entry width or qemu-img convert \
                 to create a clean copy if the image cannot be opened for writing"
            ),
            K::PastEndOfFile { offset, size } => write!(
                f,
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ),
            K::L1EntryReserved { entry } => {
                write!(f, "ERROR found L1 entry with reserved bits set: {entry:x}")
            }
            K::L2TableUnaligned { l2_offset } => write!(
                f,
                "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            K::L2EntryReserved { entry } => {
                write!(f, "ERROR found l2 entry with reserved bits set: {entry:x}")
            }
            K::CompressedCopied { host_offset } => write!(
                f,
                "ERROR: coffset={host_offset:#x}: copied flag must never be set for compressed \
                 clusters"
            ),
            K::CompressedWithDataFile { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with data file, entry={entry:#x}"
            ),
            K::CompressedWithSubclusters { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, \
                 entry={entry:#x}"
            ),
            K::SubclusterBitmapCorrupt { host_offset } => write!(
                f,
                "ERROR offset={host_offset:x}: Allocated cluster has corrupted subcluster \
                 allocation bitmap"
            ),
            K::UnallocatedWithSubclusters => write!(
                f,
                "ERROR: Unallocated cluster has non-zero subcluster allocation map"
            ),
            K::DataClusterUnaligned { host_offset, zero } => {
                let what = if *zero { "Preallocated" } else { "Data" };
                write!(
                    f,
                    "ERROR offset={host_offset:x}: {what} cluster is not properly aligned; L2 \
                     entry corrupted."
                )
            }
            K::SnapshotsWithDataFile { count } => {
                write!(f, "ERROR {count} snapshots in image with data file")
            }
            K::SnapshotL1Unaligned {
                id,
                name,
                l1_offset,
            } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_offset={l1_offset:#x}: L1 table is not cluster \
                 aligned; snapshot table entry corrupted"
            ),
            K::SnapshotL1TooLarge { id, name, l1_size } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_size={l1_size:#x}: L1 table is too large; \
                 snapshot table entry corrupted"
            ),
            K::RefcountTableEntryReserved { index } => write!(
                f,
                "ERROR refcount table entry {index} has reserved bits set"
            ),
            K::RefcountBlockUnaligned { index } => write!(
                f,
                "ERROR refcount block {index} is not cluster aligned; refcount table entry \
                 corrupted"
            ),
            K::RefcountBlockOutsideImage { index } => {
                write!(f, "ERROR refcount block {index} is outside image")
            }
            K::RefcountBlockShared { index, references } => {
                write!(f, "ERROR refcount block {index} refcount={references}")
            }
            K::CopiedFlagL2Table {
                l1_index,
                l1_entry,
                refcount,
            } => write!(
                f,
                "ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} \
                 refcount={refcount}"
            ),
            K::CopiedFlagData { l2_entry, refcount } => write!(
                f,
                "ERROR OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_matches_qemu_img_wording() {
        let mut r = CheckReport::new("x".into());
        r.total_clusters = 16;
        r.allocated_clusters = 2;
        r.image_end_offset = 458752;
        assert_eq!(
            r.summary(),
            "No errors were found on the image.\n\
             2/16 = 12.50% allocated, 0.00% fragmented, 0.00% compressed clusters\n\
             Image end offset: 458752\n"
        );
        r.corruptions = 3;
        r.leaks = 1;
        assert_eq!(r.exit_status(), 2);
        assert!(r.summary().starts_with(
            "\n3 errors were found on the image.\n\
             Data may be corrupted, or further writes to the image may corrupt it.\n\
             \n1 leaked clusters were found on the image.\n"
        ));
    }

    #[test]
    fn problems_are_counted_by_class() {
        let mut r = CheckReport::new(String::new());
        let leak = ProblemKind::LeakedCluster {
            cluster: 9,
            refcount: 1,
            references: 0,
        };
        r.count(leak.class());
        r.count(leak.class());
        assert_eq!(r.leaks, 2);
        assert_eq!(leak.to_string(), "Leaked cluster 9 refcount=1 reference=0");
        assert_eq!(r.exit_status(), 3);
        r.count(ProblemKind::RefcountUnreadable { cluster: 1 }.class());
        assert_eq!(r.exit_status(), 1);
    }
}
