//! Internal snapshots made, applied and deleted, as `qemu-img snapshot -c / -a / -d` do,
//! each landing whole or not at all ([`Rewrite`]).
//!
//! Refcounts follow QEMU's rule: a data cluster counts one reference per L1 table (active or
//! snapshot) that reaches it through an L2 table, and an L2 table one per L1 table naming
//! it. The active tables then carry the COPIED flag exactly where the refcount is 1.
//!
//! Where QEMU rewrites the shared L2 tables' flags in place, here the active image gets new
//! copies of the L2 tables whose flags change (the snapshot keeps the old ones), so the old
//! tables stay valid until the header switches.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::base::io::{be_u64_words, read_metadata, Storage};
use crate::error::{Error, Result};
use crate::format::header::at;
use crate::format::new_header::put;
use crate::format::snapshot::{self, Snapshot};
use crate::format::table::{self, ClusterType, L2_OFFSET_MASK, OFLAG_COPIED};
use crate::image::qcow2::{read_l1, Qcow2};
use crate::image::rewrite::{l1_bytes, snapshot_table_extent, Rewrite};

/// QEMU's limit on the number of snapshots (`QCOW_MAX_SNAPSHOTS`).
const MAX_SNAPSHOTS: usize = 65536;

impl<S: Storage> Qcow2<S> {
    /// Take an internal snapshot of the disk as it is now, named `name`, as `qemu-img
    /// snapshot -c` does: it gets the next free numeric id, today's date and the disk size.
    /// The image must be open for writing ([`OpenOptions::write`](crate::OpenOptions::write))
    /// and no [`Writer`](crate::Writer) open on it. The snapshot is durable when this returns;
    /// a crash before leaves the image as it was.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("qcow2-doc-snap-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let path = dir.join("disk.qcow2");
    /// qcow2::create(&path, &qcow2::CreateOptions::new(64 << 20))?;
    /// let options = qcow2::OpenOptions::new().write(true);
    /// let mut image = qcow2::Qcow2::open_path_with(&path, &options)?;
    /// let snap = image.create_snapshot("before-upgrade")?;
    /// assert_eq!((snap.id.as_str(), snap.name.as_str()), ("1", "before-upgrade"));
    ///
    /// let disk = image.into_writer()?;
    /// disk.write_all_at(0, b"upgraded")?;
    /// let mut image = disk.close()?;
    /// image.apply_snapshot("before-upgrade")?; // the disk as it was
    /// image.delete_snapshot("before-upgrade")?;
    /// assert!(image.snapshots().is_empty());
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create_snapshot(&mut self, name: &str) -> Result<Snapshot> {
        self.prepare_snapshot_job()?;
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            return Err(Error::InvalidOption {
                option: "snapshot".into(),
                message: format!("an image holds at most {MAX_SNAPSHOTS} snapshots"),
            });
        }
        let snap = self.new_snapshot_entry(name);
        let mut rw = Rewrite::new(self)?;
        let active = self.l1.to_vec();
        count_mapping(self, &mut rw, &active, 1)?;
        // The snapshot keeps the old active L1 table; the active image gets a new one.
        let new_l1 = rebuild_active(self, &mut rw, &active, None)?
            .ok_or(Error::Internal("a new active L1 table was asked for"))?;
        let entry = snapshot::encode_entry(&snap).ok_or_else(|| Error::InvalidOption {
            option: "snapshot".into(),
            message: "the snapshot name is longer than 65535 bytes".into(),
        })?;
        let mut table = self.snapshot_table_bytes()?;
        table.extend_from_slice(&entry);
        let (table_at, count) = replace_snapshot_table(
            self,
            &mut rw,
            &table,
            self.snapshots.len().saturating_add(1),
        )?;
        let l1_size = self.header.l1_size();
        rw.commit(|h| {
            set_l1(h, new_l1, l1_size);
            set_snapshot_table(h, table_at, count);
            Ok(())
        })?;
        self.reload()?;
        Ok(snap)
    }

    /// Revert the disk to the snapshot with id or name `id_or_name`, as `qemu-img snapshot
    /// -a` does (the disk takes the snapshot's size too). Refused while the image has
    /// persistent dirty bitmaps, as QEMU refuses it ("Device has active dirty bitmaps"). Durable when it returns; a crash before
    /// leaves the image as it was.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.prepare_snapshot_job()?;
        let snap = self.find_snapshot(id_or_name)?.clone();
        if !self.bitmaps.is_empty() {
            return Err(Error::UnsupportedWrite {
                what: "applying a snapshot to an image with dirty bitmaps".into(),
            });
        }
        let mut rw = Rewrite::new(self)?;
        let mut target = read_l1(&self.io, snap.l1_table_offset, snap.l1_size)?.to_vec();
        count_mapping(self, &mut rw, &target, 1)?;
        let active = self.l1.to_vec();
        count_mapping(self, &mut rw, &active, -1)?;
        rw.release(
            self.header.l1_table_offset(),
            l1_bytes(self.header.l1_size()),
        );
        let l1_size = self.header.l1_size().max(snap.l1_size);
        target.resize(l1_size as usize, 0);
        let new_l1 = rebuild_active(self, &mut rw, &target, None)?
            .ok_or(Error::Internal("a new active L1 table was asked for"))?;
        let size = snap.disk_size.unwrap_or(self.header.size());
        rw.commit(|h| {
            set_l1(h, new_l1, l1_size);
            put(h, at::SIZE, &size.to_be_bytes());
            Ok(())
        })?;
        self.reload()
    }

    /// Delete the snapshot with id or name `id_or_name`, as `qemu-img snapshot -d` does: the
    /// clusters only it used are freed. Returns the snapshot deleted. Durable when it returns;
    /// a crash before leaves the image as it was.
    pub fn delete_snapshot(&mut self, id_or_name: &str) -> Result<Snapshot> {
        self.prepare_snapshot_job()?;
        let index = self.snapshot_index(id_or_name)?;
        let snap = self
            .snapshots
            .get(index)
            .cloned()
            .ok_or(Error::Internal("snapshot index"))?;
        let mut rw = Rewrite::new(self)?;
        let gone = read_l1(&self.io, snap.l1_table_offset, snap.l1_size)?.to_vec();
        count_mapping(self, &mut rw, &gone, -1)?;
        rw.release(snap.l1_table_offset, l1_bytes(snap.l1_size));
        let active = self.l1.to_vec();
        let old_l1 = self.header.l1_table_offset();
        let moved = rebuild_active(self, &mut rw, &active, Some(old_l1))?;
        if moved.is_some() {
            rw.release(old_l1, l1_bytes(self.header.l1_size()));
        }
        let table = self.snapshot_table_without(index)?;
        let remaining = self.snapshots.len().saturating_sub(1);
        let (table_at, count) = replace_snapshot_table(self, &mut rw, &table, remaining)?;
        let l1_size = self.header.l1_size();
        rw.commit(|h| {
            if let Some(l1) = moved {
                set_l1(h, l1, l1_size);
            }
            set_snapshot_table(h, table_at, count);
            Ok(())
        })?;
        self.reload()?;
        Ok(snap)
    }

    /// What every snapshot job needs first: an image open for writing, with no external
    /// data file (QEMU: "Operation not supported"), its refcounts repaired if a crash left
    /// them dirty.
    fn prepare_snapshot_job(&mut self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.header.has_data_file_bit() {
            return Err(Error::UnsupportedWrite {
                what: "internal snapshots of an image with an external data file".into(),
            });
        }
        self.repair_if_dirty()
    }

    fn snapshot_index(&self, id_or_name: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
            .ok_or_else(|| Error::NoSuchSnapshot(id_or_name.to_owned()))
    }

    fn find_snapshot(&self, id_or_name: &str) -> Result<&Snapshot> {
        let index = self.snapshot_index(id_or_name)?;
        self.snapshots
            .get(index)
            .ok_or(Error::Internal("snapshot index"))
    }

    /// The entry `qemu-img snapshot -c` makes: the next numeric id, the time now (QEMU
    /// keeps microseconds), no VM state, the disk size.
    fn new_snapshot_entry(&self, name: &str) -> Snapshot {
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Snapshot {
            id: id.to_string(),
            name: name.to_owned(),
            l1_table_offset: self.header.l1_table_offset(),
            l1_size: self.header.l1_size(),
            date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
            date_nsec: now.subsec_micros().saturating_mul(1000),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.header.size()),
            icount: Some(0),
        }
    }

    /// The snapshot table's entries as stored, each padded to 8 bytes.
    fn snapshot_table_bytes(&self) -> Result<Vec<u8>> {
        let (at, len) = snapshot_table_extent(self)?;
        let mut bytes = read_metadata(&self.io, at, len, "snapshot table")?;
        bytes.resize(padded_len(bytes.len()), 0);
        Ok(bytes)
    }

    /// The snapshot table's entries without entry `index`.
    fn snapshot_table_without(&self, index: usize) -> Result<Vec<u8>> {
        let table = self.snapshot_table_bytes()?;
        let mut out = Vec::with_capacity(table.len());
        let mut offset = 0usize;
        for i in 0..self.snapshots.len() {
            let rest = table.get(offset..).unwrap_or(&[]);
            let (_, padded) = snapshot::entry_len(rest, offset as u64, &self.limits)?;
            let end = offset.saturating_add(usize::try_from(padded).unwrap_or(usize::MAX));
            let entry = table.get(offset..end.min(table.len())).ok_or_else(|| {
                Error::malformed("snapshot table entry is truncated", offset as u64)
            })?;
            if i != index {
                out.extend_from_slice(entry);
            }
            offset = end;
        }
        Ok(out)
    }
}

fn padded_len(len: usize) -> usize {
    len.div_ceil(8).saturating_mul(8)
}

/// Add `delta` to the refcount of every L2 table `l1` names and of every cluster those
/// tables map (compressed data: each cluster it touches).
pub(crate) fn count_mapping<S: Storage>(
    image: &Qcow2<S>,
    rw: &mut Rewrite<'_, S>,
    l1: &[u64],
    delta: i64,
) -> Result<()> {
    let g = image.geometry;
    let cluster = rw.cluster_size();
    for (i, &entry) in l1.iter().enumerate() {
        let Some(l2) = table::l2_table_offset(entry, &g, (i as u64).saturating_mul(8))? else {
            continue;
        };
        rw.protect(l2, cluster);
        rw.add_ref(l2, cluster, delta)?;
        let bytes = read_metadata(&image.io, l2, cluster, "L2 table")?;
        for word in be_u64_words(&bytes).step_by(words_per_entry(image)) {
            match g.cluster_type(word) {
                ClusterType::Normal | ClusterType::ZeroAlloc if !g.external_data => {
                    rw.add_ref(word & L2_OFFSET_MASK, cluster, delta)?;
                }
                ClusterType::Compressed => {
                    let (at, len) = g.compressed_extent(word);
                    rw.add_ref(at, len, delta)?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn words_per_entry<S>(image: &Qcow2<S>) -> usize {
    if image.geometry.extended_l2 {
        2
    } else {
        1
    }
}

/// The active L1 table with entries `l1`, its L2 tables' COPIED flags set exactly where the
/// new refcount is 1: each L2 table whose flags change is copied (the copy referenced
/// instead), and a new L1 table is written unless it would equal the one at `current`.
/// Returns the new L1 table's offset, `None` when the one at `current` stays.
pub(crate) fn rebuild_active<S: Storage>(
    image: &Qcow2<S>,
    rw: &mut Rewrite<'_, S>,
    l1: &[u64],
    current: Option<u64>,
) -> Result<Option<u64>> {
    let g = image.geometry;
    let cluster = rw.cluster_size();
    let mut entries = Vec::with_capacity(l1.len());
    for (i, &entry) in l1.iter().enumerate() {
        let Some(l2) = table::l2_table_offset(entry, &g, (i as u64).saturating_mul(8))? else {
            entries.push(entry & !OFLAG_COPIED);
            continue;
        };
        let bytes = read_metadata(&image.io, l2, cluster, "L2 table")?;
        let flagged = with_copied_flags(image, rw, &bytes);
        let l2 = if flagged == bytes {
            l2
        } else {
            let copy = rw.allocate(cluster)?;
            rw.write(copy, &flagged)?;
            rw.release(l2, cluster);
            copy
        };
        let copied = if rw.refcount(l2) == 1 {
            OFLAG_COPIED
        } else {
            0
        };
        entries.push(l2 | copied);
    }
    if current.is_some() && entries.as_slice() == &*image.l1 {
        return Ok(None);
    }
    let mut bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
    if bytes.is_empty() {
        bytes.resize(8, 0);
    }
    let at = rw.allocate(bytes.len() as u64)?;
    rw.write(at, &bytes)?;
    Ok(Some(at))
}

/// An L2 table's bytes with the COPIED flag of each allocated entry set exactly when the
/// cluster's new refcount is 1 (compressed entries never carry it).
fn with_copied_flags<S: Storage>(image: &Qcow2<S>, rw: &Rewrite<'_, S>, bytes: &[u8]) -> Vec<u8> {
    let g = image.geometry;
    let step = words_per_entry(image).saturating_mul(8);
    let mut out = bytes.to_vec();
    for chunk in out.chunks_exact_mut(step) {
        let Some(word) = chunk
            .get(..8)
            .and_then(|w| w.try_into().ok())
            .map(u64::from_be_bytes)
        else {
            continue;
        };
        let new = match g.cluster_type(word) {
            ClusterType::Normal | ClusterType::ZeroAlloc if !g.external_data => {
                if rw.refcount(word & L2_OFFSET_MASK) == 1 {
                    word | OFLAG_COPIED
                } else {
                    word & !OFLAG_COPIED
                }
            }
            ClusterType::Compressed => word & !OFLAG_COPIED,
            _ => word,
        };
        if let Some(first) = chunk.get_mut(..8) {
            first.copy_from_slice(&new.to_be_bytes());
        }
    }
    out
}

/// Write `table` (the new snapshot table, `count` entries) into new clusters and release
/// the old table; returns its offset (0 when empty) and entry count.
fn replace_snapshot_table<S: Storage>(
    image: &Qcow2<S>,
    rw: &mut Rewrite<'_, S>,
    table: &[u8],
    count: usize,
) -> Result<(u64, u32)> {
    let (old_at, old_len) = snapshot_table_extent(image)?;
    if image.header.nb_snapshots() > 0 {
        rw.release(old_at, old_len);
    }
    let count = u32::try_from(count).map_err(|_| Error::Internal("snapshot count"))?;
    if table.is_empty() {
        return Ok((0, count));
    }
    let at = rw.allocate(table.len() as u64)?;
    rw.write(at, table)?;
    Ok((at, count))
}

pub(crate) fn set_l1(header: &mut [u8], offset: u64, entries: u32) {
    put(header, at::L1_SIZE, &entries.to_be_bytes());
    put(header, at::L1_TABLE_OFFSET, &offset.to_be_bytes());
}

fn set_snapshot_table(header: &mut [u8], offset: u64, count: u32) {
    put(header, at::NB_SNAPSHOTS, &count.to_be_bytes());
    put(header, at::SNAPSHOTS_OFFSET, &offset.to_be_bytes());
}
