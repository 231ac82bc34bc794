//! Reading from the image source with bounded allocation and clear errors; the sinks copies
//! write to ([`PositionalSink`], streams) and the zeros written to them.

use positioned_io::ReadAt;
use std::io::{self, Write};

use crate::error::{Error, Result};

/// Largest single allocation made ahead of data actually read.
const CHUNK: usize = 1 << 20;

/// Read into `buf` from `pos` until it is full or the source ends; returns bytes read.
pub(crate) fn read_up_to<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        let Some(at) = pos.checked_add(done as u64) else {
            break;
        };
        match src.read_at(at, rest) {
            Ok(0) => break,
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Read exactly `len` bytes of metadata at `pos`. The buffer grows as data arrives, so a
/// table that claims more than the file holds fails before it is allocated in full.
pub(crate) fn read_metadata<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    len: u64,
    what: &'static str,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    read_metadata_into(src, pos, len, what, &mut out)?;
    Ok(out)
}

/// [`read_metadata`] into `out` (replacing what it held), reusing its memory.
pub(crate) fn read_metadata_into<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    len: u64,
    what: &'static str,
    out: &mut Vec<u8>,
) -> Result<()> {
    let total =
        usize::try_from(len).map_err(|_| Error::malformed(format!("{what} is too large"), pos))?;
    // The buffer grows a chunk at a time (a length the file may not back costs no more than
    // what was read), and what it held is overwritten, not zeroed first: a walk reuses it
    // for every table.
    out.truncate(total);
    let mut filled = 0usize;
    while filled < total {
        let step = total.saturating_sub(filled).min(CHUNK);
        let end = filled.saturating_add(step);
        if out.len() < end {
            out.resize(end, 0);
        }
        let at = pos
            .checked_add(filled as u64)
            .ok_or_else(|| Error::malformed(format!("{what} offset overflows"), pos))?;
        let chunk = out.get_mut(filled..end).unwrap_or_default();
        let got = read_up_to(src, at, chunk)
            .map_err(|e| Error::io(format!("reading {what} at {at:#x}"), e))?;
        if got < step {
            return Err(Error::PastEnd {
                what,
                offset: pos,
                len,
            });
        }
        filled = end;
    }
    Ok(())
}

/// Fail unless the source has a byte at `pos + len - 1`: a cheap check that a structure lies
/// within the file without reading all of it.
pub(crate) fn check_within<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    len: u64,
    what: &'static str,
) -> Result<()> {
    let Some(last) = len.checked_sub(1).and_then(|l| pos.checked_add(l)) else {
        return Ok(());
    };
    let mut byte = [0u8; 1];
    let got =
        read_up_to(src, last, &mut byte).map_err(|e| Error::io(format!("reading {what}"), e))?;
    if got == 0 {
        return Err(Error::PastEnd {
            what,
            offset: pos,
            len,
        });
    }
    Ok(())
}

/// Decode a big-endian table of `u64` entries, straight into shared storage.
pub(crate) fn be_u64_table(bytes: &[u8]) -> std::sync::Arc<[u64]> {
    be_u64_words(bytes).collect()
}

/// The big-endian `u64` entries of a table, in order (a partial last entry left out).
pub(crate) fn be_u64_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
}

/// Zeros written out from here: streams, and positional sinks asked to allocate every byte.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// `len` zeros as slices of [`ZEROS`], each with its offset from the first.
pub(crate) fn zero_pieces(len: u64) -> impl Iterator<Item = (u64, &'static [u8])> {
    let piece = ZEROS.len() as u64;
    (0..len.div_ceil(piece)).map(move |i| {
        let at = i.saturating_mul(piece);
        let n = len.saturating_sub(at).min(piece) as usize; // at most 64 KiB
        (at, ZEROS.get(..n).unwrap_or_default())
    })
}

/// Write `len` zeros to a stream.
pub(crate) fn write_zeros<W: Write + ?Sized>(out: &mut W, len: u64) -> io::Result<()> {
    zero_pieces(len).try_for_each(|(_, zeros)| out.write_all(zeros))
}

/// A sink written at positions, shared by the threads of a conversion: a file, or anything
/// that can be written at an offset and given a length.
///
/// A [`std::fs::File`] is one; a sink of your own needs only `write_all_at` and `set_len`:
///
/// ```
/// use std::sync::Mutex;
///
/// struct Memory(Mutex<Vec<u8>>);
///
/// impl qcow2::PositionalSink for Memory {
///     fn write_all_at(&self, pos: u64, buf: &[u8]) -> std::io::Result<()> {
///         let mut out = self.0.lock().unwrap();
///         let end = pos as usize + buf.len();
///         if out.len() < end {
///             out.resize(end, 0);
///         }
///         out[pos as usize..end].copy_from_slice(buf);
///         Ok(())
///     }
///     fn set_len(&self, len: u64) -> std::io::Result<()> {
///         self.0.lock().unwrap().resize(len as usize, 0);
///         Ok(())
///     }
/// }
///
/// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let sink = Memory(Mutex::new(Vec::new()));
/// qcow2::convert_to_file(&image.reader()?, &sink, &qcow2::ConvertOptions::new(), |_, _| {})?;
/// assert_eq!(sink.0.lock().unwrap().len() as u64, image.guest_size());
/// # Ok::<(), qcow2::Error>(())
/// ```
pub trait PositionalSink {
    /// Write all of `buf` at byte offset `pos`.
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> io::Result<()>;
    /// Set the length of the sink, extending it with zeros (holes) or cutting it short.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file the sink writes, when it is one: [`convert_to_file`](crate::convert_to_file)
    /// then makes sure it is not a file the disk reads before changing it. The default says
    /// none.
    fn as_file(&self) -> Option<&std::fs::File> {
        None
    }
}

impl PositionalSink for std::fs::File {
    #[cfg(unix)]
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, pos)
    }

    #[cfg(windows)]
    fn write_all_at(&self, pos: u64, mut buf: &[u8]) -> io::Result<()> {
        let mut pos = pos;
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_write(self, buf, pos) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = buf.get(n..).unwrap_or_default();
                    pos = pos.saturating_add(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }

    fn as_file(&self) -> Option<&std::fs::File> {
        Some(self)
    }
}

/// Storage an image can be written to: read and written at positions, given a length, and
/// made durable. A [`std::fs::File`] opened for reading and writing is one; a storage of your
/// own (memory, a network block device, a test double that loses writes) needs these four
/// operations besides [`ReadAt`]:
///
/// ```
/// use std::io;
/// use std::sync::Mutex;
/// use qcow2::positioned_io::ReadAt;
///
/// #[derive(Default)]
/// struct Memory(Mutex<Vec<u8>>);
///
/// impl ReadAt for Memory {
///     fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
///         let data = self.0.lock().unwrap();
///         let start = (pos as usize).min(data.len());
///         let n = buf.len().min(data.len() - start);
///         buf[..n].copy_from_slice(&data[start..start + n]);
///         Ok(n)
///     }
/// }
///
/// impl qcow2::PositionalSink for Memory {
///     fn write_all_at(&self, pos: u64, buf: &[u8]) -> io::Result<()> {
///         let mut data = self.0.lock().unwrap();
///         let end = pos as usize + buf.len();
///         if data.len() < end {
///             data.resize(end, 0);
///         }
///         data[pos as usize..end].copy_from_slice(buf);
///         Ok(())
///     }
///     fn set_len(&self, len: u64) -> io::Result<()> {
///         self.0.lock().unwrap().resize(len as usize, 0);
///         Ok(())
///     }
/// }
///
/// impl qcow2::Storage for Memory {
///     fn length(&self) -> io::Result<u64> {
///         Ok(self.0.lock().unwrap().len() as u64)
///     }
///     fn sync(&self) -> io::Result<()> {
///         Ok(()) // memory: every write is as durable as it gets
///     }
/// }
///
/// use qcow2::PositionalSink;
/// let storage = Memory::default();
/// storage.write_all_at(0, &std::fs::read("fixtures/v3-64k-basic.qcow2")?)?;
/// let options = qcow2::OpenOptions::new().write(true);
/// let disk = qcow2::Qcow2::open_with(storage, &options)?.into_writer()?;
/// disk.write_all_at(12345, b"in memory")?;
/// let mut back = [0u8; 9];
/// disk.read_exact_at(12345, &mut back)?;
/// assert_eq!(&back, b"in memory");
/// disk.close()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Storage: ReadAt + PositionalSink + Send + Sync {
    /// The length in bytes.
    fn length(&self) -> io::Result<u64>;
    /// Make every write that completed before this call durable: when it returns, a power
    /// cut loses none of them (`fdatasync` for a file). The writer's barrier between the
    /// writes that must reach the disk first and the writes that refer to them.
    fn sync(&self) -> io::Result<()>;
}

impl Storage for std::fs::File {
    fn length(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// One storage used through two owners (an image's data file, read by its readers and
/// written by its writer).
pub(crate) struct Shared<S>(pub(crate) std::sync::Arc<S>);

impl<S: Storage> ReadAt for Shared<S> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_at(pos, buf)
    }
}

impl<S: Storage> PositionalSink for Shared<S> {
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> io::Result<()> {
        self.0.write_all_at(pos, buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl<S: Storage> Storage for Shared<S> {
    fn length(&self) -> io::Result<u64> {
        self.0.length()
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
}
