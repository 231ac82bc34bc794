//! [`OwnedReader`]: a reader that owns (a share of) its image.

use std::io::{self, Read, Seek, SeekFrom};
use std::mem::ManuallyDrop;
use std::sync::Arc;

use positioned_io::{ReadAt, Size};

use crate::error::Result;
use crate::image::qcow2::Qcow2;
use crate::image::reader::{ReadState, Reader, View};

/// A reader that owns its image through an [`Arc`]: `'static`, so a function can return it
/// (as a `Box<dyn Read + Seek + Send>`, say), a struct can keep it, and a thread can take it.
///
/// Made by [`Qcow2::into_reader`] (the active disk) and [`Qcow2::into_snapshot_reader`] (an
/// internal snapshot), or from an image already shared, [`OwnedReader::new`] and
/// [`OwnedReader::snapshot`]. It reads exactly as a [`Reader`] does, at the same speed:
/// each read borrows a [`Reader`] of the image and of this handle's read state, which costs
/// nothing ([`OwnedReader::as_reader`] gives that reader, for the rest of its API: the
/// map, extents, parallel reads).
///
/// It is [`positioned_io::ReadAt`] and [`positioned_io::Size`], and also
/// [`std::io::Read`] + [`std::io::Seek`] from a position of its own, which `read_at`
/// neither uses nor moves (as a file's positioned reads do not). It is `Send + Sync` when
/// `I` is, and `'static` when `I` is. Cloning is cheap (two reference counts) and gives a
/// reader with the same position and a read state of its own: clone one for each thread.
///
/// ```
/// use std::io::{Read, Seek, SeekFrom};
///
/// fn open(path: &str) -> qcow2::Result<Box<dyn ReadSeek>> {
///     Ok(Box::new(qcow2::Qcow2::open_path(path)?.into_reader()?))
/// }
/// trait ReadSeek: Read + Seek + Send {}
/// impl<T: Read + Seek + Send> ReadSeek for T {}
///
/// let mut disk = open("fixtures/v3-64k-basic.qcow2")?;
/// assert_eq!(disk.seek(SeekFrom::End(0))?, 4 << 20);
/// disk.seek(SeekFrom::Start(0))?;
/// let thread = std::thread::spawn(move || {
///     let mut all = Vec::new();
///     disk.read_to_end(&mut all).map(|_| all)
/// });
/// let all = thread.join().unwrap()?;
/// assert_eq!(all.len(), 4 << 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct OwnedReader<I> {
    image: Arc<Qcow2<I>>,
    view: View,
    state: ReadState,
    /// Where [`Read::read`] reads next.
    pos: u64,
}

impl<I: ReadAt> OwnedReader<I> {
    /// A reader of the active disk of a shared image ([`Qcow2::reader`], owned).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use positioned_io::ReadAt;
    ///
    /// let image = Arc::new(qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?);
    /// let reader = qcow2::OwnedReader::new(Arc::clone(&image))?;
    /// let mut sector = [0u8; 512];
    /// reader.read_exact_at(0, &mut sector)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(image: Arc<Qcow2<I>>) -> Result<Self> {
        let view = image.reader()?.view();
        Ok(Self::with(image, view))
    }

    /// A reader of an internal snapshot of a shared image, found by id or else by name
    /// ([`Qcow2::snapshot_reader`], owned).
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// let image = Arc::new(qcow2::Qcow2::open_path("fixtures/snap.qcow2")?);
    /// let name = image.snapshots()[0].name.clone();
    /// let snapshot = qcow2::OwnedReader::snapshot(image, &name)?;
    /// assert!(snapshot.guest_size() > 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn snapshot(image: Arc<Qcow2<I>>, id_or_name: &str) -> Result<Self> {
        let view = image.snapshot_reader(id_or_name)?.view();
        Ok(Self::with(image, view))
    }

    fn with(image: Arc<Qcow2<I>>, view: View) -> Self {
        OwnedReader {
            image,
            view,
            state: ReadState::new(),
            pos: 0,
        }
    }

    /// A [`Reader`] of the same disk that shares this handle's read state (where the last
    /// read ended, the L2 slices it used last), for the rest of the reader's API. Costs
    /// nothing: make one whenever needed.
    ///
    /// ```
    /// let disk = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?.into_reader()?;
    /// let extents: Vec<_> = disk.as_reader().map(..).collect::<qcow2::Result<_>>()?;
    /// assert!(!extents.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    #[inline]
    pub fn as_reader(&self) -> Reader<'_, I> {
        Reader::borrowed(&self.image, &self.view, &self.state)
    }
}

impl<I: ReadAt> OwnedReader<I> {
    /// [`OwnedReader::as_reader`] for one call, never dropped: it owns nothing (it borrows
    /// its L1 table and read state), and its drop glue, which the compiler cannot see is
    /// empty (the read state has interior mutability), cost a 4 KiB read 13 instructions
    /// of about 490 (measured with callgrind).
    #[inline]
    pub(crate) fn borrowed(&self) -> ManuallyDrop<Reader<'_, I>> {
        ManuallyDrop::new(self.as_reader())
    }
}

impl<I> OwnedReader<I> {
    /// Guest size in bytes (a snapshot reader's is the snapshot's disk size).
    #[must_use]
    pub fn guest_size(&self) -> u64 {
        self.view.size
    }

    /// The image this reader reads.
    #[must_use]
    pub fn image(&self) -> &Arc<Qcow2<I>> {
        &self.image
    }

    /// The image back, shared with the other readers made from it, if any
    /// ([`Arc::try_unwrap`] gives it alone once they are gone).
    ///
    /// ```
    /// let disk = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?.into_reader()?;
    /// let image = std::sync::Arc::try_unwrap(disk.into_image()).expect("no other reader");
    /// assert_eq!(image.cluster_size(), 65536);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn into_image(self) -> Arc<Qcow2<I>> {
        self.image
    }

    /// Where [`Read::read`] reads next.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl<I> Clone for OwnedReader<I> {
    /// The same disk at the same position, with a read state of its own.
    fn clone(&self) -> Self {
        OwnedReader {
            image: Arc::clone(&self.image),
            view: View {
                l1: Arc::clone(&self.view.l1),
                ..self.view
            },
            state: ReadState::new(),
            pos: self.pos,
        }
    }
}

impl<I> std::fmt::Debug for OwnedReader<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedReader")
            .field("image", &self.image)
            .field("l1_offset", &self.view.l1_offset)
            .field("guest_size", &self.view.size)
            .field("position", &self.pos)
            .finish_non_exhaustive()
    }
}

impl<I: ReadAt> ReadAt for OwnedReader<I> {
    #[inline]
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.borrowed().read_at(pos, buf)
    }
}

impl<I> Size for OwnedReader<I> {
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.view.size))
    }
}

impl<I: ReadAt> Read for OwnedReader<I> {
    /// Reads from [`OwnedReader::position`] and moves it past the bytes read: 0 at or past
    /// the end of the guest.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let got = self.read_at(self.pos, buf)?;
        // Never past the guest size, which is below 2^63.
        self.pos = self.pos.saturating_add(got as u64);
        Ok(got)
    }
}

impl<I> Seek for OwnedReader<I> {
    /// Seeking past the end is allowed (reads there return 0 bytes); before the start, or
    /// past `u64::MAX`, is an [`io::ErrorKind::InvalidInput`] error.
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.view.size.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = pos.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )
        })?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.pos)
    }
}

impl<I: ReadAt> Qcow2<I> {
    /// A reader of the active disk that owns the image: [`Qcow2::reader`] for a reader to
    /// return from a function, keep in a struct or move to a thread. See [`OwnedReader`].
    ///
    /// ```
    /// use std::io::Read;
    ///
    /// let image = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
    /// let mut disk = image.into_reader()?;
    /// let mut sector = [0u8; 512];
    /// disk.read_exact(&mut sector)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_reader(self) -> Result<OwnedReader<I>> {
        OwnedReader::new(Arc::new(self))
    }

    /// A reader of an internal snapshot, found by id or else by name, that owns the image:
    /// [`Qcow2::snapshot_reader`], owned. See [`OwnedReader`].
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/snap.qcow2")?;
    /// let id = image.snapshots()[0].id.clone();
    /// let snapshot = image.into_snapshot_reader(&id)?;
    /// assert!(snapshot.guest_size() > 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_snapshot_reader(self, id_or_name: &str) -> Result<OwnedReader<I>> {
        OwnedReader::snapshot(Arc::new(self), id_or_name)
    }
}
