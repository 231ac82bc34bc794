//! The crate's error type.

use std::io;

use crate::format::feature::{FeatureKind, FeatureName};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening or reading an image.
///
/// Variants fall in four groups a program can tell apart: the input is not qcow2
/// ([`Error::NotQcow2`]), it uses something this crate does not read
/// ([`Error::UnsupportedVersion`], [`Error::UnsupportedFeature`], [`Error::Encrypted`],
/// [`Error::FeatureDisabled`]), it is malformed ([`Error::Malformed`] and the variants that
/// carry a file offset), it needs a file the caller did not supply or allow
/// ([`Error::BackingMissing`], [`Error::DataFileMissing`], [`Error::FileRefused`]), or the
/// underlying I/O failed ([`Error::Io`]).
///
/// An error's text does not repeat its cause's: variants that wrap another error
/// ([`Error::Io`], [`Error::ReadFailed`], [`Error::SinkFailed`]) give it from
/// [`source`](std::error::Error::source), so a printer that walks the chain shows each
/// text once. Reads through [`positioned_io::ReadAt`] return a [`std::io::Error`] that wraps
/// this type: see [`Reader`](crate::Reader#errors) for how to get it back.
///
/// ```
/// use qcow2::{Error, Qcow2};
///
/// match Qcow2::open(std::fs::File::open("fixtures/backing-raw-base.raw")?) {
///     Err(Error::NotQcow2 { found }) => println!("not qcow2 (magic {found:#x})"),
///     Err(e) => return Err(e.into()),
///     Ok(_) => unreachable!("a raw file"),
/// }
///
/// // The whole chain of causes, each once.
/// let err = Qcow2::open_path("fixtures/no-such-file.qcow2").unwrap_err();
/// let mut text = err.to_string();
/// let mut source = std::error::Error::source(&err);
/// while let Some(cause) = source {
///     text += &format!(": {cause}");
///     source = cause.source();
/// }
/// assert!(text.starts_with("I/O error while opening image fixtures/no-such-file.qcow2: "));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is shorter than a qcow2 header (72 bytes for version 2, 104 for version 3):
    /// too short to hold its magic, or a header cut short.
    #[error("the file is too short to be a qcow2 image ({len} bytes)")]
    TooShort {
        /// The file's length in bytes.
        len: u64,
    },

    /// The first four bytes are not `QFI\xfb`.
    #[error("not a qcow2 image (magic {found:#010x}, expected 0x514649fb)")]
    NotQcow2 {
        /// The magic number found at offset 0.
        found: u32,
    },

    /// The header's version is neither 2 nor 3.
    #[error("unsupported qcow2 version {version} (only versions 2 and 3 exist)")]
    UnsupportedVersion {
        /// The version field, header bytes 4-7.
        version: u32,
    },

    /// The image sets feature bits this crate does not handle.
    #[error("unsupported qcow2 {kind} feature: {}", describe_features(all))]
    UnsupportedFeature {
        /// Which feature field the bits are in.
        kind: FeatureKind,
        /// The lowest such bit.
        bit: u8,
        /// Its name from the image's feature-name table, or the spec's name, or `unknown`.
        name: String,
        /// Every such bit, each with its name, lowest first.
        all: Vec<FeatureName>,
    },

    /// The image is encrypted and was opened without a secret, so its data cannot be read
    /// (its metadata can). Open it with [`OpenOptions::secret`](crate::OpenOptions::secret).
    #[error(
        "image is encrypted (crypt_method {method}: {name}); open it with its secret to read it"
    )]
    Encrypted {
        /// The header's `crypt_method` (1 = AES, 2 = LUKS).
        method: u32,
        /// The method's name.
        name: &'static str,
    },

    /// The image has the corrupt bit set: QEMU found inconsistent metadata in it.
    #[error("image is marked corrupt (incompatible feature bit 1); run `qemu-img check -r all`")]
    Corrupt,

    /// Reading (or writing) the image needs a cargo feature this build was compiled without.
    #[error("this image needs the `{feature}` cargo feature, which is disabled")]
    FeatureDisabled {
        /// The cargo feature's name.
        feature: &'static str,
    },

    /// The image is malformed: a field or table holds a value QEMU would not accept.
    #[error("malformed image: {what} (at file offset {offset:#x})")]
    Malformed {
        /// What is wrong.
        what: String,
        /// The file offset of the bad field or structure.
        offset: u64,
    },

    /// A compressed cluster failed to decompress to exactly one cluster.
    #[error("compressed cluster at guest offset {guest_offset:#x} (host {host_offset:#x}) is corrupt: {reason}")]
    BadCompressedCluster {
        /// The guest offset of the cluster.
        guest_offset: u64,
        /// The host offset of the compressed data.
        host_offset: u64,
        /// What the decoder said.
        reason: String,
    },

    /// A value read from the image exceeds one of the [`Limits`](crate::Limits) in force.
    #[error("{what} needs {requested} {unit}, over the limit of {limit}")]
    LimitExceeded {
        /// What would have been allocated or followed.
        what: &'static str,
        /// How much the image asked for, counted in `unit`.
        requested: u64,
        /// The limit, in the same unit.
        limit: u64,
        /// What `requested` and `limit` count, e.g. `"bytes"`, or `"PBKDF2 blocks"` for
        /// [`Limits::max_kdf_blocks`](crate::Limits::max_kdf_blocks).
        unit: &'static str,
    },

    /// A read needs the backing image, but none is attached.
    #[error("image has backing file {name:?} but none is attached; open with Qcow2::open_path or attach one")]
    BackingMissing {
        /// The backing-file name from the header.
        name: String,
    },

    /// The image keeps its data in an external data file, but none is attached.
    #[error("image keeps its data in an external data file {name:?}, but none is attached")]
    DataFileMissing {
        /// The data-file name from the header extension, if any.
        name: String,
    },

    /// A data file was attached to an image that keeps its data in itself (incompatible bit
    /// 2 clear); QEMU: "'data-file' can only be set for images with an external data file".
    #[error("the image has no external data file (incompatible bit 2 is clear): its data is in the image itself")]
    DataFileNotUsed,

    /// The open policy refused to open a file the image names.
    #[error("refused to open {path:?} ({role}): {reason}")]
    FileRefused {
        /// The path the image asked for, after resolution.
        path: std::path::PathBuf,
        /// What the file was for (`backing file`, `external data file`).
        role: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A backing chain is deeper than allowed or loops back on itself.
    #[error("backing chain problem at {path:?}: {reason}")]
    BackingChain {
        /// The image at which the problem was found.
        path: std::path::PathBuf,
        /// What is wrong (loop, too deep).
        reason: String,
    },

    /// The backing file's format is one this crate does not read.
    #[error("unsupported backing file format {format:?} for {path:?} (qcow2 and raw are read)")]
    UnsupportedBackingFormat {
        /// The format name, from the header or probed.
        format: String,
        /// The backing file.
        path: std::path::PathBuf,
    },

    /// No snapshot has the id or name asked for.
    #[error("no snapshot with id or name {0:?}")]
    NoSuchSnapshot(String),

    /// A table or structure lies (partly) past the end of the file.
    #[error("{what} at file offset {offset:#x} ({len} bytes) runs past the end of the file")]
    PastEnd {
        /// What it is (`L1 table`, `L2 table`, `data cluster`, ...).
        what: &'static str,
        /// Its file offset.
        offset: u64,
        /// Its length in bytes.
        len: u64,
    },

    /// An offset that must be cluster aligned is not.
    #[error(
        "{what} offset {offset:#x} is not cluster aligned (field or entry at file offset {at:#x})"
    )]
    Misaligned {
        /// What the offset locates (`L2 table`, `data cluster`, ...).
        what: &'static str,
        /// The offset found.
        offset: u64,
        /// The file offset of the field or table entry holding it.
        at: u64,
    },

    /// With an external data file, a data cluster must sit at its own guest offset.
    #[error("external data file host cluster offset {host_offset:#x} does not match guest cluster offset {guest_offset:#x} (L2 entry at file offset {entry_at:#x})")]
    DataFileOffsetMismatch {
        /// The host offset the L2 entry names.
        host_offset: u64,
        /// The guest offset of the cluster.
        guest_offset: u64,
        /// The file offset of the L2 entry.
        entry_at: u64,
    },

    /// An L2 entry is invalid for this image (a zero flag in a version 2 image, a compressed
    /// cluster with an external data file, contradictory subcluster bits).
    #[error("invalid L2 entry {entry:#018x} at file offset {entry_at:#x}: {reason}")]
    InvalidL2Entry {
        /// The entry's first 64-bit word.
        entry: u64,
        /// Its file offset.
        entry_at: u64,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A file the image names is not a regular file (a FIFO, socket, directory or, unless
    /// allowed, a device), so it is not opened or not read.
    #[error("{path:?} ({role}) is not a regular file: it is a {kind}")]
    NotRegularFile {
        /// The path.
        path: std::path::PathBuf,
        /// What the file was for.
        role: &'static str,
        /// What it is instead.
        kind: &'static str,
    },

    /// The output of a conversion is a file the disk being converted reads (the image, one
    /// of its backing files or its data file, under any name or link): writing it would
    /// destroy the source, so nothing was written to it.
    #[error("the output is a file the disk being converted reads (the image, a backing file or the data file): nothing was written to it")]
    OutputIsSource,

    /// A write to an image opened for reading only (open with
    /// [`OpenOptions::write`](crate::OpenOptions::write) to write).
    #[error("the image is open for reading only (open it with OpenOptions::write(true) to write)")]
    ReadOnly,

    /// Another process holds a lock on the image (or its data file): QEMU locks the images a
    /// running VM or a qemu-img job uses, and so does a writer of this crate.
    #[error("{path:?} is in use by another process (it holds a lock on the file, as QEMU does while it uses an image)")]
    Locked {
        /// The file.
        path: std::path::PathBuf,
    },

    /// A write that reaches past the end of the guest disk.
    #[error("write of {len} bytes at guest offset {offset:#x} reaches past the end of the disk ({size} bytes)")]
    WritePastEnd {
        /// Guest offset of the write.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The guest size.
        size: u64,
    },

    /// An image this crate reads but does not write yet (the reason names what).
    #[error("writing is not supported for this image: {what}")]
    UnsupportedWrite {
        /// What the image has that the writer does not handle.
        what: String,
    },

    /// A bug in this crate: an internal invariant did not hold. Please report it.
    #[error("internal error in the qcow2 crate: {0}")]
    Internal(&'static str),

    /// An option of a new image or of a conversion that QEMU refuses (a cluster size that is
    /// not a power of two, `refcount_bits=3`, no size and no backing file...), refused before
    /// any file is written. The message is qemu-img's.
    #[error("{message}")]
    InvalidOption {
        /// The option, as `qemu-img create -o` names it (`cluster_size`), or the command
        /// line flag (`-B`).
        option: String,
        /// What is wrong, in qemu-img's words.
        message: String,
    },

    /// The underlying source failed.
    #[error("I/O error while {context}")]
    Io {
        /// What was being read.
        context: String,
        /// The error from the source.
        #[source]
        source: io::Error,
    },

    /// No persistent dirty bitmap has the name asked for.
    #[error("no bitmap named {name:?}")]
    NoSuchBitmap {
        /// The name asked for.
        name: String,
    },

    /// The bitmap has the in-use flag: it was not saved cleanly, so its bits may miss writes.
    /// QEMU refuses to use such a bitmap (it calls it inconsistent).
    #[error("bitmap {name:?} is in use (inconsistent: not saved cleanly); its contents are not reliable")]
    BitmapInUse {
        /// The bitmap's name.
        name: String,
    },

    /// The secret opens none of the LUKS key slots.
    #[error("the secret opens none of the {slots_tried} active LUKS key slots (wrong secret)")]
    WrongSecret {
        /// How many active key slots were tried.
        slots_tried: u32,
    },

    /// The secret of an encrypted image is not valid UTF-8 (a NUL byte counts as invalid):
    /// QEMU refuses such a secret as a passphrase ("Data from secret ... is not valid UTF-8"),
    /// and so does this crate, when it would unlock the image with it.
    #[error("data from the secret is not valid UTF-8")]
    SecretNotUtf8,

    /// The image is encrypted with an algorithm (or combination) this crate does not decrypt.
    #[error("unsupported encryption: {what}")]
    UnsupportedEncryption {
        /// The algorithm, named as the image names it.
        what: String,
    },

    /// A [parallel read](crate::Reader::read_parallel) could not read the guest from this
    /// offset on (everything before it went to the sink).
    #[error("reading the guest at offset {guest_offset:#x} failed")]
    ReadFailed {
        /// Where the chunk (or the part of the map) that failed starts.
        guest_offset: u64,
        /// Why.
        #[source]
        source: Box<Error>,
    },

    /// The sink of a [parallel read](crate::Reader::read_parallel) refused the chunk at this
    /// guest offset; the read stopped there.
    #[error("the sink failed on the chunk at guest offset {guest_offset:#x}")]
    SinkFailed {
        /// Where the chunk starts.
        guest_offset: u64,
        /// The sink's error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Build a [`Error::Malformed`].
    pub(crate) fn malformed(what: impl Into<String>, offset: u64) -> Self {
        Error::Malformed {
            what: what.into(),
            offset,
        }
    }

    /// Wrap an I/O error with what was being done, for callers that mix their own I/O with
    /// the crate's.
    ///
    /// ```
    /// fn read_config(path: &str) -> qcow2::Result<Vec<u8>> {
    ///     std::fs::read(path).map_err(|e| qcow2::Error::from_io(format!("reading {path}"), e))
    /// }
    /// let err = read_config("/no/such/config").unwrap_err();
    /// assert_eq!(err.to_string(), "I/O error while reading /no/such/config");
    /// assert_eq!(err.io_kind(), std::io::ErrorKind::NotFound);
    /// ```
    pub fn from_io(context: impl Into<String>, source: io::Error) -> Self {
        Self::io(context, source)
    }

    /// Build an [`Error::Io`] with what was being read.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the file is not a qcow2 image at all: its first four bytes are not the magic
    /// ([`Error::NotQcow2`]) or it is too short to hold them ([`Error::TooShort`] under 4
    /// bytes). `qemu-img` probes such a file as raw; a file with the magic that fails to open
    /// is a broken qcow2 image, not this.
    ///
    /// ```
    /// let err = qcow2::Qcow2::open(vec![0u8; 3]).unwrap_err();
    /// assert_eq!(err.to_string(), "the file is too short to be a qcow2 image (3 bytes)");
    /// assert!(err.is_not_qcow2());
    /// ```
    pub fn is_not_qcow2(&self) -> bool {
        match self {
            Error::NotQcow2 { .. } => true,
            Error::TooShort { len } => *len < 4,
            _ => false,
        }
    }

    /// The [`io::ErrorKind`] this error maps to in [`std::io::Error`].
    ///
    /// ```
    /// use qcow2::GuestDisk;
    ///
    /// let image = qcow2::Qcow2::open_path("fixtures/luks.qcow2")?; // without its secret
    /// let err = image.reader()?.read_disk(0, &mut [0u8; 512]).unwrap_err();
    /// assert!(matches!(err, qcow2::Error::Encrypted { .. }));
    /// assert_eq!(err.io_kind(), std::io::ErrorKind::Unsupported);
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::Io { source, .. } => source.kind(),
            Error::ReadFailed { source, .. } => source.io_kind(),
            Error::SinkFailed { source, .. } => source.kind(),
            Error::UnsupportedVersion { .. }
            | Error::UnsupportedFeature { .. }
            | Error::Encrypted { .. }
            | Error::FeatureDisabled { .. }
            | Error::UnsupportedBackingFormat { .. }
            | Error::UnsupportedEncryption { .. }
            | Error::UnsupportedWrite { .. } => io::ErrorKind::Unsupported,
            Error::ReadOnly => io::ErrorKind::PermissionDenied,
            Error::Locked { .. } => io::ErrorKind::ResourceBusy,
            Error::WritePastEnd { .. } => io::ErrorKind::InvalidInput,
            Error::WrongSecret { .. } => io::ErrorKind::PermissionDenied,
            Error::SecretNotUtf8 => io::ErrorKind::InvalidInput,
            Error::BackingMissing { .. } | Error::DataFileMissing { .. } => io::ErrorKind::NotFound,
            Error::FileRefused { .. } => io::ErrorKind::PermissionDenied,
            Error::OutputIsSource | Error::InvalidOption { .. } => io::ErrorKind::InvalidInput,
            Error::Internal(_) => io::ErrorKind::Other,
            Error::NoSuchSnapshot(_) => io::ErrorKind::NotFound,
            Error::NoSuchBitmap { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::InvalidData,
        }
    }
}

/// "bit 9 (name), bit 12 (unknown)".
fn describe_features(all: &[FeatureName]) -> String {
    let parts: Vec<String> = all
        .iter()
        .map(|f| format!("bit {} ({})", f.bit, f.name))
        .collect();
    parts.join(", ")
}

impl From<Error> for io::Error {
    // Out of line: inlined into every read's return path, the boxing cost the hot path.
    #[cold]
    #[inline(never)]
    fn from(e: Error) -> Self {
        // The kind carries the class; the payload keeps the context for people.
        io::Error::new(e.io_kind(), e)
    }
}
