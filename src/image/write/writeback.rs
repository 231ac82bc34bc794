//! Writing the changed metadata back, in the order that keeps every crash harmless.
//!
//! Each step's writes are made durable (a barrier) before the next step's writes start, so
//! that whatever subset of a step's writes a power cut keeps, everything they refer to is on
//! disk already:
//!
//! 1. the guest data written since the last barrier, the changed refcount blocks and a moved
//!    refcount table (the clusters every later step refers to, with their refcounts raised);
//! 2. the refcount table entries naming new blocks, or the header naming a moved table;
//! 3. the L2 tables (they name data clusters and are named by the L1 table);
//! 4. the L1 table.
//!
//! Only then are the references dropped in memory applied (their clusters freed for reuse):
//! the tables that dropped them are durable. QEMU orders its caches the same way (its L2
//! cache depends on the refcount cache) but frees at once.

use crate::base::io::Storage;
use crate::error::{Error, Result};
use crate::image::write::refcounts::Refcounts;
use crate::image::write::tables::Tables;

/// Header bytes 48-59: the refcount table's offset (8 bytes) and clusters (4 bytes).
const REFCOUNT_TABLE_FIELDS: u64 = 48;

/// What a writer keeps in memory, and what it knows of its file.
pub(crate) struct Metadata {
    pub(crate) tables: Tables,
    pub(crate) refs: Refcounts,
    /// Guest data written since the last barrier.
    pub(crate) unsynced: bool,
    /// The length of the image file, as this writer made it.
    pub(crate) file_len: u64,
}

impl Metadata {
    /// Write back every change, in order, then free what the changes dropped: a barrier.
    /// Only with no read or in-place write of the guest under way (a freed cluster may be
    /// handed out again at once).
    pub(crate) fn flush<I: Storage>(&mut self, io: &I, data: Option<&dyn Storage>) -> Result<()> {
        self.write_back(io, data)?;
        self.refs.apply_frees(io)
    }

    /// Write back every change, in order; what they dropped stays reserved.
    pub(crate) fn write_back<I: Storage>(
        &mut self,
        io: &I,
        data: Option<&dyn Storage>,
    ) -> Result<()> {
        self.reach_end(io)?;
        if let (Some(data), true) = (data, self.unsynced) {
            data.sync()
                .map_err(|e| Error::io("making the data file's writes durable", e))?;
        }
        self.write_refcounts(io)?;
        self.write_refcount_table(io)?;
        self.write_l2_tables(io)?;
        self.write_l1(io)?;
        self.unsynced = false;
        Ok(())
    }

    /// Make the file reach the last allocated cluster: a table may refer to it, and a
    /// cluster written only in part must not end the file.
    fn reach_end<I: Storage>(&mut self, io: &I) -> Result<()> {
        let end = self.refs.allocated_end();
        if end > self.file_len {
            io.set_len(end)
                .map_err(|e| Error::io("growing the image file", e))?;
            self.file_len = end;
            self.unsynced = true;
        }
        Ok(())
    }

    fn write_refcounts<I: Storage>(&mut self, io: &I) -> Result<()> {
        let blocks = self.refs.take_dirty_blocks();
        let moved = self.refs.moved_table();
        let written = blocks
            .iter()
            .try_for_each(|(at, bytes)| write(io, *at, bytes, "refcount block"))
            .and_then(|()| match &moved {
                Some((at, bytes)) => write(io, *at, bytes, "refcount table"),
                None => Ok(()),
            });
        let any = !blocks.is_empty() || moved.is_some() || self.unsynced;
        let done = written.and_then(|()| if any { barrier(io) } else { Ok(()) });
        if done.is_err() {
            self.refs
                .mark_blocks_dirty(blocks.iter().map(|(at, _)| *at));
        }
        done
    }

    fn write_refcount_table<I: Storage>(&mut self, io: &I) -> Result<()> {
        if self.refs.table_is_moved() {
            let (offset, clusters) = self.refs.table_location();
            let mut fields = offset.to_be_bytes().to_vec();
            let clusters = u32::try_from(clusters)
                .map_err(|_| Error::malformed("refcount table too large", offset))?;
            fields.extend_from_slice(&clusters.to_be_bytes());
            write(io, REFCOUNT_TABLE_FIELDS, &fields, "header")?;
            barrier(io)?;
        } else {
            let entries = self.refs.dirty_entries();
            if entries.is_empty() {
                return Ok(());
            }
            for (at, bytes) in &entries {
                write(io, *at, bytes, "refcount table entry")?;
            }
            barrier(io)?;
        }
        self.refs.table_written();
        Ok(())
    }

    fn write_l2_tables<I: Storage>(&mut self, io: &I) -> Result<()> {
        let tables = self.tables.take_dirty_tables();
        if tables.is_empty() {
            return Ok(());
        }
        let done = tables
            .iter()
            .try_for_each(|(at, bytes)| write(io, *at, bytes, "L2 table"))
            .and_then(|()| barrier(io));
        if done.is_err() {
            self.tables
                .mark_tables_dirty(tables.iter().map(|(at, _)| *at));
        }
        done
    }

    fn write_l1<I: Storage>(&mut self, io: &I) -> Result<()> {
        let pieces = self.tables.take_dirty_l1();
        if pieces.is_empty() {
            return Ok(());
        }
        let done = pieces
            .iter()
            .try_for_each(|(at, bytes)| write(io, *at, bytes, "L1 table"))
            .and_then(|()| barrier(io));
        if done.is_err() {
            self.tables.mark_l1_dirty(pieces.iter().map(|(at, _)| *at));
        }
        done
    }
}

/// Write `bytes` of metadata at `at`.
pub(crate) fn write<I: Storage>(io: &I, at: u64, bytes: &[u8], what: &str) -> Result<()> {
    io.write_all_at(at, bytes)
        .map_err(|e| Error::io(format!("writing {what} at {at:#x}"), e))
}

/// A durability barrier.
pub(crate) fn barrier<I: Storage>(io: &I) -> Result<()> {
    io.sync()
        .map_err(|e| Error::io("making the image's writes durable", e))
}
