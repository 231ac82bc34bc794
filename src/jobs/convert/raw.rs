//! Conversion to raw bytes: a stream in guest order, or a positional sink with holes where
//! the guest reads as zeros (`qemu-img convert -O raw`).

use super::*;

/// Copy `disk` to a stream (a pipe, standard output, a `Vec<u8>`): every byte in guest
/// order, zeros written out. `progress(done, total)` is called on the calling thread as
/// bytes are written, with `done` rising to `total`.
///
/// ```
/// # #[cfg(feature = "zlib")] {
/// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
/// let reader = image.reader()?;
/// let mut out = Vec::new();
/// let options = qcow2::ConvertOptions::new().threads(2);
/// qcow2::convert_to_writer(&reader, &mut out, &options, |_done, _total| {})?;
/// assert_eq!(out.len() as u64, image.guest_size());
/// # }
/// # Ok::<(), qcow2::Error>(())
/// ```
pub fn convert_to_writer<D, W>(
    disk: &D,
    mut out: W,
    options: &ConvertOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<()>
where
    D: GuestDisk + Sync + ?Sized,
    W: Write,
{
    let total = options.size.unwrap_or_else(|| disk.disk_size());
    let source = DiskReader { disk, place: None };
    copy(
        &source,
        total,
        options.threads,
        &mut progress,
        |chunk| match chunk {
            Chunk::Data { offset, bytes } => write_stream(&mut out, offset, bytes),
            Chunk::Zeros { offset, len } => zero_pieces(len).try_for_each(|(at, zeros)| {
                write_stream(&mut out, offset.saturating_add(at), zeros)
            }),
        },
    )?;
    out.flush().map_err(|e| Error::io("flushing the output", e))
}

/// Write `buf`, which belongs at `offset` of the output, to a stream.
fn write_stream<W: Write>(out: &mut W, offset: u64, buf: &[u8]) -> Result<()> {
    out.write_all(buf)
        .map_err(|e| Error::io(format!("writing the output at offset {offset}"), e))
}

/// Copy `disk` to a positional sink: the sink is emptied (its length set to 0), only data is
/// written, each chunk by the thread that read it, and the sink's length is then set to the
/// disk's size. Zero stretches are left as holes, and so are runs of zeros inside data as
/// [`ConvertOptions::sparse_size`] says. `progress(done, total)` is called on the calling
/// thread, with `done` rising to `total`.
///
/// When the sink is a file ([`PositionalSink::as_file`]) that the disk reads
/// ([`GuestDisk::reads_file`]: the image, a backing file, the data file, under any name or
/// link), the conversion is refused with [`Error::OutputIsSource`] before the sink is
/// touched. Open the output without truncating it, as below, so that nothing is lost
/// before this check: `File::create` would empty a backing file given as the output
/// before the conversion could refuse it.
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let reader = image.reader()?;
/// let path = std::env::temp_dir().join(format!("qcow2-doc-{}.raw", std::process::id()));
/// let file = std::fs::OpenOptions::new()
///     .write(true)
///     .create(true)
///     .truncate(false)
///     .open(&path)?;
/// qcow2::convert_to_file(&reader, &file, &qcow2::ConvertOptions::new(), |_, _| {})?;
/// assert_eq!(file.metadata()?.len(), image.guest_size());
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn convert_to_file<D, F>(
    disk: &D,
    out: &F,
    options: &ConvertOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<()>
where
    D: GuestDisk + Sync + ?Sized,
    F: PositionalSink + Sync + ?Sized,
{
    if let Some(file) = out.as_file() {
        if disk.reads_file(file)? {
            return Err(Error::OutputIsSource);
        }
    }
    out.set_len(0)
        .map_err(|e| Error::io("emptying the output", e))?;
    let total = options.size.unwrap_or_else(|| disk.disk_size());
    let positional = Positional {
        out,
        sparse_sectors: options.sparse_size / SECTOR,
    };
    let place = |start, buf: &[u8]| positional.place(start, buf);
    let source = DiskReader {
        disk,
        place: Some(&place),
    };
    copy(
        &source,
        total,
        options.threads,
        &mut progress,
        |chunk| match chunk {
            // Written in place already, by the thread that read it.
            Chunk::Data { .. } => Ok(()),
            Chunk::Zeros { offset, len } => positional.zeros(offset, len),
        },
    )?;
    out.set_len(total)
        .map_err(|e| Error::io(format!("setting the output length to {total}"), e))
}

/// Copy `total` bytes of the source's disk to `consumer`, in guest order, reading on a pool
/// of `threads` threads of the conversion's own.
fn copy<D>(
    source: &DiskReader<'_, D>,
    total: u64,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
    mut consumer: impl FnMut(Chunk<'_>) -> Result<()>,
) -> Result<()>
where
    D: GuestDisk + Sync + ?Sized,
{
    // Started as an image's pool is: on first use, and not at all for one thread.
    let pool = Pool::for_copy(threads);
    let plan = AllocationPlan {
        disk: source.disk,
        pos: 0,
        end: total,
        known: None,
    };
    let copy = CopyJob {
        pool: &pool,
        source,
        plan,
        threads: pool.threads(),
        buffer_len: CHUNK.min(total) as usize, // at most 2 MiB
        // A chunk placed by the thread that read it needs its buffer no longer.
        buffers_per_thread: if source.place.is_some() {
            1
        } else {
            STREAM_BUFFERS_PER_THREAD
        },
        read_failed: |_, error| error,
    };
    progress(0, total);
    copy.run(&mut |chunk| {
        consumer(chunk)?;
        progress(chunk.end(), total);
        Ok(())
    })
}

/// Reads the disk's chunks; for a positional sink, each is then written in place by the
/// thread that read it.
struct DiskReader<'d, D: ?Sized> {
    disk: &'d D,
    place: Option<&'d PlaceChunk<'d>>,
}

/// Writes a chunk read at a guest offset where it belongs, on the thread that read it.
type PlaceChunk<'p> = dyn Fn(u64, &[u8]) -> Result<()> + Sync + 'p;

impl<D: GuestDisk + Sync + ?Sized> PieceReader for DiskReader<'_, D> {
    fn for_one_thread(&self) -> Self {
        // The disk is shared, as it was between the conversion's threads before.
        DiskReader {
            disk: self.disk,
            place: self.place,
        }
    }

    fn read_piece(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        self.disk.read_disk(start, buf)?;
        match self.place {
            Some(place) => place(start, buf),
            None => Ok(()),
        }
    }
}

/// A positional sink: chunks are written in place by the threads that read them.
struct Positional<'f, F: ?Sized> {
    out: &'f F,
    /// `-S` in sectors; 0 writes everything.
    sparse_sectors: u64,
}

impl<F: PositionalSink + ?Sized> Positional<'_, F> {
    fn write(&self, pos: u64, buf: &[u8]) -> Result<()> {
        self.out
            .write_all_at(pos, buf)
            .map_err(|e| Error::io(format!("writing the output at offset {pos}"), e))
    }

    /// Write the chunk read at `start`, but the runs of zeros `-S` leaves as holes.
    fn place(&self, start: u64, buf: &[u8]) -> Result<()> {
        if self.sparse_sectors == 0 {
            return self.write(start, buf);
        }
        for range in ranges_to_write(buf, start / SECTOR, self.sparse_sectors) {
            let at = start.saturating_add(range.start as u64);
            self.write(at, buf.get(range).unwrap_or_default())?;
        }
        Ok(())
    }

    /// A zero stretch: a hole, unless `-S 0` asks for every byte.
    fn zeros(&self, start: u64, len: u64) -> Result<()> {
        if self.sparse_sectors != 0 {
            return Ok(());
        }
        zero_pieces(len).try_for_each(|(at, zeros)| self.write(start.saturating_add(at), zeros))
    }
}
