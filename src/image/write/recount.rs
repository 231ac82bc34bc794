//! Rebuilding the refcounts of a dirty image (lazy refcounts, its writer killed) before it is
//! written, as QEMU repairs such an image when it opens it for writing: every reference to
//! a host cluster is counted (the header, the L1 and L2 tables of the active image and of
//! every snapshot, the data they map, the refcount structures, the snapshot table, the
//! encryption header, the bitmaps), and every stored refcount that differs is set to the
//! count.
//!
//! A crash part-way leaves the image dirty, as it was: the next open for writing counts
//! again.

use std::collections::HashMap;

use crate::base::io::{be_u64_words, read_metadata, Storage};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::header::TABLE_ENTRY_LEN;
use crate::format::table::{self, ClusterType};
use crate::image::qcow2::Qcow2;
use crate::image::rewrite::snapshot_table_extent;
use crate::image::write::refcounts::Refcounts;

/// References per host cluster: a dense count for clusters inside the file, a sparse one
/// for what points past it (a corrupt image).
struct Counts {
    cluster_bits: u32,
    inside: Vec<u32>,
    beyond: HashMap<u64, u32>,
}

impl Counts {
    /// Count one reference to each cluster of `len` bytes at `offset`. A structure that
    /// reaches far past the end of the file is an error, not a loop over its clusters.
    fn add(&mut self, offset: u64, len: u64) -> Result<()> {
        let Some(last_byte) = len.checked_sub(1) else {
            return Ok(());
        };
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(last_byte) >> self.cluster_bits;
        let file_clusters = self.inside.len() as u64;
        if last.saturating_sub(first.max(file_clusters)) > MAX_CLUSTERS_PAST_END {
            return Err(Error::malformed(
                format!("a structure of {len} bytes reaches far past the end of the file"),
                offset,
            ));
        }
        for cluster in first..=last {
            match usize::try_from(cluster)
                .ok()
                .and_then(|i| self.inside.get_mut(i))
            {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    let n = self.beyond.entry(cluster).or_insert(0);
                    *n = n.saturating_add(1);
                }
            }
        }
        Ok(())
    }
}

/// Clusters a structure may reach past the end of the file before the count gives up.
const MAX_CLUSTERS_PAST_END: u64 = 1 << 16;

/// Count every reference in `image` and set every refcount that differs.
pub(crate) fn rebuild<I: Storage>(
    image: &Qcow2<I>,
    refs: &mut Refcounts,
    file_len: u64,
) -> Result<()> {
    let io = &image.io;
    let header = &image.header;
    let bits = header.cluster_bits();
    let cluster = 1u64 << bits;
    let clusters = file_len.div_ceil(cluster);
    // Four bytes a cluster of the file: bounded by what the file holds.
    Limits::check(
        "refcount rebuild",
        clusters.saturating_mul(4),
        image.limits.max_refcount_table_bytes.saturating_mul(64),
    )?;
    let mut counts = Counts {
        cluster_bits: bits,
        inside: vec![0; usize::try_from(clusters).unwrap_or(usize::MAX)],
        beyond: HashMap::new(),
    };
    counts.add(0, cluster)?; // the header
    count_mapping(
        image,
        &mut counts,
        header.l1_table_offset(),
        header.l1_size(),
    )?;
    for snap in &image.snapshots {
        count_mapping(image, &mut counts, snap.l1_table_offset, snap.l1_size)?;
    }
    let (table_at, table_len) = snapshot_table_extent(image)?;
    counts.add(table_at, table_len)?;
    let (table_offset, table_clusters) = refs.table_location();
    counts.add(table_offset, table_clusters << bits)?;
    for block in refs.blocks()? {
        counts.add(block, cluster)?;
    }
    if let Some(e) = header.encryption() {
        counts.add(e.offset, e.length)?;
    }
    count_bitmaps(image, &mut counts)?;
    apply(io, refs, &counts)
}

/// The L1 table at `offset` and everything it maps.
fn count_mapping<I: Storage>(
    image: &Qcow2<I>,
    counts: &mut Counts,
    offset: u64,
    entries: u32,
) -> Result<()> {
    let io = &image.io;
    let g = image.geometry;
    let l1_len = u64::from(entries).saturating_mul(TABLE_ENTRY_LEN);
    counts.add(offset, l1_len)?;
    let l1 = read_metadata(io, offset, l1_len, "L1 table")?;
    let words = if g.extended_l2 { 2 } else { 1 };
    for (i, entry) in be_u64_words(&l1).enumerate() {
        let at = offset.saturating_add((i as u64).saturating_mul(8));
        let Some(l2) = table::l2_table_offset(entry, &g, at)? else {
            continue;
        };
        let cluster = 1u64 << g.cluster_bits;
        counts.add(l2, cluster)?;
        let table = read_metadata(io, l2, cluster, "L2 table")?;
        for word in be_u64_words(&table).step_by(words) {
            match g.cluster_type(word) {
                ClusterType::Normal | ClusterType::ZeroAlloc if !g.external_data => {
                    counts.add(word & table::L2_OFFSET_MASK, cluster)?;
                }
                ClusterType::Compressed => {
                    let (at, len) = g.compressed_extent(word);
                    counts.add(at, len)?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The bitmap directory, each bitmap's table, and the data clusters the tables name.
fn count_bitmaps<I: Storage>(image: &Qcow2<I>, counts: &mut Counts) -> Result<()> {
    let Some(ext) = image.header.bitmaps() else {
        return Ok(());
    };
    if image.bitmaps.is_empty() {
        return Ok(());
    }
    counts.add(ext.directory_offset, ext.directory_size)?;
    let bits = image.header.cluster_bits();
    for b in &image.bitmaps {
        counts.add(
            b.table_offset,
            u64::from(b.table_size).saturating_mul(TABLE_ENTRY_LEN),
        )?;
        let table = crate::image::dirty::read_table(&image.io, b, image.guest_size(), bits)?;
        for entry in table {
            if let crate::format::bitmap::DataCluster::At(at) = entry {
                counts.add(at, 1u64 << bits)?;
            }
        }
    }
    Ok(())
}

/// Set every refcount that differs from its count. A reference past the end of the file
/// cannot be repaired (QEMU's check reports it and leaves it): the image is refused.
fn apply<I: Storage>(io: &I, refs: &mut Refcounts, counts: &Counts) -> Result<()> {
    if let Some(&cluster) = counts.beyond.keys().min() {
        return Err(Error::malformed(
            format!(
                "cluster {cluster} is referenced past the end of the file: the dirty image's \
                 refcounts cannot be rebuilt"
            ),
            cluster << counts.cluster_bits,
        ));
    }
    // New refcount blocks go above every cluster anything refers to.
    let highest = counts.inside.len() as u64;
    refs.reserve_below(highest);
    // Clusters from `highest` on hold nothing anyone refers to (new blocks go there).
    let end = refs
        .covered_clusters()
        .min(highest)
        .max(counts.inside.len() as u64);
    for cluster in 0..end {
        let counted = usize::try_from(cluster)
            .ok()
            .and_then(|i| counts.inside.get(i))
            .copied()
            .unwrap_or(0);
        refs.set_if_different(io, cluster, u64::from(counted))?;
    }
    Ok(())
}
