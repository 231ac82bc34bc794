//! Conversion into qcow2 images (`qemu-img convert -O qcow2`): a new image made and filled
//! (`convert_to_qcow2`), an empty one filled (`-n`), an overlay of the source's top image
//! (`-B`), or raw bytes from a stream; clusters classified and compressed on the copy
//! engine's threads, stored by the image writer (`image/builder.rs`) on the calling thread.

use super::*;

/// Convert `disk` into a new qcow2 image at `path`, like `qemu-img convert -O qcow2 -o ...`:
/// the image is made by [`create`](crate::create) with `create` (its size the disk's, or
/// [`ConvertOptions::size`]) and filled as [`convert_into_qcow2`] fills it; a preallocated
/// image (`preallocation` metadata, falloc or full) is filled where its clusters are mapped
/// already, and refused with [`ConvertOptions::compress`], as qemu-img refuses it.
///
/// The image is made under a hidden name beside `path` and renamed to `path` once complete:
/// a failed or killed conversion never leaves an empty or half-filled image at `path` (a
/// failed one removes its file; an existing file at `path` is replaced only at the end, as
/// qemu-img replaces it). A file the disk reads (the image, a backing file, the data file) is
/// refused as the output or the new data file, before anything is written
/// ([`Error::OutputIsSource`]).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-to-qcow2-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # #[cfg(feature = "zstd")] { // zstd compression needs the feature
/// let source = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
/// let reader = source.reader()?;
/// let out = dir.join("compressed.qcow2");
/// // qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=16k
/// let mut create = qcow2::CreateOptions::default();
/// create.set_all("compression_type=zstd,cluster_size=16k")?;
/// let options = qcow2::ConvertOptions::new().compress(true);
/// qcow2::convert_to_qcow2(&reader, &out, &create, &options, |_done, _total| {})?;
/// let copy = qcow2::Qcow2::open_path(&out)?;
/// assert_eq!(copy.guest_size(), source.guest_size());
/// let outcome = qcow2::compare(&copy.reader()?, &reader, &qcow2::CompareOptions::new())?;
/// assert_eq!(outcome, qcow2::Comparison::Identical);
/// # }
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub fn convert_to_qcow2<D>(
    disk: &D,
    path: impl AsRef<std::path::Path>,
    create: &crate::image::create::CreateOptions,
    options: &ConvertOptions,
    progress: impl FnMut(u64, u64),
) -> Result<()>
where
    D: GuestDisk + Sync + ?Sized,
{
    let path = path.as_ref();
    // Checked before `create` truncates them.
    refuse_source_output(disk, path)?;
    if let Some(data_file) = create.data_file_name() {
        refuse_source_output(disk, std::path::Path::new(data_file))?;
    }
    if options.compress && create.preallocates() {
        return Err(Error::InvalidOption {
            option: "preallocation".to_owned(),
            message: "Compression and preallocation not supported at the same time".to_owned(),
        });
    }
    let size = options.size.unwrap_or_else(|| disk.disk_size());
    let create = create.clone().size(size);
    // Made and filled under a name of its own beside `path`, and renamed to `path` once
    // complete: a process killed at any instant leaves at `path` the old file or the whole
    // new image, never an empty or half-filled one.
    let partial = partial_path(path)?;
    crate::image::create::create(&partial, &create)?;
    let mut progress = progress;
    // The image is this call's and reads as zeros: a preallocated one is filled where its
    // clusters are mapped already.
    let fresh = true;
    let open = create.open_options();
    fill(disk, None, &partial, &open, options, &mut progress, fresh)
        .and_then(|()| {
            std::fs::rename(&partial, path)
                .map_err(|e| Error::io(format!("renaming the new image to {}", path.display()), e))
        })
        .inspect_err(|_| {
            // A half-filled image is not left behind.
            let _ = std::fs::remove_file(&partial);
        })
}

/// Where the image for `path` is made until it is complete: a hidden name in the same
/// directory (so that the rename is atomic and relative backing names resolve alike).
fn partial_path(path: &std::path::Path) -> Result<std::path::PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::InvalidOption {
        option: "output".to_owned(),
        message: format!("'{}' names no file", path.display()),
    })?;
    let mut partial = std::ffi::OsString::from(".");
    partial.push(name);
    partial.push(format!(".partial-{}", std::process::id()));
    Ok(path.with_file_name(partial))
}

/// Copy `disk` into the empty qcow2 image at `target`, like `qemu-img convert -n -O qcow2`:
/// the image, made beforehand (by `qemu-img create -f qcow2`) with
/// the cluster size, version, refcount width, extended L2 entries, external data file or
/// encryption wanted, is opened with `target_options` (its secret, when it is encrypted) and
/// filled. `progress(done, total)` is called on the calling thread.
///
/// What is stored is what `qemu-img convert` stores: stretches the disk reads as zeros are
/// left out (written as zero clusters when the target has a backing file, so that they
/// still read as zeros), runs of zeros inside data as [`ConvertOptions::sparse_size`] says,
/// and with [`ConvertOptions::compress`] each cluster compressed. The disk is read and
/// compressed on [`ConvertOptions::threads`] threads, in bounded memory (a few 2 MiB chunks
/// per thread, one L2 table, one refcount block, the L1 and refcount tables). The target
/// must be empty: no data, snapshots or bitmaps. Its header is made invalid while it is
/// filled and written back last, so that a conversion that fails leaves no file that looks
/// like a complete image.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-into-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let target = dir.join("out.qcow2");
/// # std::fs::copy("fixtures/empty-16m.qcow2", &target)?;
/// // `target`: an empty image, e.g. from `qemu-img create -f qcow2 out.qcow2 16M`.
/// let source = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
/// let reader = source.reader()?;
/// let options = qcow2::ConvertOptions::new().threads(2);
/// qcow2::convert_into_qcow2(&reader, &target, &qcow2::OpenOptions::new(), &options, |_, _| {})?;
/// // The target keeps its size (16 MiB here), and reads as the source where that has data.
/// use qcow2::positioned_io::ReadAt;
/// let copy = qcow2::Qcow2::open_path(&target)?;
/// let (mut ours, mut theirs) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
/// copy.reader()?.read_exact_at(0, &mut ours)?;
/// reader.read_exact_at(0, &mut theirs)?;
/// assert!(ours == theirs);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub fn convert_into_qcow2<D>(
    disk: &D,
    target: impl AsRef<std::path::Path>,
    target_options: &crate::image::options::OpenOptions,
    options: &ConvertOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<()>
where
    D: GuestDisk + Sync + ?Sized,
{
    fill(
        disk,
        None,
        target.as_ref(),
        target_options,
        options,
        &mut progress,
        false,
    )
}

/// Copy into the empty qcow2 image at `target`, which names a backing file, only what the
/// top image of `source` holds, like `qemu-img convert -B BACKING -O qcow2`: clusters the top
/// image leaves to its backing chain are left to the target's backing file (which should
/// read as the source's backing chain does: the caller's promise, as with qemu-img), zero
/// clusters of the top image become zero clusters, and its data is copied (read through the
/// whole chain, a cluster at a time). Otherwise as [`convert_into_qcow2`]. Refused when the
/// target has no backing file.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-overlay-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let target = dir.join("out.qcow2");
/// // `target`: an empty overlay, e.g. from
/// // `qemu-img create -f qcow2 -b chain-mid.qcow2 -F qcow2 out.qcow2 8M`.
/// # std::fs::copy("fixtures/empty-16m.qcow2", &target)?;
/// let source = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let reader = source.reader()?;
/// let options = qcow2::ConvertOptions::new();
/// let open = qcow2::OpenOptions::new();
/// // This target has no backing file: refused, and left as it was.
/// let refused = qcow2::convert_overlay_into_qcow2(&reader, &target, &open, &options, |_, _| {});
/// assert!(matches!(refused, Err(qcow2::Error::InvalidOption { .. })));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub fn convert_overlay_into_qcow2<I>(
    source: &crate::image::reader::Reader<'_, I>,
    target: impl AsRef<std::path::Path>,
    target_options: &crate::image::options::OpenOptions,
    options: &ConvertOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<()>
where
    I: positioned_io::ReadAt + Sync,
{
    let target = target.as_ref();
    let header =
        crate::Qcow2::open_path_with(target, &target_options.clone().backing_as_zeros(true))?
            .header()
            .clone();
    if header.backing_file_bytes().is_none() {
        return Err(Error::InvalidOption {
            option: "-B".to_owned(),
            message: "the target image has no backing file".to_owned(),
        });
    }
    let top = |pos: u64| -> Result<(Class, u64)> {
        match source.extent_at(pos)? {
            Some(extent) => {
                let class = match extent.kind {
                    crate::format::table::ExtentKind::Unallocated { .. } => Class::Backing,
                    crate::format::table::ExtentKind::Zero { .. } => Class::Zero,
                    _ => Class::Data,
                };
                let len = extent
                    .start
                    .saturating_add(extent.length)
                    .saturating_sub(pos);
                Ok((class, len.max(1)))
            }
            None => Ok((Class::Zero, u64::MAX)),
        }
    };
    fill(
        source,
        Some(&top),
        target,
        target_options,
        options,
        &mut progress,
        false,
    )
}

/// What the top image of a source holds in a stretch, for [`convert_overlay_into_qcow2`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Left to the backing chain.
    Backing,
    /// A zero cluster.
    Zero,
    /// Data, or a mix within one target cluster.
    Data,
}

/// The top image's class at a guest offset, and for how long.
type TopLayer<'t> = dyn Fn(u64) -> Result<(Class, u64)> + 't;

/// The conversion behind [`convert_to_qcow2`], [`convert_into_qcow2`] and
/// [`convert_overlay_into_qcow2`]. `fresh`: the target was just made by this conversion, after
/// the output was checked against the source, and reads as zeros (a preallocated one may be
/// filled).
fn fill<D>(
    disk: &D,
    top: Option<&TopLayer<'_>>,
    target: &std::path::Path,
    target_options: &crate::image::options::OpenOptions,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    fresh: bool,
) -> Result<()>
where
    D: GuestDisk + Sync + ?Sized,
{
    // A fresh image was checked before it was made (and it is the source of nothing now).
    if !fresh {
        refuse_source_output(disk, target)?;
    }
    let total = options.size.unwrap_or_else(|| disk.disk_size());
    let mut builder = refuse_options(total, target, target_options, options, fresh)?;
    let into = builder.target();
    let compressor = match options.compress {
        true => Some((into.compression_type, options.compression_level)),
        false => None,
    };
    // A compressor is made now so that a build without the feature fails before copying.
    if let Some((kind, level)) = compressor {
        Compressor::new(kind, level)?;
    }
    let classify = Classify {
        cluster_size: into.cluster_size,
        sparse_sectors: options.sparse_size / SECTOR,
        compressor,
    };
    let results = Mutex::new(HashMap::new());
    let reader = ClusterReader {
        disk,
        classify,
        own: Mutex::new(None),
        results: &results,
    };
    let storer = Storer::new(&builder, options);
    let pool = Pool::for_copy(options.threads);
    // The starts of the zero pieces that are the backing file's to read.
    let left_to_backing = Mutex::new(VecDeque::new());
    let plan = ClusterPlan {
        inner: AllocationPlan {
            disk,
            pos: 0,
            end: total,
            known: None,
        },
        cluster_size: into.cluster_size,
        every_byte: options.sparse_size == 0,
        top,
        left_to_backing: &left_to_backing,
    };
    let copy = CopyJob {
        pool: &pool,
        source: &reader,
        plan,
        threads: pool.threads(),
        buffer_len: CHUNK.min(total.max(1)) as usize,
        buffers_per_thread: STREAM_BUFFERS_PER_THREAD,
        read_failed: |_, error| error,
    };
    progress(0, total);
    copy.run(&mut |chunk| {
        match chunk {
            Chunk::Zeros { offset, len } => {
                let mut backing = lock(&left_to_backing);
                if backing.front() == Some(&offset) {
                    backing.pop_front();
                } else {
                    drop(backing);
                    storer.zeros(&mut builder, offset, len)?;
                }
            }
            Chunk::Data { offset, bytes } => {
                let forms = lock(&results)
                    .remove(&offset)
                    .ok_or(Error::Internal("a chunk was read without its clusters"))?;
                storer.chunk(&mut builder, offset, bytes, &forms)?;
            }
        }
        progress(chunk.end(), total);
        Ok(())
    })?;
    builder.finish()
}

/// Convert raw guest bytes read from a stream (a pipe, standard input, a decompressor) into
/// the empty qcow2 image at `target`, as [`convert_into_qcow2`] converts a disk: the stream
/// is read in order, in 2 MiB chunks, a few chunks at a time (one per thread), which the
/// threads classify and compress while the calling thread stores the previous ones; memory
/// stays a few MiB per thread whatever the stream's length.
///
/// With `size`, exactly that many bytes are read, and a stream that ends before is an
/// error ([`std::io::ErrorKind::UnexpectedEof`]). Without, the guest is what the stream
/// holds, rounded up to whole 512-byte sectors: the image grows to it when it is larger
/// (its size and L1 table written at the end), and keeps its size otherwise. When the
/// conversion fails the target is left without a valid header (see [`convert_into_qcow2`]).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-stream-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let target = dir.join("out.qcow2");
/// # std::fs::copy("fixtures/empty-16m.qcow2", &target)?;
/// // `target`: an empty image, e.g. from `qemu-img create -f qcow2 out.qcow2 16M`.
/// let mut raw = vec![0u8; 20 << 20];
/// raw[19 << 20..].fill(0x5a);
/// let options = qcow2::ConvertOptions::new();
/// let open = qcow2::OpenOptions::new();
/// qcow2::convert_stream_into_qcow2(&raw[..], None, &target, &open, &options, |_, _| {})?;
/// // The image grew from 16 MiB to what the stream held.
/// assert_eq!(qcow2::Qcow2::open_path(&target)?.guest_size(), 20 << 20);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub fn convert_stream_into_qcow2<R: std::io::Read>(
    mut source: R,
    size: Option<u64>,
    target: impl AsRef<std::path::Path>,
    target_options: &crate::image::options::OpenOptions,
    options: &ConvertOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    let target = target.as_ref();
    let mut builder = refuse_options(size.unwrap_or(0), target, target_options, options, false)?;
    if size.is_none() {
        builder.grow_to(0)?;
    }
    let into = builder.target();
    let classify = Classify {
        cluster_size: into.cluster_size,
        sparse_sectors: options.sparse_size / SECTOR,
        compressor: options
            .compress
            .then_some((into.compression_type, options.compression_level)),
    };
    if let Some((kind, level)) = classify.compressor {
        Compressor::new(kind, level)?;
    }
    let storer = Storer::new(&builder, options);
    let threads = options.threads.max(1);
    let mut compressors: Vec<Option<Compressor>> = (0..threads).map(|_| None).collect();
    let mut buffers: Vec<Vec<u8>> = (0..threads).map(|_| Vec::new()).collect();
    let mut done = 0u64;
    let mut ended = false;
    progress(0, size.unwrap_or(0));
    while !ended {
        // Read a batch: one chunk per thread.
        let mut batch = Vec::new();
        for buf in buffers.iter_mut() {
            let want = size.map_or(CHUNK, |s| CHUNK.min(s.saturating_sub(done)));
            buf.resize(want as usize, 0);
            let got = read_full(&mut source, buf)?;
            buf.truncate(got);
            if got == 0 {
                ended = true;
                break;
            }
            batch.push(done);
            done = done.saturating_add(got as u64);
            if (got as u64) < want || size == Some(done) {
                ended = true;
                break;
            }
        }
        let results = classify_batch(&classify, &batch, &buffers, &mut compressors);
        for ((start, buf), forms) in batch.iter().zip(&buffers).zip(results) {
            storer.chunk(&mut builder, *start, buf, &forms?)?;
        }
        progress(done, size.unwrap_or(done));
    }
    match size {
        Some(size) if done < size => {
            return Err(Error::io(
                format!("the source stream ended at byte {done}, before its {size} bytes"),
                std::io::ErrorKind::UnexpectedEof.into(),
            ))
        }
        Some(_) => {}
        None => builder.grow_to(done.div_ceil(SECTOR).saturating_mul(SECTOR))?,
    }
    builder.finish()
}

/// Classify the chunks of a batch (read at `starts`, in `buffers`) on one thread each.
fn classify_batch(
    classify: &Classify,
    starts: &[u64],
    buffers: &[Vec<u8>],
    compressors: &mut [Option<Compressor>],
) -> Vec<Result<ChunkForms>> {
    if starts.len() <= 1 {
        return starts
            .iter()
            .zip(buffers)
            .zip(compressors.iter_mut())
            .map(|((&start, buf), own)| classify.forms(start, buf, own))
            .collect();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = starts
            .iter()
            .zip(buffers)
            .zip(compressors.iter_mut())
            .map(|((&start, buf), own)| scope.spawn(move || classify.forms(start, buf, own)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(Error::Internal("a compressing thread panicked")))
            })
            .collect()
    })
}

/// Read until `buf` is full or the stream ends; the bytes read.
fn read_full<R: std::io::Read>(source: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0usize;
    while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
        match source.read(rest) {
            Ok(0) => break,
            Ok(n) => got = got.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading the source at byte {got}"), e)),
        }
    }
    Ok(got)
}

/// Refuse to write `path` when `disk` reads it (the image, a backing file, the data file,
/// under any name): writing it would destroy the source. A file that does not exist yet is
/// no source.
fn refuse_source_output<D: GuestDisk + ?Sized>(disk: &D, path: &std::path::Path) -> Result<()> {
    match std::fs::File::open(path) {
        Ok(file) if disk.reads_file(&file)? => Err(Error::OutputIsSource),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
    }
}

/// Open the target for filling, refusing what qemu-img refuses.
fn refuse_options(
    total: u64,
    target: &std::path::Path,
    target_options: &crate::image::options::OpenOptions,
    options: &ConvertOptions,
    fresh: bool,
) -> Result<Builder> {
    let header =
        crate::Qcow2::open_path_with(target, &target_options.clone().backing_as_zeros(true))?
            .header()
            .clone();
    if total > header.size() {
        return Err(Error::InvalidOption {
            option: "-n".to_owned(),
            // qemu-img's words; the sizes, which it leaves out, follow.
            message: format!(
                "output file is smaller than input file ({} bytes, the input {total})",
                header.size()
            ),
        });
    }
    if options.compress && header.crypt_method() != 0 {
        return Err(Error::InvalidOption {
            option: "-c".to_owned(),
            message: "Compression and encryption not supported at the same time".to_owned(),
        });
    }
    if options.compress && header.has_data_file_bit() {
        return Err(Error::InvalidOption {
            option: "-c".to_owned(),
            message: "Compression is not supported with an external data file".to_owned(),
        });
    }
    Builder::open(target, target_options, fresh)
}

/// Stores what the reading threads classified, on the calling thread.
struct Storer {
    cluster_size: u64,
    /// Zeros are written out: `-S 0`, or over a backing file in a version 2 image.
    zero_data: Option<Vec<u8>>,
    /// Zeros are stored at all: `-S 0`, or over a backing file (which they must hide).
    store_zeros: bool,
}

impl Storer {
    fn new(builder: &Builder, options: &ConvertOptions) -> Storer {
        let into = builder.target();
        let every_byte = options.sparse_size == 0;
        Storer {
            cluster_size: into.cluster_size,
            zero_data: (every_byte || into.pre_v3).then(|| vec![0; into.cluster_size as usize]),
            store_zeros: every_byte || into.backing,
        }
    }

    /// `len` bytes from `start` read as zeros: left out, unless they must hide a backing
    /// file (zero clusters; data clusters of zeros in a version 2 image) or `-S 0` asks for
    /// every byte.
    fn zeros(&self, builder: &mut Builder, start: u64, len: u64) -> Result<()> {
        if !self.store_zeros {
            return Ok(());
        }
        let end = start.saturating_add(len);
        let first = start >> self.cluster_size.trailing_zeros();
        for cluster in first..end.div_ceil(self.cluster_size) {
            match &self.zero_data {
                None => builder.set_zero(cluster)?,
                Some(zeros) => {
                    let at = cluster.saturating_mul(self.cluster_size);
                    let len = self.cluster_size.min(end.saturating_sub(at)) as usize;
                    builder.set_data(cluster, zeros.get(..len).unwrap_or_default())?;
                }
            }
        }
        Ok(())
    }

    /// The clusters of a chunk read at `offset`, as the reading thread classified them.
    fn chunk(
        &self,
        builder: &mut Builder,
        offset: u64,
        bytes: &[u8],
        forms: &ChunkForms,
    ) -> Result<()> {
        let first = offset >> self.cluster_size.trailing_zeros();
        // Runs of data clusters go to the builder whole, to be written in one piece.
        let mut data_from: Option<usize> = None;
        for (i, form) in forms.forms.iter().enumerate() {
            let is_data = matches!(form, Form::Data);
            if let (Some(from), false) = (data_from, is_data) {
                self.data_run(builder, first, bytes, from, i)?;
                data_from = None;
            }
            if is_data && data_from.is_none() {
                data_from = Some(i);
            }
            if !is_data {
                self.store_one(builder, first, bytes, forms, i)?;
            }
        }
        if let Some(from) = data_from {
            self.data_run(builder, first, bytes, from, forms.forms.len())?;
        }
        Ok(())
    }

    /// Clusters `from..to` of a chunk (whose first is guest cluster `first`), all data.
    fn data_run(
        &self,
        builder: &mut Builder,
        first: u64,
        bytes: &[u8],
        from: usize,
        to: usize,
    ) -> Result<()> {
        let cluster_size = self.cluster_size as usize;
        let start = from.saturating_mul(cluster_size).min(bytes.len());
        let end = to.saturating_mul(cluster_size).min(bytes.len());
        let data = bytes.get(start..end).unwrap_or_default();
        builder.set_data_run(first.saturating_add(from as u64), data)
    }

    /// Cluster `i` of a chunk, compressed or zeros.
    fn store_one(
        &self,
        builder: &mut Builder,
        first: u64,
        bytes: &[u8],
        forms: &ChunkForms,
        i: usize,
    ) -> Result<()> {
        let cluster_size = self.cluster_size as usize;
        let start = i.saturating_mul(cluster_size).min(bytes.len());
        let end = start.saturating_add(cluster_size).min(bytes.len());
        let data = bytes.get(start..end).unwrap_or_default();
        let cluster = first.saturating_add(i as u64);
        match forms.forms.get(i) {
            Some(Form::Data) => builder.set_data(cluster, data),
            Some(Form::Compressed(range)) => {
                let packed = forms
                    .packed
                    .get(range.clone())
                    .ok_or(Error::Internal("compressed bytes out of their buffer"))?;
                builder.set_compressed(cluster, packed)
            }
            Some(Form::Zeros) => self.zeros(
                builder,
                cluster.saturating_mul(self.cluster_size),
                data.len() as u64,
            ),
            None => Err(Error::Internal("a cluster without its form")),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How one cluster of a chunk is stored.
enum Form {
    /// Left out: it reads as zeros (sparse detection, or a zero cluster with `-c`).
    Zeros,
    /// Stored as it is.
    Data,
    /// Stored compressed: these bytes of [`ChunkForms::packed`].
    Compressed(Range<usize>),
}

/// The clusters of one chunk, classified (and compressed) by the thread that read it.
struct ChunkForms {
    forms: Vec<Form>,
    packed: Vec<u8>,
}

/// Plans cluster-aligned pieces: a cluster is read when any byte of it may not be zero.
struct ClusterPlan<'d, D: ?Sized> {
    inner: AllocationPlan<'d, D>,
    cluster_size: u64,
    /// `-S 0`: every cluster is data, zeros too.
    every_byte: bool,
    /// With `-B`: what the source's top image holds, which decides instead of the
    /// allocation through the chain.
    top: Option<&'d TopLayer<'d>>,
    /// Where the plan records the zero pieces that are left to the backing file.
    left_to_backing: &'d Mutex<VecDeque<u64>>,
}

impl<D: GuestDisk + ?Sized> ClusterPlan<'_, D> {
    fn down(&self, pos: u64) -> u64 {
        pos & !self.cluster_size.wrapping_sub(1)
    }

    fn up(&self, pos: u64) -> u64 {
        pos.div_ceil(self.cluster_size)
            .saturating_mul(self.cluster_size)
    }
}

impl<D: GuestDisk + ?Sized> ClusterPlan<'_, D> {
    /// With `-B`: the class of the whole clusters from `pos` (aligned) on, and where they
    /// end (a cluster whose stretches differ is data).
    fn class_run(&self, top: &TopLayer<'_>, pos: u64) -> Result<(Class, u64)> {
        let end = self.inner.end;
        let (class, len) = top(pos)?;
        let stretch_end = pos.saturating_add(len).min(end);
        let cluster_end = pos.saturating_add(self.cluster_size).min(end);
        if stretch_end >= cluster_end {
            let run_end = if stretch_end == end {
                end
            } else {
                self.down(stretch_end)
            };
            return Ok((class, run_end.max(cluster_end)));
        }
        let mut at = stretch_end;
        while at < cluster_end {
            let (next, len) = top(at)?;
            if next != class {
                return Ok((Class::Data, cluster_end));
            }
            at = at.saturating_add(len);
        }
        Ok((class, cluster_end))
    }

    /// With `-B`: the next piece, from the top image's classes.
    fn next_top_piece(&mut self, top: &TopLayer<'_>) -> Result<Option<Piece>> {
        let start = self.inner.pos;
        let end = self.inner.end;
        if start >= end {
            return Ok(None);
        }
        let (class, mut run_end) = self.class_run(top, start)?;
        let cap = if class == Class::Data {
            CHUNK
        } else {
            MAX_ZERO_SEGMENT
        };
        let limit = start.saturating_add(cap).min(end);
        while run_end < limit {
            let (next, next_end) = self.class_run(top, run_end)?;
            if next != class {
                break;
            }
            run_end = next_end;
        }
        let run_end = run_end.min(limit);
        self.inner.pos = run_end;
        let len = run_end.saturating_sub(start);
        Ok(Some(match class {
            Class::Data => Piece::Data { start, len },
            Class::Zero => Piece::Zeros { start, len },
            Class::Backing => {
                lock(self.left_to_backing).push_back(start);
                Piece::Zeros { start, len }
            }
        }))
    }
}

impl<D: GuestDisk + ?Sized> PiecePlan for ClusterPlan<'_, D> {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        if let Some(top) = self.top {
            return self.next_top_piece(top);
        }
        let start = self.inner.pos;
        let end = self.inner.end;
        if start >= end {
            return Ok(None);
        }
        let mut pos = start;
        if !self.every_byte {
            let zeros_end = start.saturating_add(MAX_ZERO_SEGMENT).min(end);
            while pos < zeros_end {
                match self.inner.stretch_at(pos)? {
                    (true, _) => break,
                    (false, len) => pos = pos.saturating_add(len),
                }
            }
            let zeros_to = if pos >= end {
                end
            } else {
                self.down(pos.min(zeros_end))
            };
            if zeros_to > start {
                self.inner.pos = zeros_to;
                return Ok(Some(Piece::Zeros {
                    start,
                    len: zeros_to.saturating_sub(start),
                }));
            }
        }
        let limit = start.saturating_add(CHUNK).min(end);
        let mut pos = start;
        while pos < limit {
            match self.inner.stretch_at(pos)? {
                (false, len) if !self.every_byte => {
                    let whole_zero_cluster = self.up(pos).saturating_add(self.cluster_size);
                    if pos > start && whole_zero_cluster <= pos.saturating_add(len) {
                        pos = self.up(pos);
                        break;
                    }
                    pos = pos.saturating_add(len);
                }
                (_, len) => pos = pos.saturating_add(len),
            }
        }
        let data_end = self
            .up(pos)
            .min(limit)
            .max(start.saturating_add(1).min(end));
        self.inner.pos = data_end;
        Ok(Some(Piece::Data {
            start,
            len: data_end.saturating_sub(start),
        }))
    }

    fn planned_to(&self) -> u64 {
        self.inner.pos
    }
}

/// How the clusters of a chunk are stored: left out, as they are, or compressed.
#[derive(Debug, Clone, Copy)]
struct Classify {
    cluster_size: u64,
    sparse_sectors: u64,
    compressor: Option<(crate::format::header::CompressionType, Option<i32>)>,
}

/// Reads cluster-aligned chunks and classifies their clusters on the reading thread.
struct ClusterReader<'d, D: ?Sized> {
    disk: &'d D,
    classify: Classify,
    /// This thread's compressor, made on first use.
    own: Mutex<Option<Compressor>>,
    results: &'d Mutex<HashMap<u64, ChunkForms>>,
}

impl<D: GuestDisk + Sync + ?Sized> PieceReader for ClusterReader<'_, D> {
    fn for_one_thread(&self) -> Self {
        ClusterReader {
            disk: self.disk,
            classify: self.classify,
            own: Mutex::new(None),
            results: self.results,
        }
    }

    fn read_piece(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        self.disk.read_disk(start, buf)?;
        let forms = self.classify.forms(start, buf, &mut lock(&self.own))?;
        lock(self.results).insert(start, forms);
        Ok(())
    }
}

impl Classify {
    /// The clusters of `buf`, read at `start`; `own` is the thread's compressor.
    fn forms(&self, start: u64, buf: &[u8], own: &mut Option<Compressor>) -> Result<ChunkForms> {
        match self.compressor {
            Some((kind, level)) => {
                let compressor = match own {
                    Some(c) => c,
                    none => none.insert(Compressor::new(kind, level)?),
                };
                self.compressed_forms(buf, compressor)
            }
            None => Ok(self.sparse_forms(start, buf)),
        }
    }

    /// `-c`: a cluster of zeros is left out, the others compressed when they shrink.
    fn compressed_forms(&self, buf: &[u8], compressor: &mut Compressor) -> Result<ChunkForms> {
        let mut packed = Vec::new();
        let mut out = Vec::new();
        let mut forms = Vec::new();
        for cluster in buf.chunks(self.cluster_size as usize) {
            let form = if is_zero(cluster) {
                Form::Zeros
            } else if cluster.len() as u64 == self.cluster_size
                && compressor.compress(cluster, &mut out)?
            {
                let at = packed.len();
                packed.extend_from_slice(&out);
                Form::Compressed(at..packed.len())
            } else if cluster.len() as u64 != self.cluster_size {
                // The disk's last, partial cluster: compressed padded, as QEMU pads it.
                let mut whole = cluster.to_vec();
                whole.resize(self.cluster_size as usize, 0);
                if compressor.compress(&whole, &mut out)? {
                    let at = packed.len();
                    packed.extend_from_slice(&out);
                    Form::Compressed(at..packed.len())
                } else {
                    Form::Data
                }
            } else {
                Form::Data
            };
            forms.push(form);
        }
        Ok(ChunkForms { forms, packed })
    }

    /// Without `-c`: a cluster is stored when `-S` would write any byte of it.
    fn sparse_forms(&self, start: u64, buf: &[u8]) -> ChunkForms {
        let clusters = buf.len().div_ceil(self.cluster_size as usize);
        if self.sparse_sectors == 0 {
            return ChunkForms {
                forms: (0..clusters).map(|_| Form::Data).collect(),
                packed: Vec::new(),
            };
        }
        let mut forms: Vec<Form> = (0..clusters).map(|_| Form::Zeros).collect();
        let cs = self.cluster_size as usize;
        for range in ranges_to_write(buf, start / SECTOR, self.sparse_sectors) {
            let first = range.start.checked_div(cs).unwrap_or(0);
            let last = range.end.saturating_sub(1).checked_div(cs).unwrap_or(0);
            for form in forms.iter_mut().take(last.saturating_add(1)).skip(first) {
                *form = Form::Data;
            }
        }
        ChunkForms {
            forms,
            packed: Vec::new(),
        }
    }
}
