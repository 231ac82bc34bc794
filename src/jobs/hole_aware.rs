//! The guest disk as `qemu-img convert` sees it: data clusters that lie in holes of the
//! image file count as zeros.

use std::fs::File;

use positioned_io::ReadAt;

use crate::base::holes::run_at;
use crate::error::Result;
use crate::guest::disk::{Allocation, GuestDisk};
use crate::image::extent::ExtentKind;
use crate::image::reader::Reader;

/// A [`Reader`] whose data clusters lying in holes of the image file count as zeros, as
/// `qemu-img convert` sees them: its block status looks into the file under the image, so a
/// conversion skips such clusters whatever [`ConvertOptions::sparse_size`] says.
///
/// Only the image's own clusters are looked at (backing images are read as they are), and
/// only when guest data lies in the image file (not in an external data file) and the image
/// knows its file's holes ([`Qcow2::open_path`] attaches a [`HoleQuery`] for the image file;
/// after [`Qcow2::open`], [`Qcow2::set_hole_query`]). Otherwise it is the reader itself.
///
/// ```
/// use qcow2::{ConvertOptions, GuestDisk, HoleAwareReader, Qcow2};
///
/// let image = Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
/// let reader = image.reader()?;
/// let disk = HoleAwareReader::new(&reader);
/// assert_eq!(disk.disk_size(), image.guest_size());
/// let mut out = Vec::new();
/// qcow2::convert_to_writer(&disk, &mut out, &ConvertOptions::new(), |_, _| {})?;
/// assert_eq!(out.len() as u64, image.guest_size());
/// # Ok::<(), qcow2::Error>(())
/// ```
///
/// [`ConvertOptions::sparse_size`]: crate::ConvertOptions::sparse_size
/// [`Qcow2::open_path`]: crate::Qcow2::open_path
/// [`Qcow2::open`]: crate::Qcow2::open
/// [`Qcow2::set_hole_query`]: crate::Qcow2::set_hole_query
/// [`HoleQuery`]: crate::HoleQuery
#[derive(Debug, Clone, Copy)]
pub struct HoleAwareReader<'r, I> {
    reader: &'r Reader<'r, I>,
}

impl<'r, I: ReadAt> HoleAwareReader<'r, I> {
    /// `reader`, its data clusters in holes of the image file counted as zeros.
    pub fn new(reader: &'r Reader<'r, I>) -> Self {
        HoleAwareReader { reader }
    }

    /// The reader it looks through.
    pub fn reader(&self) -> &'r Reader<'r, I> {
        self.reader
    }
}

impl<I: ReadAt> GuestDisk for HoleAwareReader<'_, I> {
    fn disk_size(&self) -> u64 {
        self.reader.disk_size()
    }

    fn read_disk(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.reader.read_disk(pos, buf)
    }

    fn reads_file(&self, file: &File) -> Result<bool> {
        self.reader.reads_file(file)
    }

    fn allocation_at(&self, pos: u64) -> Result<Option<(Allocation, u64)>> {
        let found = self.reader.allocation_at(pos)?;
        let image = self.reader.image();
        // Guest data in an external data file: the image file's holes say nothing of it.
        let holes = match image.holes.as_deref() {
            Some(holes) if image.header().data_file().is_none() => holes,
            _ => return Ok(found),
        };
        let Some((Allocation::Data, len)) = found else {
            return Ok(found);
        };
        let host = match self.reader.extent_in(pos..pos.saturating_add(len))? {
            Some(e) => match e.kind {
                ExtentKind::Data { host_offset } => host_offset,
                _ => return Ok(found),
            },
            None => return Ok(found),
        };
        Ok(Some(match run_at(holes, host) {
            Some((true, n)) => (Allocation::Zero, len.min(n)),
            Some((false, n)) => (Allocation::Data, len.min(n)),
            None => (Allocation::Data, len),
        }))
    }
}
