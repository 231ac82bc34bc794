//! Reading persistent dirty bitmaps from the image: the directory and tables QEMU checks when
//! it opens an image, and the dirty extents of one bitmap.

use positioned_io::ReadAt;

use crate::base::io::{read_metadata, read_up_to};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::bitmap::{self, Bitmap, DataCluster, DirectoryContext};
use crate::format::header::{Header, TABLE_ENTRY_LEN};
use crate::image::qcow2::Qcow2;

/// Read the bitmap directory and check it, and every bitmap QEMU would load, as QEMU does
/// when it opens an image (`qcow2_load_dirty_bitmaps`): duplicate names, and for bitmaps not
/// in use, a table of the size the guest needs whose entries are all valid.
pub(crate) fn read_bitmaps<I: ReadAt>(
    io: &I,
    header: &Header,
    guest_size: u64,
    limits: &Limits,
) -> Result<Vec<Bitmap>> {
    let Some(ext) = header.bitmaps() else {
        return Ok(Vec::new());
    };
    let dir = read_metadata(
        io,
        ext.directory_offset,
        ext.directory_size,
        "bitmap directory",
    )?;
    let ctx = DirectoryContext {
        nb_bitmaps: ext.nb_bitmaps,
        offset: ext.directory_offset,
        cluster_bits: header.cluster_bits(),
        guest_size,
    };
    let bitmaps = bitmap::parse_directory(&dir, &ctx)?;
    bitmap::check_duplicates(&bitmaps)?;
    let mut tables_read = 0u64;
    for b in bitmaps.iter().filter(|b| !b.in_use()) {
        tables_read = tables_read.saturating_add(table_bytes(b));
        Limits::check("bitmap tables", tables_read, limits.max_bitmap_table_bytes)?;
        read_table(io, b, guest_size, header.cluster_bits())?;
    }
    Ok(bitmaps)
}

fn table_bytes(b: &Bitmap) -> u64 {
    u64::from(b.table_size).saturating_mul(TABLE_ENTRY_LEN)
}

/// A bitmap's table, decoded, after QEMU's `load_bitmap_data` check that it has exactly one
/// entry per cluster of bitmap data the guest needs.
pub(crate) fn read_table<I: ReadAt>(
    io: &I,
    b: &Bitmap,
    guest_size: u64,
    cluster_bits: u32,
) -> Result<Vec<DataCluster>> {
    let needed = b.clusters_needed(guest_size, cluster_bits);
    if u64::from(b.table_size) != needed {
        return Err(Error::malformed(
            format!(
                "bitmap {:?} has a table of {} entries, but a {guest_size}-byte guest at \
                 granularity {} needs {needed}",
                b.name, b.table_size, b.granularity
            ),
            b.entry_offset,
        ));
    }
    let raw = read_metadata(io, b.table_offset, table_bytes(b), "bitmap table")?;
    let mut at = b.table_offset;
    let mut table = Vec::with_capacity(b.table_size as usize);
    for chunk in raw.chunks_exact(8) {
        let entry = chunk.try_into().map(u64::from_be_bytes).unwrap_or(0);
        let cluster = bitmap::decode_table_entry(entry, cluster_bits)
            .map_err(|what| Error::malformed(format!("bitmap {:?}: {what}", b.name), at))?;
        table.push(cluster);
        at = at.saturating_add(TABLE_ENTRY_LEN);
    }
    Ok(table)
}

/// A stretch of the guest disk whose bits are set in a dirty bitmap: it was written since the
/// bitmap was created or last cleared (in guest bytes; the last one ends at the guest's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DirtyExtent {
    /// Guest offset of the first dirty byte (a multiple of the granularity).
    pub start: u64,
    /// Number of dirty bytes.
    pub length: u64,
}

impl<I: ReadAt> Qcow2<I> {
    /// The persistent dirty bitmap with this name. When an in-use bitmap repeats an earlier
    /// name (QEMU skips such a one), the earlier one is returned, as QEMU loads it.
    ///
    /// ```
    /// let image = qcow2::Qcow2::open(std::fs::File::open("fixtures/bitmaps.qcow2")?)?;
    /// assert_eq!(image.bitmap("b1")?.granularity, 128 * 1024);
    /// assert!(image.bitmap("nope").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn bitmap(&self, name: &str) -> Result<&Bitmap> {
        self.bitmaps
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| Error::NoSuchBitmap {
                name: name.to_owned(),
            })
    }

    /// The dirty extents of the bitmap named `name`, in ascending guest order, adjacent runs
    /// merged: what `qemu-nbd -B NAME` reports as dirty.
    ///
    /// A bitmap with the in-use flag was not saved cleanly, and QEMU refuses to use it: so
    /// does this method ([`Error::BitmapInUse`]); [`Qcow2::dirty_extents_allow_in_use`] reads
    /// its stored bits anyway. The bitmap table is read (bounded by
    /// [`Limits::max_bitmap_table_bytes`]) and then one cluster of bitmap data at a time, as
    /// the iterator advances.
    ///
    /// ```
    /// let image = qcow2::Qcow2::open(std::fs::File::open("fixtures/bitmaps.qcow2")?)?;
    /// for extent in image.dirty_extents("b0")? {
    ///     let extent = extent?;
    ///     println!("{} bytes dirty at {}", extent.length, extent.start);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dirty_extents(&self, name: &str) -> Result<DirtyExtents<'_, I>> {
        self.dirty_extents_impl(name, false)
    }

    /// [`Qcow2::dirty_extents`], but a bitmap with the in-use flag (not saved cleanly, which
    /// QEMU refuses to use) is read too: its stored bits may miss writes made since it was
    /// last saved. Other bitmaps read as with [`Qcow2::dirty_extents`].
    ///
    /// ```
    /// let image = qcow2::Qcow2::open(std::fs::File::open("fixtures/bitmaps.qcow2")?)?;
    /// let dirty: u64 = image
    ///     .dirty_extents_allow_in_use("b0")?
    ///     .map(|extent| extent.map(|e| e.length))
    ///     .sum::<qcow2::Result<u64>>()?;
    /// # let _ = dirty;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dirty_extents_allow_in_use(&self, name: &str) -> Result<DirtyExtents<'_, I>> {
        self.dirty_extents_impl(name, true)
    }

    fn dirty_extents_impl(&self, name: &str, allow_in_use: bool) -> Result<DirtyExtents<'_, I>> {
        let b = self.bitmap(name)?;
        if b.in_use() && !allow_in_use {
            return Err(Error::BitmapInUse {
                name: b.name.clone(),
            });
        }
        Limits::check(
            "bitmap table",
            table_bytes(b),
            self.limits.max_bitmap_table_bytes,
        )?;
        let cluster_bits = self.header.cluster_bits();
        let guest_size = self.guest_size();
        let table = read_table(&self.io, b, guest_size, cluster_bits)?;
        let mut extents = DirtyExtents {
            io: &self.io,
            name: b.name.clone(),
            table,
            granularity: b.granularity,
            cluster_bits,
            guest_size,
            granules: guest_size.div_ceil(b.granularity.max(1)),
            cluster: 0,
            bit: 0,
            data: Vec::new(),
            pending: None,
            done: false,
            failed: None,
        };
        extents.load()?;
        Ok(extents)
    }
}

/// The dirty extents of one bitmap: an iterator of [`DirtyExtent`]s, from
/// [`Qcow2::dirty_extents`]. It holds the bitmap table and one cluster of bitmap data.
///
/// An error (a data cluster that cannot be read) comes after the extents found before it,
/// and ends the iteration.
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/bitmaps.qcow2")?;
/// let extents: Vec<qcow2::DirtyExtent> = image.dirty_extents("b0")?.collect::<Result<_, _>>()?;
/// assert!(extents.windows(2).all(|w| w[0].start + w[0].length < w[1].start)); // merged, in order
/// # Ok::<(), qcow2::Error>(())
/// ```
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct DirtyExtents<'a, I> {
    io: &'a I,
    name: String,
    table: Vec<DataCluster>,
    granularity: u64,
    cluster_bits: u32,
    guest_size: u64,
    /// Bits that describe the guest: the rest of the last cluster is ignored.
    granules: u64,
    /// Index of the table entry being scanned.
    cluster: usize,
    /// The next bit of that cluster to look at.
    bit: u64,
    /// That cluster's data, once read (empty for an all-zeros or all-ones entry).
    data: Vec<u8>,
    /// A run of dirty granules `[start, end)` not yet returned: the next may continue it.
    pending: Option<(u64, u64)>,
    done: bool,
    /// An error found while `pending` was still to be returned.
    failed: Option<Error>,
}

impl<I> std::fmt::Debug for DirtyExtents<'_, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyExtents")
            .field("bitmap", &self.name)
            .field("granularity", &self.granularity)
            .field("table_entry", &self.cluster)
            .field("bit", &self.bit)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<I: ReadAt> DirtyExtents<'_, I> {
    /// Bits in one cluster of bitmap data.
    fn bits_per_cluster(&self) -> u64 {
        1u64.checked_shl(self.cluster_bits.saturating_add(3))
            .unwrap_or(u64::MAX)
    }

    /// Go on to the next table entry, reading its data cluster if it has one.
    fn advance(&mut self) -> Result<()> {
        self.cluster = self.cluster.saturating_add(1);
        self.bit = 0;
        self.load()
    }

    fn load(&mut self) -> Result<()> {
        self.data.clear();
        let Some(&DataCluster::At(offset)) = self.table.get(self.cluster) else {
            return Ok(());
        };
        let len = 1usize.checked_shl(self.cluster_bits).unwrap_or(0);
        self.data.resize(len, 0);
        let got = read_up_to(self.io, offset, &mut self.data).map_err(|e| {
            Error::io(
                format!("reading data of bitmap {:?} at {offset:#x}", self.name),
                e,
            )
        })?;
        if got < len {
            return Err(Error::malformed(
                format!(
                    "data cluster of bitmap {:?} runs past the end of the file",
                    self.name
                ),
                offset,
            ));
        }
        Ok(())
    }

    /// The next run of set bits `[start, end)` in granules, never crossing a cluster.
    fn next_run(&mut self) -> Result<Option<(u64, u64)>> {
        let per_cluster = self.bits_per_cluster();
        loop {
            let Some(&entry) = self.table.get(self.cluster) else {
                return Ok(None);
            };
            let base = (self.cluster as u64).saturating_mul(per_cluster);
            let limit = self.granules.saturating_sub(base).min(per_cluster);
            if limit == 0 {
                return Ok(None);
            }
            if self.bit >= limit {
                self.advance()?;
                continue;
            }
            let run = match entry {
                DataCluster::Zeros => None,
                DataCluster::Ones => Some((self.bit, limit)),
                DataCluster::At(_) => {
                    let bytes = limit.div_ceil(8) as usize;
                    let data = self.data.get(..bytes).unwrap_or_default();
                    let from = self.bit as usize;
                    bitmap::next_bit(data, from, true)
                        .map(|s| s as u64)
                        .filter(|&s| s < limit)
                        .map(|s| {
                            let end = bitmap::next_bit(data, s as usize, false)
                                .map_or(limit, |e| (e as u64).min(limit));
                            (s, end)
                        })
                }
            };
            match run {
                Some((start, end)) => {
                    self.bit = end;
                    return Ok(Some((base.saturating_add(start), base.saturating_add(end))));
                }
                None => self.advance()?,
            }
        }
    }

    /// Granules `[start, end)` in guest bytes, clipped to the guest's end.
    fn extent(&self, (start, end): (u64, u64)) -> DirtyExtent {
        let start = start.saturating_mul(self.granularity);
        let end = end.saturating_mul(self.granularity).min(self.guest_size);
        DirtyExtent {
            start,
            length: end.saturating_sub(start),
        }
    }
}

impl<I: ReadAt> std::iter::FusedIterator for DirtyExtents<'_, I> {}

impl<I: ReadAt> Iterator for DirtyExtents<'_, I> {
    type Item = Result<DirtyExtent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return self.failed.take().map(Err);
        }
        loop {
            match self.next_run() {
                Err(e) => {
                    // Report the run found before the failure first, then the failure.
                    self.done = true;
                    return match self.pending.take() {
                        Some(run) => {
                            self.failed = Some(e);
                            Some(Ok(self.extent(run)))
                        }
                        None => Some(Err(e)),
                    };
                }
                Ok(None) => {
                    self.done = true;
                    return self.pending.take().map(|run| Ok(self.extent(run)));
                }
                Ok(Some((start, end))) => match self.pending {
                    Some((first, last)) if last == start => self.pending = Some((first, end)),
                    Some(run) => {
                        self.pending = Some((start, end));
                        return Some(Ok(self.extent(run)));
                    }
                    None => self.pending = Some((start, end)),
                },
            }
        }
    }
}
