//! The references counted in a window against the stored refcounts (QEMU's
//! `compare_refcounts`), and the COPIED flags of the active tables against the stored
//! refcounts (QEMU's `check_oflag_copied`).

use positioned_io::{ReadAt, Size};

use super::stored::{read_padded, Stored, StoredRefcounts};
use super::{table_bytes, Checker, ProblemKind, PHASE_COMPARE, PHASE_COPIED};
use crate::base::bytes::{be_u64, leading_zero_bytes};
use crate::error::Result;
use crate::format::table::{ClusterType, L1_OFFSET_MASK, L2_OFFSET_MASK, OFLAG_COPIED};

impl<I: ReadAt + Size> Checker<'_, I> {
    /// Compare every cluster of the current window.
    pub(super) fn compare_window(&mut self) -> Result<()> {
        let image = self.image;
        let reftable = std::mem::take(&mut self.reftable);
        let mut stored = StoredRefcounts::new(&image.io, self.layout, &reftable);
        let result = self.compare_with(&mut stored);
        drop(stored);
        self.reftable = reftable;
        result
    }

    fn compare_with(&mut self, stored: &mut StoredRefcounts<'_, I>) -> Result<()> {
        let bits = self.layout.cluster_bits;
        let end = self.window.end.min(self.compared_clusters());
        for cluster in self.window.start..end {
            let refcount = match stored.get(cluster)? {
                Stored::Refcount(r) => r,
                Stored::Unreadable => {
                    self.problem(
                        (PHASE_COMPARE, cluster, 0, 0),
                        ProblemKind::RefcountUnreadable { cluster },
                        cluster << bits,
                    );
                    continue;
                }
            };
            let slot =
                usize::try_from(cluster.saturating_sub(self.window.start)).unwrap_or(usize::MAX);
            let references = self.counters.get(slot);
            if refcount > 0 || references > 0 {
                self.highest = self.highest.max(cluster);
            }
            let kind = if refcount > references {
                ProblemKind::LeakedCluster {
                    cluster,
                    refcount,
                    references,
                }
            } else if refcount < references {
                ProblemKind::RefcountTooLow {
                    cluster,
                    refcount,
                    references,
                }
            } else {
                continue;
            };
            self.problem((PHASE_COMPARE, cluster, 0, 0), kind, cluster << bits);
        }
        Ok(())
    }

    /// Check the COPIED flag of every active L1 and L2 entry: set exactly when the stored
    /// refcount is 1. Entries whose refcount cannot be read are skipped, as QEMU skips them.
    pub(super) fn check_copied_flags(&mut self) -> Result<()> {
        let image = self.image;
        let reftable = std::mem::take(&mut self.reftable);
        let mut stored = StoredRefcounts::new(&image.io, self.layout, &reftable);
        let result = self.copied_with(&mut stored);
        drop(stored);
        self.reftable = reftable;
        result
    }

    pub(super) fn copied_with(&mut self, stored: &mut impl RefcountSource) -> Result<()> {
        let image = self.image;
        let bits = self.layout.cluster_bits;
        let l1_offset = image.header().l1_table_offset();
        let entry_len = image.header().l2_entry_len() as usize;
        let l1 = std::sync::Arc::clone(&image.l1);
        let mut l2 = std::mem::take(&mut self.l2_buf);
        let mut seq = 0u64;
        for (l1_index, &l1_entry) in l1.iter().enumerate() {
            let l2_offset = l1_entry & L1_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Stored::Refcount(refcount) = stored.refcount(l2_offset >> bits)? else {
                continue;
            };
            seq = seq.saturating_add(1);
            if (refcount == 1) != (l1_entry & OFLAG_COPIED != 0) {
                self.problem(
                    (PHASE_COPIED, seq, 0, 0),
                    ProblemKind::CopiedFlagL2Table {
                        l1_index: l1_index as u64,
                        l1_entry,
                        refcount,
                    },
                    l1_offset.saturating_add(table_bytes(l1_index as u64)),
                );
            }
            // Past the end of the file the table reads as zeros: no entry to check.
            if l2_offset >= self.file_len {
                continue;
            }
            if let Err(e) = read_padded(&image.io, l2_offset, &mut l2, "L2 table") {
                self.l2_buf = l2;
                return Err(e);
            }
            let entries = l2.len().checked_div(entry_len).unwrap_or(0);
            let mut j = 0usize;
            while j < entries {
                let at = j.saturating_mul(entry_len);
                // Runs of zero entries (most of a sparse table) have no flag to check.
                let zeros = leading_zero_bytes(l2.get(at..).unwrap_or_default())
                    .checked_div(entry_len)
                    .unwrap_or(0);
                if zeros > 0 {
                    j = j.saturating_add(zeros);
                    continue;
                }
                let raw = l2.get(at..at.saturating_add(entry_len)).unwrap_or_default();
                let index = j;
                j = j.saturating_add(1);
                let l2_entry = be_u64(raw, 0).unwrap_or(0);
                if !matches!(
                    self.geometry.cluster_type(l2_entry),
                    ClusterType::Normal | ClusterType::ZeroAlloc
                ) {
                    continue;
                }
                let refcount = if self.geometry.external_data {
                    1
                } else {
                    match stored.refcount((l2_entry & L2_OFFSET_MASK) >> bits) {
                        Ok(Stored::Refcount(r)) => r,
                        Ok(Stored::Unreadable) => continue,
                        Err(e) => {
                            self.l2_buf = l2;
                            return Err(e);
                        }
                    }
                };
                seq = seq.saturating_add(1);
                if (refcount == 1) != (l2_entry & OFLAG_COPIED != 0) {
                    self.problem(
                        (PHASE_COPIED, seq, 0, 0),
                        ProblemKind::CopiedFlagData { l2_entry, refcount },
                        l2_offset.saturating_add((index as u64).saturating_mul(entry_len as u64)),
                    );
                }
            }
        }
        self.l2_buf = l2;
        Ok(())
    }
}

/// Where the COPIED flags' check reads refcounts: the image's, or a repair's new ones.
pub(super) trait RefcountSource {
    /// The refcount of host cluster `cluster`.
    fn refcount(&mut self, cluster: u64) -> Result<Stored>;
}

impl<I: ReadAt> RefcountSource for StoredRefcounts<'_, I> {
    fn refcount(&mut self, cluster: u64) -> Result<Stored> {
        self.get(cluster)
    }
}

/// A repair's new refcounts, one per host cluster (0 past them).
pub(super) struct NewCounts<'a>(pub(super) &'a [u64]);

impl RefcountSource for NewCounts<'_> {
    fn refcount(&mut self, cluster: u64) -> Result<Stored> {
        let count = usize::try_from(cluster)
            .ok()
            .and_then(|c| self.0.get(c))
            .copied()
            .unwrap_or(0);
        Ok(Stored::Refcount(count))
    }
}
