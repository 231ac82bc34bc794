//! How an image is opened: limits, and which other files may be opened on its behalf.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::base::limits::Limits;
use crate::crypt::{KdfBudget, Secret, SecretCallback, SecretFn};

/// What a file named by an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileRole {
    /// A backing image (qcow2 or raw).
    Backing,
    /// An external data file.
    DataFile,
}

impl FileRole {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            FileRole::Backing => "backing file",
            FileRole::DataFile => "external data file",
        }
    }
}

/// The signature of a [`FilePolicy::Callback`].
pub type OpenFileFn = dyn Fn(&Path, FileRole) -> io::Result<File> + Send + Sync;

/// Which files [`Qcow2::open_path`](crate::Qcow2::open_path) may open besides the image itself.
///
/// ```
/// use qcow2::{FilePolicy, OpenOptions, Qcow2};
///
/// // Only files in the image's own directory (a bare file name's parent, "", is the current
/// // directory).
/// let path = std::path::Path::new("fixtures/chain-top.qcow2");
/// let dir = path.parent().unwrap_or(std::path::Path::new("")).to_path_buf();
/// let image = Qcow2::open_path_with(path, &OpenOptions::new().files(FilePolicy::Under(dir)))?;
/// assert!(image.has_backing_attached());
///
/// // Or decide file by file.
/// let policy = FilePolicy::Callback(std::sync::Arc::new(|path: &std::path::Path, _role| {
///     std::fs::File::open(path)
/// }));
/// let image = Qcow2::open_path_with(path, &OpenOptions::new().files(policy))?;
/// assert!(image.has_backing_attached());
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum FilePolicy {
    /// Open every backing file and data file the chain names, as `qemu-img` does.
    #[default]
    Any,
    /// Open no other file: an image that names one is refused.
    Nothing,
    /// Open only files that resolve under this directory: the name is resolved as QEMU would
    /// open it (every symlink and `..` followed) and must lie under the directory resolved
    /// the same way, whatever route leads there (`../d/x`, an absolute symlink into the
    /// directory); a name that resolves outside is refused ([`Error::FileRefused`]). On Linux
    /// the resolved name is then opened beneath a descriptor of the directory with
    /// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a symlink or rename swapped in
    /// meanwhile cannot make it open a file outside (elsewhere the file opened is checked to
    /// be the one resolved). An empty path means the current directory, so that
    /// `Path::parent` of a bare file name (`Some("")`) can be passed as it is.
    ///
    /// [`Error::FileRefused`]: crate::Error::FileRefused
    Under(PathBuf),
    /// Let the callback open each file, or refuse it by returning an error
    /// (`PermissionDenied` is reported as a refusal).
    Callback(Arc<OpenFileFn>),
}

impl fmt::Debug for FilePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilePolicy::Any => f.write_str("Any"),
            FilePolicy::Nothing => f.write_str("Nothing"),
            FilePolicy::Under(dir) => f.debug_tuple("Under").field(dir).finish(),
            FilePolicy::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

/// Options for opening an image.
///
/// ```
/// use qcow2::{FilePolicy, OpenOptions, Qcow2};
///
/// // Follow backing files, but only inside the fixtures directory.
/// let options = OpenOptions::new().files(FilePolicy::Under("fixtures".into()));
/// let image = Qcow2::open_path_with("fixtures/chain-top.qcow2", &options)?;
/// assert!(image.has_backing_attached());
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Bounds on what the image may make the reader allocate.
    pub(crate) limits: Limits,
    /// Which other files may be opened ([`Qcow2::open_path`](crate::Qcow2::open_path) only:
    /// [`Qcow2::open_with`](crate::Qcow2::open_with) never opens a file).
    pub(crate) files: FilePolicy,
    /// Read clusters the image does not hold as zeros instead of reading its backing file
    /// (no backing file is opened; [`Qcow2::open_with`](crate::Qcow2::open_with) attaches the
    /// zeros itself).
    pub(crate) backing_as_zeros: bool,
    /// Most threads one read may use to decompress compressed clusters, to decrypt the
    /// data of an encrypted image, or to read the layers below an overlay in a large read
    /// (the calling thread included); `None` means one per core, up to 8. `Some(1)` never
    /// starts a thread. It is also the size of the image's worker pool (shared by its backing
    /// chain, started on first use), on which
    /// [`Reader::read_parallel`](crate::Reader::read_parallel) reads.
    pub(crate) threads: Option<usize>,
    /// Let [`Qcow2::open_path`](crate::Qcow2::open_path) open block devices (as the image or
    /// a file it names); off by default. FIFOs, sockets, directories and character devices
    /// are always refused.
    pub(crate) allow_devices: bool,
    /// The secret of encrypted images: every encrypted image of a chain is unlocked with it,
    /// unless [`OpenOptions::secret_for`] gives one for that file.
    pub(crate) secret: Option<Secret>,
    /// Per-file secrets for chains whose images have different ones
    /// ([`Qcow2::open_path_with`](crate::Qcow2::open_path_with) only).
    pub(crate) secret_callback: Option<SecretCallback>,
    /// The PBKDF2 budget of the open under way, shared by the images of its chain; `None` in
    /// the options a caller holds (each open then starts with a fresh budget).
    pub(crate) kdf_budget: Option<KdfBudget>,
    /// Open the image (not its backing files) for writing: [`Qcow2::into_writer`](crate::Qcow2::into_writer)
    /// then hands out a [`Writer`](crate::Writer).
    pub(crate) write: bool,
}

impl OpenOptions {
    /// Default options: QEMU's limits, and backing files followed as `qemu-img` does.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Open the image for writing (off by default). [`Qcow2::open_path_with`](crate::Qcow2::open_path_with)
    /// then opens the image file for reading and writing (its backing files and data file stay
    /// read-only, as QEMU opens them), and [`Qcow2::into_writer`](crate::Qcow2::into_writer) turns
    /// the image into a [`Writer`](crate::Writer).
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("qcow2-doc-write-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let path = dir.join("disk.qcow2");
    /// qcow2::create(&path, &qcow2::CreateOptions::new(1 << 30))?;
    /// let options = qcow2::OpenOptions::new().write(true);
    /// let image = qcow2::Qcow2::open_path_with(&path, &options)?;
    /// # let _ = image;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn write(mut self, yes: bool) -> Self {
        self.write = yes;
        self
    }

    /// Set the limits.
    ///
    /// ```
    /// let mut limits = qcow2::Limits::default();
    /// limits.l2_cache_bytes = 1 << 20; // at most 1 MiB of L2 tables in memory
    /// let options = qcow2::OpenOptions::new().limits(limits);
    /// let image = qcow2::Qcow2::open_path_with("fixtures/v3-64k-basic.qcow2", &options)?;
    /// assert_eq!(image.limits().l2_cache_bytes, 1 << 20);
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Set which other files may be opened.
    ///
    /// ```
    /// use qcow2::{Error, FilePolicy, OpenOptions, Qcow2};
    ///
    /// let options = OpenOptions::new().files(FilePolicy::Nothing);
    /// let err = Qcow2::open_path_with("fixtures/chain-top.qcow2", &options).unwrap_err();
    /// assert!(matches!(err, Error::FileRefused { .. }));
    /// ```
    #[must_use]
    pub fn files(mut self, policy: FilePolicy) -> Self {
        self.files = policy;
        self
    }

    /// Read unallocated clusters as zeros and open no backing file.
    ///
    /// ```
    /// // The overlay alone: what its backing files would supply reads as zeros.
    /// let options = qcow2::OpenOptions::new().backing_as_zeros(true);
    /// let image = qcow2::Qcow2::open_path_with("fixtures/chain-top.qcow2", &options)?;
    /// assert!(image.has_backing_attached());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    #[must_use]
    pub fn backing_as_zeros(mut self, yes: bool) -> Self {
        self.backing_as_zeros = yes;
        self
    }

    /// Allow block devices as the image, its backing files or its data file.
    #[must_use]
    pub fn allow_devices(mut self, yes: bool) -> Self {
        self.allow_devices = yes;
        self
    }

    /// Unlock encrypted images with this secret (a passphrase, as given to `qemu-img` with
    /// `--object secret,id=ID,data=...`).
    ///
    /// ```
    /// use positioned_io::ReadAt;
    ///
    /// # #[cfg(feature = "encryption")] {
    /// let options = qcow2::OpenOptions::new().secret("abc");
    /// let image = qcow2::Qcow2::open_path_with("fixtures/luks.qcow2", &options)?;
    /// let mut buf = [0u8; 512];
    /// image.reader()?.read_exact_at(0, &mut buf)?;
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// **Debug builds.** Unlocking a LUKS image runs PBKDF2 over its key slots for as many
    /// iterations as the image asks, and `qemu-img create -o encrypt.format=luks` with its
    /// default settings asks for 2 seconds' worth of the machine that made it (8.6 million
    /// iterations of HMAC-SHA256 on a 2-core test machine, where `qemu-img` opens the image
    /// in about 2 s). Unoptimized, that takes minutes: 347 s there in a dependent crate's
    /// debug build. The loop is this crate's (generic code, compiled here) and the hash
    /// function's, so in the `Cargo.toml` of a crate that opens real LUKS images in its debug
    /// builds:
    ///
    /// ```toml
    /// [profile.dev.package.qcow2]
    /// opt-level = 3
    /// [profile.dev.package.sha2] # and sha1 for images that hash with SHA-1
    /// opt-level = 3
    /// ```
    ///
    /// which brings that open to 4 s (with `qcow2` alone optimized it still took 347 s).
    #[must_use]
    pub fn secret(mut self, secret: impl Into<Secret>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Ask `f` for the secret of each image a chain opens (by its path as opened); where it
    /// answers `None`, [`OpenOptions::secret`] applies.
    ///
    /// ```
    /// use qcow2::{OpenOptions, Qcow2, Secret};
    ///
    /// // Every image of the chain with its own secret, by file name.
    /// let options = OpenOptions::new().secret_for(|path| {
    ///     (path.file_name()? == "luks.qcow2").then(|| Secret::new("abc"))
    /// });
    /// let image = Qcow2::open_path_with("fixtures/luks.qcow2", &options)?;
    /// # #[cfg(feature = "encryption")] // unlocked only where the crate decrypts
    /// assert!(image.is_unlocked());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    #[must_use]
    pub fn secret_for(
        mut self,
        f: impl Fn(&Path) -> Option<Secret> + Send + Sync + 'static,
    ) -> Self {
        let f: Arc<SecretFn> = Arc::new(f);
        self.secret_callback = Some(SecretCallback(f));
        self
    }

    /// These options for one open of a whole chain: its images share one PBKDF2 budget of
    /// [`Limits::max_kdf_blocks`].
    pub(crate) fn for_one_open(&self) -> OpenOptions {
        OpenOptions {
            kdf_budget: Some(KdfBudget::new(self.limits.max_kdf_blocks)),
            ..self.clone()
        }
    }

    /// The PBKDF2 budget an image opened with these options draws on: the open's, or (for an
    /// image opened on its own) a fresh one.
    pub(crate) fn kdf_budget(&self) -> KdfBudget {
        self.kdf_budget
            .clone()
            .unwrap_or_else(|| KdfBudget::new(self.limits.max_kdf_blocks))
    }

    /// The secret for the image at `path`: the callback's answer, else the common secret.
    pub(crate) fn secret_for_path(&self, path: &Path) -> Option<Secret> {
        self.secret_callback
            .as_ref()
            .and_then(|f| (f.0)(path))
            .or_else(|| self.secret.clone())
    }

    /// The old name of [`OpenOptions::threads`], which it calls.
    #[deprecated(since = "0.3.0", note = "use `OpenOptions::threads`: the same setting")]
    #[must_use]
    pub fn decompression_threads(self, threads: usize) -> Self {
        self.threads(threads)
    }

    /// The image's threads (1 to 64; default one per core, up to 8): the size of its
    /// worker pool, which starts on first use and is shared by its backing chain, and the
    /// most threads one read decompresses, decrypts or reads backing layers on (the calling
    /// thread included). 1 never starts a thread.
    ///
    /// The crate's other `threads` settings are parts of a job, not pools:
    /// [`ParallelReadOptions::threads`](crate::ParallelReadOptions::threads) is how many of
    /// these pool threads one parallel read uses, and
    /// [`ConvertOptions::threads`](crate::ConvertOptions::threads) how many threads a
    /// conversion reads on (threads of its own).
    ///
    /// ```
    /// let options = qcow2::OpenOptions::new().threads(2);
    /// let image = qcow2::Qcow2::open_path_with("fixtures/v3-64k-basic.qcow2", &options)?;
    /// let mut out = Vec::new();
    /// image.reader()?.read_parallel_to_writer(.., &qcow2::ParallelReadOptions::new(), &mut out)?;
    /// assert_eq!(out.len() as u64, image.guest_size());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    #[must_use]
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads.max(1));
        self
    }
}
