//! Opening an image by path: following its backing chain and data file under a [`FilePolicy`]
//! (one walk down the chain, [`walk_chain`], for opening it and for describing it), every file
//! opened the same way ([`open_file`]: without blocking, checked with `fstat`), and
//! [`CorruptBitHidden`] for reading an image QEMU opens read-only.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use positioned_io::{ReadAt, Size};

use crate::base::holes::HoleQuery;
use crate::base::io::{read_up_to, PositionalSink, Storage};
use crate::base::SECTOR;
use crate::error::{Error, Result};
use crate::format::header::MAGIC;
use crate::image::options::{FilePolicy, FileRole, OpenOptions};
use crate::image::qcow2::Qcow2;

impl Qcow2<File> {
    /// Open an image by path as `qemu-img` does: follow its backing chain (names resolved
    /// relative to the directory of the image that names them) and open its external data
    /// file, with default options ([`FilePolicy::Any`]).
    ///
    /// ```
    /// use positioned_io::ReadAt;
    ///
    /// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
    /// let mut buf = vec![0u8; 4096];
    /// image.reader()?.read_exact_at(0, &mut buf)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_path_with(path, &OpenOptions::default())
    }

    /// Open an image by path with options: other files are opened only as
    /// [`OpenOptions::files`] allows, with its limits, threads and secret.
    ///
    /// The image itself and every file it names must be regular files (block devices too
    /// when [`OpenOptions::allow_devices`] says so): a FIFO, socket, directory or character
    /// device is an [`Error::NotRegularFile`] at once, never a blocked open.
    ///
    /// ```
    /// use qcow2::{Error, FilePolicy, OpenOptions, Qcow2};
    ///
    /// // Open no other file: the overlay's backing file is refused.
    /// let options = OpenOptions::new().files(FilePolicy::Nothing);
    /// let err = Qcow2::open_path_with("fixtures/chain-top.qcow2", &options).unwrap_err();
    /// assert!(matches!(err, Error::FileRefused { .. }));
    ///
    /// // Backing files inside the image's own directory only, two threads.
    /// let path = std::path::Path::new("fixtures/chain-top.qcow2");
    /// let dir = path.parent().unwrap_or(std::path::Path::new(""));
    /// let options = OpenOptions::new().files(FilePolicy::Under(dir.into())).threads(2);
    /// let image = Qcow2::open_path_with(path, &options)?;
    /// assert!(image.has_backing_attached());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn open_path_with(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let (mut top, below, mut raw) =
            walk_chain(path.as_ref(), options, open_link, open_raw_link, next_link)?;
        // Attached from the bottom up: each image hands its caches to the chain below it.
        let mut lower = None;
        for mut image in below.into_iter().rev() {
            attach(&mut image, lower.take(), &mut raw);
            lower = Some(image);
        }
        attach(&mut top, lower, &mut raw);
        Ok(top)
    }
}

/// Where the next image of a chain is, as the image above it names it.
pub(crate) enum NextPath {
    /// A path to open as it is.
    Resolved(PathBuf),
    /// The name the image records, resolved against the image's path as QEMU resolves it
    /// ([`resolve`]).
    Named(PathBuf),
}

/// The file below an image in its chain: where it is and its recorded format (probed when
/// none is recorded).
pub(crate) struct NextLink {
    pub(crate) path: NextPath,
    pub(crate) format: Option<String>,
}

/// The one walk down a backing chain by path, for [`Qcow2::open_path_with`] and
/// [`ImageInfo::chain_from_path`](crate::ImageInfo::chain_from_path): open the qcow2 image at
/// `top` with `open_qcow2`, then, while `next` names the file below the last image opened,
/// open that file as [`OpenOptions::files`] allows (refusing a chain deeper than
/// [`Limits::max_chain_depth`](crate::Limits) or one that loops), take its recorded format or
/// probe it, and read it with `open_qcow2` or `open_raw` (a raw file ends the chain).
///
/// Returns the top image, the qcow2 images below it (top first) and the raw file at the
/// bottom, if any. The options are [`OpenOptions::for_one_open`]'s: one key-derivation budget
/// for the whole chain.
pub(crate) fn walk_chain<Q, R>(
    top: &Path,
    options: &OpenOptions,
    mut open_qcow2: impl FnMut(File, &Path, &OpenOptions) -> Result<Q>,
    open_raw: impl FnOnce(File, &Path) -> Result<R>,
    next: impl Fn(&Q) -> Option<NextLink>,
) -> Result<(Q, Vec<Q>, Option<R>)> {
    let options = &options.for_one_open(); // one PBKDF2 budget for the whole chain
    let file = match options.write {
        true => checked_open_rw(top, options.allow_devices)?,
        false => checked_open(top, "image", options.allow_devices)?,
    };
    // Only the top image is written: its backing files are opened read-only, as QEMU does.
    let top_options = options;
    let options = &OpenOptions {
        write: false,
        ..options.clone()
    };
    let mut visited = HashSet::new();
    visited.insert(canonical(top)?);
    let first = open_qcow2(file, top, top_options)?;
    let mut below: Vec<Q> = Vec::new();
    let mut path = top.to_path_buf();
    loop {
        let last = below.last().unwrap_or(&first);
        let Some(link) = next(last) else {
            return Ok((first, below, None));
        };
        // The images opened so far: the depth of the next one.
        if below.len() >= options.limits.max_chain_depth as usize {
            return Err(Error::BackingChain {
                path,
                reason: format!(
                    "backing chain deeper than {}",
                    options.limits.max_chain_depth
                ),
            });
        }
        let backing_path = match link.path {
            NextPath::Resolved(p) => p,
            NextPath::Named(name) => resolve(&path, &name)?,
        };
        let file = open_allowed(&backing_path, FileRole::Backing, options)?;
        if !visited.insert(canonical(&backing_path).unwrap_or_else(|_| backing_path.clone())) {
            return Err(Error::BackingChain {
                path: backing_path,
                reason: "backing chain loops back to an image already in it".to_owned(),
            });
        }
        let format = match link.format {
            Some(f) => f,
            None => probe_format(&file, &backing_path)?.to_owned(),
        };
        match format.as_str() {
            "qcow2" => below.push(open_qcow2(file, &backing_path, options)?),
            "raw" | "file" => {
                let raw = open_raw(file, &backing_path)?;
                return Ok((first, below, Some(raw)));
            }
            _ => {
                return Err(Error::UnsupportedBackingFormat {
                    format,
                    path: backing_path,
                })
            }
        }
        path = backing_path;
    }
}

/// A raw file at the bottom of a chain, ready to attach.
struct RawLink {
    file: File,
    size: u64,
    path: PathBuf,
    holes: Option<Box<dyn HoleQuery>>,
    id: Option<FileId>,
}

/// Open one qcow2 image of a chain with its data file (not its backing file).
fn open_link(file: File, path: &Path, options: &OpenOptions) -> Result<Qcow2<File>> {
    let holes = hole_query(&file);
    let id = FileId::of(&file, path)?;
    let secret = options.secret_for_path(path);
    let mut image = Qcow2::open_with_secret(file, options, secret.as_ref())?;
    image.holes = holes;
    image.path = Some(path.to_path_buf());
    image.files.extend(id);
    // Only an image with the data-file bit uses the name it records (QEMU ignores it otherwise).
    if let Some(name) = image.header().external_data_file().map(Path::to_path_buf) {
        let data_path = resolve(path, &name)?;
        let data = match options.write {
            true => open_data_file_rw(&data_path, options)?,
            false => open_allowed(&data_path, FileRole::DataFile, options)?,
        };
        if options.write {
            let writable = data
                .try_clone()
                .map_err(|e| Error::io(format!("opening data file {}", data_path.display()), e))?;
            image.data_storage = Some(Box::new(writable));
        }
        image.files.extend(FileId::of(&data, &data_path)?);
        image.data_file_holes = hole_query(&data);
        image.data_file_path = Some(data_path);
        image.set_data_file(data)?;
    }
    Ok(image)
}

/// The data file of an image opened for writing: allowed by the policy (checked by opening
/// it read-only first), then opened for reading and writing.
fn open_data_file_rw(path: &Path, options: &OpenOptions) -> Result<File> {
    let allowed = open_allowed(path, FileRole::DataFile, options)?;
    drop(allowed);
    checked_open_rw(path, options.allow_devices)
}

/// A raw backing file, sized as QEMU sizes it.
fn open_raw_link(file: File, path: &Path) -> Result<RawLink> {
    let size = disk_len(&file)
        .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?;
    // QEMU counts a raw file in whole sectors: the partial last one reads as zeros.
    let size = size.checked_next_multiple_of(SECTOR).unwrap_or(size);
    let holes = hole_query(&file);
    let id = FileId::of(&file, path)?;
    Ok(RawLink {
        file,
        size,
        path: path.to_path_buf(),
        holes,
        id,
    })
}

/// The backing file `image` names, unless it has its backing already
/// (`backing_as_zeros`).
fn next_link(image: &Qcow2<File>) -> Option<NextLink> {
    let name = image.header().backing_file_path()?;
    if image.has_backing_attached() {
        return None;
    }
    Some(NextLink {
        path: NextPath::Named(name.to_path_buf()),
        format: image.header().backing_format().map(str::to_owned),
    })
}

/// Give `image` its backing: the qcow2 image below it, else the raw file at the bottom.
fn attach(image: &mut Qcow2<File>, lower: Option<Qcow2<File>>, raw: &mut Option<RawLink>) {
    if let Some(lower) = lower {
        image.set_backing_image(lower);
    } else if let Some(raw) = raw.take() {
        image.set_backing_raw_from(raw.file, raw.size, Some(raw.path), raw.holes, raw.id);
    }
}

/// The length of a disk file: a regular file's size, or a block device's (which `stat`
/// reports as 0: its end is found by seeking there).
pub(crate) fn disk_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    io::Seek::seek(&mut &*file, io::SeekFrom::End(0))
}

/// A file's identity, its device and inode: the same file whatever name, hard link, symlink
/// or descriptor reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of an opened file, from `fstat` on its descriptor (`None` where the
    /// platform has no inode numbers). `path` is for the error message.
    pub(crate) fn of(file: &File, path: &Path) -> Result<Option<FileId>> {
        sys::file_id(file).map_err(|e| Error::io(format!("inspecting {}", path.display()), e))
    }

    /// [`FileId::of`] for a file handed to the library without its name.
    pub(crate) fn of_file(file: &File) -> Result<Option<FileId>> {
        sys::file_id(file).map_err(|e| Error::io("inspecting a file (fstat)", e))
    }
}

/// Open a file for reading the way this crate opens every file: read-only, close-on-exec,
/// non-blocking (so that a FIFO without a writer cannot hang the open), then checked with
/// `fstat` on the descriptor opened (not on the path, which may change meanwhile): it must
/// be a regular file, or a block device when [`OpenOptions::allow_devices`] says so.
///
/// Use it to open an image before [`Qcow2::open`], or a raw disk before
/// [`RawDisk::from_file`](crate::RawDisk::from_file); [`Qcow2::open_path`] opens every file
/// of a chain this way. A FIFO, socket, directory or character device is an
/// [`Error::NotRegularFile`].
///
/// ```
/// let options = qcow2::OpenOptions::new();
/// let file = qcow2::open_file("fixtures/v3-64k-basic.qcow2", &options)?;
/// let image = qcow2::Qcow2::open(file)?;
/// # let _ = image;
/// assert!(matches!(
///     qcow2::open_file("fixtures", &options),
///     Err(qcow2::Error::NotRegularFile { kind: "directory", .. })
/// ));
/// # Ok::<(), qcow2::Error>(())
/// ```
pub fn open_file(path: impl AsRef<Path>, options: &OpenOptions) -> Result<File> {
    checked_open(path.as_ref(), "image", options.allow_devices)
}

impl FilePolicy {
    /// Open every file as [`FilePolicy::Any`] does (read-only, without blocking, then checked
    /// to be a regular file), and tell `watch` of each open as it happens: the path, what the
    /// file is for, and the error when it could not be opened. For logging, or for saying
    /// which file of a chain failed and how deep it lay. It is a [`FilePolicy::Callback`], so
    /// a file the system refuses (`PermissionDenied`) is an [`Error::FileRefused`].
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use qcow2::{FilePolicy, FileRole, OpenOptions, Qcow2};
    ///
    /// let opened = Arc::new(Mutex::new(Vec::new()));
    /// let log = Arc::clone(&opened);
    /// let policy = FilePolicy::observed(move |path, role, error| {
    ///     if let Ok(mut log) = log.lock() {
    ///         log.push((path.to_path_buf(), role, error.is_none()));
    ///     }
    /// });
    /// let options = OpenOptions::new().files(policy);
    /// let image = Qcow2::open_path_with("fixtures/chain-top.qcow2", &options)?;
    /// let opened = opened.lock().unwrap();
    /// // Two backing files below the top image, both opened.
    /// assert_eq!(opened.len(), 2);
    /// assert!(opened.iter().all(|(_, role, ok)| *role == FileRole::Backing && *ok));
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn observed<F>(watch: F) -> FilePolicy
    where
        F: Fn(&Path, FileRole, Option<&io::Error>) + Send + Sync + 'static,
    {
        FilePolicy::Callback(std::sync::Arc::new(move |path: &Path, role: FileRole| {
            let opened = sys::open_nonblocking(path);
            watch(path, role, opened.as_ref().err());
            opened
        }))
    }
}

/// An image source whose corrupt bit (incompatible feature bit 1: bit 1 of header byte 79,
/// the last of the big-endian incompatible features at bytes 72-79 of a version 3 header)
/// reads as clear; every other byte reads as it is.
///
/// QEMU opens an image with the corrupt bit read-only, so `qemu-img info` and `qemu-img
/// check` still describe and check it; this crate refuses it ([`Error::Corrupt`]) so that
/// nobody reads guest data through metadata known to be inconsistent. Open such an image
/// through this source to read its metadata or check it. A version 2 header has no feature
/// bits: it reads unchanged.
///
/// ```
/// use qcow2::{CorruptBitHidden, Error, Qcow2};
///
/// let path = "fixtures/v3-corrupt.qcow2";
/// let file = qcow2::open_file(path, &Default::default())?;
/// assert!(matches!(Qcow2::open(file), Err(Error::Corrupt)));
/// // Its metadata, read as QEMU reads it, and checked as `qemu-img check` checks it.
/// let file = qcow2::open_file(path, &Default::default())?;
/// let image = Qcow2::open(CorruptBitHidden::new(file)?)?;
/// assert!(!image.header().is_corrupt());
/// let report = image.check()?;
/// # let _ = report;
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug)]
pub struct CorruptBitHidden<I> {
    io: I,
    /// A version 3 (or later) header, where the bit lies.
    v3: bool,
    /// The bit is kept in the file by writes of its byte until it is cleared
    /// ([`CorruptBitHidden::clear_corrupt_bit`]).
    cleared: std::sync::atomic::AtomicBool,
}

/// The header byte that holds incompatible feature bits 0-7 (bytes 72-79, big-endian), and
/// the corrupt bit in it.
const INCOMPAT_LOW_BYTE: u64 = 79;
const CORRUPT_BIT: u8 = 1 << 1;

impl<I: ReadAt> CorruptBitHidden<I> {
    /// `io`, its corrupt bit hidden if its header is of version 3 or later (the version is
    /// read now: header bytes 4-7).
    pub fn new(io: I) -> Result<Self> {
        let mut version = [0u8; 4];
        io.read_exact_at(4, &mut version)
            .map_err(|e| Error::io("reading the header", e))?;
        Ok(CorruptBitHidden {
            io,
            v3: u32::from_be_bytes(version) >= 3,
            cleared: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The source underneath.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The source underneath, taken back.
    pub fn into_inner(self) -> I {
        self.io
    }
}

impl<I: ReadAt> ReadAt for CorruptBitHidden<I> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.io.read_at(pos, buf)?;
        let at = INCOMPAT_LOW_BYTE
            .checked_sub(pos)
            .and_then(|at| usize::try_from(at).ok())
            .filter(|&at| self.v3 && at < n);
        if let Some(byte) = at.and_then(|at| buf.get_mut(at)) {
            *byte &= !CORRUPT_BIT;
        }
        Ok(n)
    }
}

/// Writes pass through, but a write of the header byte that holds the corrupt bit keeps the
/// bit set in the file (whatever the writer read) until it is cleared on purpose: a job that
/// rewrites the header of an image it is repairing does not clear it part-way.
impl<I: Storage> PositionalSink for CorruptBitHidden<I> {
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> io::Result<()> {
        let at = INCOMPAT_LOW_BYTE
            .checked_sub(pos)
            .and_then(|at| usize::try_from(at).ok())
            .filter(|&at| self.v3 && at < buf.len());
        match at {
            Some(at) if !self.cleared.load(std::sync::atomic::Ordering::SeqCst) => {
                let mut bytes = buf.to_vec();
                if let Some(byte) = bytes.get_mut(at) {
                    *byte |= CORRUPT_BIT;
                }
                self.io.write_all_at(pos, &bytes)
            }
            _ => self.io.write_all_at(pos, buf),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.io.set_len(len)
    }
}

impl<I: Storage> Storage for CorruptBitHidden<I> {
    fn length(&self) -> io::Result<u64> {
        self.io.length()
    }

    fn sync(&self) -> io::Result<()> {
        self.io.sync()
    }
}

impl<I: Storage> CorruptBitHidden<I> {
    /// Clear the corrupt bit in the file itself, as `qemu-img check -r` does once a repair
    /// leaves nothing corrupt: its header byte written, then synced.
    pub fn clear_corrupt_bit(&self) -> Result<()> {
        self.cleared
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !self.v3 {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        self.io
            .read_exact_at(INCOMPAT_LOW_BYTE, &mut byte)
            .map_err(|e| Error::io("reading the header", e))?;
        if byte[0] & CORRUPT_BIT == 0 {
            return Ok(());
        }
        let [b] = byte;
        self.io
            .write_all_at(INCOMPAT_LOW_BYTE, &[b & !CORRUPT_BIT])
            .and_then(|()| self.io.sync())
            .map_err(|e| Error::io("clearing the corrupt bit", e))
    }
}

impl Qcow2<CorruptBitHidden<File>> {
    /// Open an image whose corrupt bit is set to repair it, as `qemu-img check -r` opens it:
    /// read-write and locked (as [`OpenOptions::write`] opens), the bit hidden from the
    /// reading but kept in the file until [`CorruptBitHidden::clear_corrupt_bit`] (through
    /// [`Qcow2::get_ref`]) clears it. No backing file or data file is opened: a repair
    /// reads only the image's metadata.
    pub fn open_path_to_repair(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let file = checked_open_rw(path, options.allow_devices)?;
        let options = options.clone().write(true);
        let mut image = Qcow2::open_with(CorruptBitHidden::new(file)?, &options)?;
        if image.header.backing_file().is_some() {
            image.set_backing_zeros();
        }
        Ok(image)
    }
}

impl<I: Size> Size for CorruptBitHidden<I> {
    fn size(&self) -> io::Result<Option<u64>> {
        self.io.size()
    }
}

/// A second handle to `file` that answers the map's questions about holes (none if the
/// handle cannot be had: the map then takes the file as all data).
fn hole_query(file: &File) -> Option<Box<dyn HoleQuery>> {
    file.try_clone()
        .ok()
        .map(|f| Box::new(f) as Box<dyn HoleQuery>)
}

/// QEMU's rule without a backing format: probe the content. qcow2's magic means qcow2; the
/// signature of another format QEMU probes means that format (which we then refuse rather
/// than misread as raw); anything else is raw.
pub(crate) fn probe_format(file: &File, path: &Path) -> Result<&'static str> {
    let mut head = [0u8; 512];
    let got = read_up_to(file, 0, &mut head)
        .map_err(|e| Error::io(format!("probing {}", path.display()), e))?;
    Ok(probe_bytes(head.get(..got).unwrap_or_default(), path))
}

/// The format QEMU's probes (`bdrv_probe` of each driver) would pick for a file starting with
/// `head`: the magics and the version fields those probes check. QEMU's dmg probe looks only
/// at the name.
fn probe_bytes(head: &[u8], path: &Path) -> &'static str {
    /// (offset, signature, format); the qcow and qcow2 magic is handled apart (its version).
    const SIGNATURES: &[(usize, &[u8], &str)] = &[
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"QED\0", "qed"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace\x02\0\0\0", "parallels"),
        (0, b"WithouFreSpacExt\x02\0\0\0", "parallels"),
        (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n", "cloop"),
        (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    ];
    if head.get(..4) == Some(&MAGIC.to_be_bytes()[..]) {
        return match head
            .get(4..8)
            .and_then(|v| v.try_into().ok())
            .map(u32::from_be_bytes)
        {
            Some(1) => "qcow",
            Some(v) if v >= 2 => "qcow2",
            _ => "raw",
        };
    }
    if is_bochs(head) {
        return "bochs";
    }
    if path.extension().is_some_and(|e| e == "dmg") && path.file_stem().is_some() {
        return "dmg";
    }
    SIGNATURES
        .iter()
        .find(|(at, sig, _)| head.get(*at..at.saturating_add(sig.len())) == Some(*sig))
        .map_or("raw", |(_, _, name)| *name)
}

/// Bochs: a C-string magic, type "Redolog", subtype "Growing" and version 1 or 2.
fn is_bochs(head: &[u8]) -> bool {
    let c_string = |at: usize, len: usize| {
        head.get(at..at.saturating_add(len))
            .map(crate::base::bytes::until_nul)
    };
    let version = head
        .get(64..68)
        .and_then(|v| v.try_into().ok())
        .map(u32::from_le_bytes);
    c_string(0, 32) == Some(&b"Bochs Virtual HD Image"[..])
        && c_string(32, 16) == Some(&b"Redolog"[..])
        && c_string(48, 16) == Some(&b"Growing"[..])
        && matches!(version, Some(0x0001_0000 | 0x0002_0000))
}

/// Resolve a name from an image header as QEMU does: a protocol name (`nbd:`, `json:`, ...)
/// is refused; `file:NAME` is NAME as given (relative to the current directory, as QEMU's
/// file protocol takes it); an absolute name is itself; any other name is relative to the
/// directory of the image naming it.
pub(crate) fn resolve(image: &Path, name: &Path) -> Result<PathBuf> {
    let bytes = name.as_os_str().as_encoded_bytes();
    if let Some(rest) = bytes.strip_prefix(b"file:") {
        // `rest` is `bytes` less an ASCII prefix: still a valid encoding.
        let rest = name
            .to_str()
            .and_then(|n| n.strip_prefix("file:"))
            .map(PathBuf::from)
            .unwrap_or_else(|| bytes_path(rest));
        return Ok(rest);
    }
    if has_protocol(bytes) {
        return Err(Error::FileRefused {
            path: name.to_path_buf(),
            role: "backing or data file",
            reason: "protocol and json: file names are not supported".to_owned(),
        });
    }
    if name.is_absolute() {
        return Ok(name.to_path_buf());
    }
    Ok(image.parent().unwrap_or(Path::new("")).join(name))
}

/// Bytes as a path: exactly on Unix (where QEMU takes file names as bytes), lossily elsewhere.
#[cfg(unix)]
pub(crate) fn bytes_path(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

/// Bytes as a path: exactly on Unix, lossily elsewhere.
#[cfg(not(unix))]
pub(crate) fn bytes_path(bytes: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(bytes).into_owned())
}

/// QEMU's `path_has_protocol`: a colon before any slash.
pub(crate) fn has_protocol(name: &[u8]) -> bool {
    match name.iter().position(|&b| b == b':') {
        Some(colon) => !name.get(..colon).unwrap_or_default().contains(&b'/'),
        None => false,
    }
}

pub(crate) fn canonical(path: &Path) -> Result<PathBuf> {
    path.canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", path.display()), e))
}

/// Open a file the image names, as the policy allows, and check what was opened.
pub(crate) fn open_allowed(path: &Path, role: FileRole, options: &OpenOptions) -> Result<File> {
    let refuse = |reason: String| Error::FileRefused {
        path: path.to_path_buf(),
        role: role.describe(),
        reason,
    };
    let devices = options.allow_devices;
    match &options.files {
        FilePolicy::Any => checked_open(path, role.describe(), devices),
        FilePolicy::Nothing => Err(refuse("the open policy allows no other files".to_owned())),
        FilePolicy::Under(dir) => {
            // An empty path (what `Path::parent` gives for a bare file name) is the current
            // directory, as it is when a path is resolved relative to it.
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir.as_path()
            };
            let file = beneath::open(dir, path, role.describe()).map_err(|e| match e {
                beneath::Failure::Outside(reason) => refuse(reason),
                beneath::Failure::Error(e) => e,
            })?;
            check_file_type(&file, path, role.describe(), devices)?;
            Ok(file)
        }
        FilePolicy::Callback(f) => {
            let file = f(path, role).map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => refuse(e.to_string()),
                _ => Error::io(format!("opening {} {}", role.describe(), path.display()), e),
            })?;
            check_file_type(&file, path, role.describe(), devices)?;
            Ok(file)
        }
    }
}

/// Open `path` read-only without blocking (a FIFO opens at once in non-blocking mode), then
/// refuse anything but a regular file (or a block device, when allowed).
pub(crate) fn checked_open(path: &Path, role: &'static str, devices: bool) -> Result<File> {
    let file = sys::open_nonblocking(path)
        .map_err(|e| Error::io(format!("opening {role} {}", path.display()), e))?;
    check_file_type(&file, path, role, devices)?;
    Ok(file)
}

/// [`checked_open`] for reading and writing: the image a writer opens.
///
/// The file is locked for this process alone (a POSIX write lock on every byte): QEMU's own
/// locks on an image it uses (a running VM, a qemu-img job) make the open fail with
/// [`Error::Locked`], and QEMU cannot open the image while this writer has it.
fn checked_open_rw(path: &Path, devices: bool) -> Result<File> {
    let file = sys::open_rw(path)
        .map_err(|e| Error::io(format!("opening image {} for writing", path.display()), e))?;
    check_file_type(&file, path, "image", devices)?;
    sys::lock_for_writing(&file).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::PermissionDenied => Error::Locked {
            path: path.to_path_buf(),
        },
        _ => Error::io(format!("locking image {}", path.display()), e),
    })?;
    Ok(file)
}

/// Refuse an opened file that is not a regular file (block devices pass when allowed).
fn check_file_type(file: &File, path: &Path, role: &'static str, devices: bool) -> Result<()> {
    let kind = sys::file_kind(file)
        .map_err(|e| Error::io(format!("inspecting {role} {}", path.display()), e))?;
    match kind {
        "regular file" => Ok(()),
        "block device" if devices => Ok(()),
        kind => Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            role,
            kind,
        }),
    }
}

#[cfg(unix)]
mod sys {
    use std::fs::File;
    use std::io;
    use std::path::Path;

    use rustix::fs::{FileType, Mode, OFlags};

    /// Read-only, close-on-exec, never a controlling terminal, and non-blocking so that a
    /// FIFO without a writer cannot hang the open (regular files ignore the flag).
    pub(super) const FLAGS: OFlags = OFlags::RDONLY
        .union(OFlags::CLOEXEC)
        .union(OFlags::NOCTTY)
        .union(OFlags::NONBLOCK);

    pub(super) fn open_nonblocking(path: &Path) -> io::Result<File> {
        Ok(File::from(rustix::fs::open(path, FLAGS, Mode::empty())?))
    }

    /// A write lock on the whole file, without waiting.
    pub(super) fn lock_for_writing(file: &File) -> io::Result<()> {
        Ok(rustix::fs::fcntl_lock(
            file,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )?)
    }

    /// [`open_nonblocking`] for reading and writing.
    pub(super) fn open_rw(path: &Path) -> io::Result<File> {
        let flags = FLAGS.difference(OFlags::RDONLY).union(OFlags::RDWR);
        Ok(File::from(rustix::fs::open(path, flags, Mode::empty())?))
    }

    pub(super) fn file_id(file: &File) -> io::Result<Option<super::FileId>> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        Ok(Some(super::FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }))
    }

    pub(super) fn file_kind(file: &File) -> io::Result<&'static str> {
        let stat = rustix::fs::fstat(file)?;
        Ok(match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => "regular file",
            FileType::BlockDevice => "block device",
            FileType::CharacterDevice => "character device",
            FileType::Fifo => "FIFO",
            FileType::Socket => "socket",
            FileType::Directory => "directory",
            FileType::Symlink => "symbolic link",
            _ => "special file",
        })
    }
}

#[cfg(not(unix))]
mod sys {
    use std::fs::File;
    use std::io;
    use std::path::Path;

    pub(super) fn open_nonblocking(path: &Path) -> io::Result<File> {
        File::open(path)
    }

    pub(super) fn open_rw(path: &Path) -> io::Result<File> {
        File::options().read(true).write(true).open(path)
    }

    pub(super) fn lock_for_writing(_file: &File) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn file_id(_file: &File) -> io::Result<Option<super::FileId>> {
        Ok(None)
    }

    pub(super) fn file_kind(file: &File) -> io::Result<&'static str> {
        let kind = file.metadata()?.file_type();
        Ok(if kind.is_file() {
            "regular file"
        } else if kind.is_dir() {
            "directory"
        } else {
            "special file"
        })
    }
}

/// `FilePolicy::Under`: the file actually opened lies under the directory, whatever symlinks
/// or renames happen meanwhile.
mod beneath {
    use std::fs::File;
    use std::path::{Path, PathBuf};

    use crate::error::Error;

    pub(super) enum Failure {
        /// The path leads outside the directory: a refusal.
        Outside(String),
        Error(Error),
    }

    /// `path` relative to `dir`, for a path that cannot be resolved now (a missing file, a
    /// dangling symlink: the open then says why): its directory resolved, when it can be, and
    /// its last component as written, else the whole path as written (symlinks and `..` left
    /// to the kernel to resolve, beneath the directory).
    fn lexical(dir: &Path, path: &Path) -> Result<PathBuf, Failure> {
        let absolute = |p: &Path| std::path::absolute(p).ok();
        let dirs = [absolute(dir), dir.canonicalize().ok()];
        let parent_resolved = || {
            let name = path.file_name()?;
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            Some(
                parent
                    .unwrap_or(Path::new("."))
                    .canonicalize()
                    .ok()?
                    .join(name),
            )
        };
        for p in [parent_resolved(), absolute(path)].iter().flatten() {
            for d in dirs.iter().flatten() {
                if let Ok(rel) = p.strip_prefix(d) {
                    if !rel.as_os_str().is_empty() {
                        return Ok(rel.to_path_buf());
                    }
                }
            }
        }
        Err(outside(dir))
    }

    fn outside(dir: &Path) -> Failure {
        Failure::Outside(format!("it is not under {}", dir.display()))
    }

    /// Where `path` resolves now (every symlink and `..` followed, whatever route they
    /// take), relative to the directory resolved the same way: `None` when the path cannot be
    /// resolved (it is missing); a refusal when it resolves outside.
    fn resolved(dir: &Path, path: &Path) -> Result<Option<PathBuf>, Failure> {
        let Ok(target) = path.canonicalize() else {
            return Ok(None);
        };
        let dir_resolved = dir.canonicalize().map_err(|e| {
            Failure::Error(Error::io(
                format!("resolving the allowed directory {}", dir.display()),
                e,
            ))
        })?;
        match target.strip_prefix(&dir_resolved) {
            Ok(rel) if !rel.as_os_str().is_empty() => Ok(Some(rel.to_path_buf())),
            _ => Err(Failure::Outside(format!(
                "it resolves to {}, outside {}",
                target.display(),
                dir.display()
            ))),
        }
    }

    /// Open `path` if it resolves under `dir`, by whatever route (`../d/x`, an absolute
    /// symlink into `d`), and refuse it if it resolves outside.
    ///
    /// The path is resolved first, then its resolved name is opened relative to a descriptor
    /// of the directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: whatever
    /// symlinks or renames happen meanwhile, the file opened lies beneath the directory (a
    /// component turned into a symlink meanwhile makes the open fail). A path that cannot be
    /// resolved (a missing file) is opened as written under `RESOLVE_BENEATH`, so the kernel
    /// reports why it cannot be opened, or that it leads outside.
    #[cfg(target_os = "linux")]
    pub(super) fn open(dir: &Path, path: &Path, role: &str) -> Result<File, Failure> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let io_error = |what: &str, e: std::io::Error| {
            Failure::Error(Error::io(format!("{what} {}", path.display()), e))
        };
        let dir_fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_error("opening the allowed directory for", e.into()))?;
        let (rel, how) = match resolved(dir, path)? {
            Some(rel) => (rel, ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS),
            None => (
                lexical(dir, path)?,
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            ),
        };
        match rustix::fs::openat2(&dir_fd, &rel, super::sys::FLAGS, Mode::empty(), how) {
            Ok(fd) => Ok(File::from(fd)),
            Err(rustix::io::Errno::XDEV) => Err(Failure::Outside(format!(
                "it resolves outside {}",
                dir.display()
            ))),
            // A component of the resolved name became a symlink after it was resolved.
            Err(rustix::io::Errno::LOOP) if how.contains(ResolveFlags::NO_SYMLINKS) => Err(
                Failure::Outside("the path changed while it was being opened".to_owned()),
            ),
            // Kernels before 5.6 have no openat2: check the opened file instead.
            Err(rustix::io::Errno::NOSYS) => open_and_verify(dir, path, role),
            Err(e) => Err(io_error(&format!("opening {role}"), e.into())),
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn open(dir: &Path, path: &Path, role: &str) -> Result<File, Failure> {
        if resolved(dir, path)?.is_none() {
            lexical(dir, path)?;
        }
        open_and_verify(dir, path, role)
    }

    /// Open, then make sure the file opened is the one at the resolved path under `dir`
    /// (same device and inode), so a swap between check and open is caught.
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    fn open_and_verify(dir: &Path, path: &Path, role: &str) -> Result<File, Failure> {
        let io_error = |e: std::io::Error| {
            Failure::Error(Error::io(format!("opening {role} {}", path.display()), e))
        };
        let dir = dir.canonicalize().map_err(io_error)?;
        let file = super::sys::open_nonblocking(path).map_err(io_error)?;
        let target = path.canonicalize().map_err(io_error)?;
        if !target.starts_with(&dir) {
            return Err(outside(&dir));
        }
        if !same_file(&file, &target).map_err(io_error)? {
            return Err(Failure::Outside(
                "the file changed while it was being opened".to_owned(),
            ));
        }
        Ok(file)
    }

    #[cfg(unix)]
    fn same_file(file: &File, path: &Path) -> std::io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (file.metadata()?, std::fs::metadata(path)?);
        Ok(a.dev() == b.dev() && a.ino() == b.ino())
    }

    #[cfg(not(unix))]
    fn same_file(_file: &File, _path: &Path) -> std::io::Result<bool> {
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(image: &Path, name: &str) -> Result<PathBuf> {
        super::resolve(image, Path::new(name))
    }

    #[test]
    fn names_resolve_like_qemu() {
        let img = Path::new("/images/vm/top.qcow2");
        assert_eq!(
            resolve(img, "base.qcow2").unwrap(),
            Path::new("/images/vm/base.qcow2")
        );
        assert_eq!(
            resolve(img, "../b.raw").unwrap(),
            Path::new("/images/vm/../b.raw")
        );
        assert_eq!(
            resolve(img, "/abs/b.qcow2").unwrap(),
            Path::new("/abs/b.qcow2")
        );
        // QEMU's file protocol takes the rest as given: relative to the current directory.
        assert_eq!(resolve(img, "file:b.qcow2").unwrap(), Path::new("b.qcow2"));
        assert!(resolve(img, "nbd://host/export").is_err());
        assert!(resolve(img, "json:{\"driver\":\"file\"}").is_err());
        assert!(!has_protocol(b"dir/with:colon"));
    }

    /// Opening a chain and describing it walk it the same way: the same images, and the
    /// same refusal of a chain deeper than the limit.
    #[test]
    fn one_walk_opens_and_describes_a_chain() {
        let top = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/chain-top.qcow2");
        let options = OpenOptions::new();
        let image = Qcow2::open_path_with(top, &options).unwrap();
        let infos = crate::ImageInfo::chain_from_path(top, &options).unwrap();
        assert_eq!(infos.len(), 3);
        assert_eq!(image.info().backing_chain.len(), 2);
        for (info, entry) in infos.iter().skip(1).zip(&image.info().backing_chain) {
            assert_eq!(info.filename, entry.filename);
            assert_eq!(info.virtual_size, entry.virtual_size);
        }
        let limits = crate::Limits {
            max_chain_depth: 1,
            ..Default::default()
        };
        let shallow = OpenOptions::new().limits(limits);
        let opened = Qcow2::open_path_with(top, &shallow).unwrap_err();
        let described = crate::ImageInfo::chain_from_path(top, &shallow).unwrap_err();
        assert!(matches!(opened, Error::BackingChain { .. }), "{opened}");
        assert_eq!(opened.to_string(), described.to_string());
    }

    #[test]
    fn probing_names_formats_it_does_not_read() {
        let p = Path::new("disk.img");
        let mut qcow2 = MAGIC.to_be_bytes().to_vec();
        qcow2.extend(3u32.to_be_bytes());
        assert_eq!(probe_bytes(&qcow2, p), "qcow2");
        qcow2[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(probe_bytes(&qcow2, p), "qcow");
        assert_eq!(probe_bytes(b"KDMV\x01\x00", p), "vmdk");
        assert_eq!(probe_bytes(b"COWD\x01\x00", p), "vmdk");
        let mut vdi = vec![0u8; 0x44];
        vdi[0x40..].copy_from_slice(b"\x7f\x10\xda\xbe");
        assert_eq!(probe_bytes(&vdi, p), "vdi");
        let mut bochs = vec![0u8; 512];
        bochs[..22].copy_from_slice(b"Bochs Virtual HD Image");
        bochs[32..39].copy_from_slice(b"Redolog");
        bochs[48..55].copy_from_slice(b"Growing");
        bochs[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        assert_eq!(probe_bytes(&bochs, p), "bochs");
        bochs[64] = 9;
        assert_eq!(probe_bytes(&bochs, p), "raw");
        assert_eq!(probe_bytes(b"anything", Path::new("x.dmg")), "dmg");
        assert_eq!(probe_bytes(b"just some disk bytes", p), "raw");
        assert_eq!(probe_bytes(b"", p), "raw");
    }
}
