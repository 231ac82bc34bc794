//! The guest disk as `qemu-img convert` sees it: data clusters that lie in holes of the
//! image file count as zeros.

use std::fs::File;

use positioned_io::ReadAt;

use crate::base::holes::run_at;
use crate::error::Result;
use crate::format::table::ExtentKind;
use crate::guest::disk::{Allocation, GuestDisk};
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::holes::{HoleQuery, Region};
    use crate::image::qcow2::Qcow2;

    /// A file that is one hole, as long as the image file.
    struct AllHole(u64);

    impl HoleQuery for AllHole {
        fn region_at(&self, _pos: u64) -> Option<Region> {
            Some(Region::Hole { next_data: None })
        }
        fn file_len(&self) -> Option<u64> {
            Some(self.0)
        }
    }

    /// The first guest offset the reader says is data.
    fn first_data(disk: &dyn GuestDisk) -> Option<u64> {
        let mut pos = 0;
        while let Some((allocation, len)) = disk.allocation_at(pos).unwrap() {
            if allocation == Allocation::Data {
                return Some(pos);
            }
            pos += len;
        }
        None
    }

    #[test]
    fn data_in_holes_of_the_image_file_reads_as_zeros() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/v3-64k-basic.qcow2");
        let bytes = std::fs::read(path).unwrap();
        let len = bytes.len() as u64;
        // Without a hole query: the reader itself.
        let plain = Qcow2::open(bytes.clone()).unwrap();
        let reader = plain.reader().unwrap();
        let data = first_data(&reader).expect("the fixture has data");
        let aware = HoleAwareReader::new(&reader);
        assert_eq!(
            aware.allocation_at(data).unwrap(),
            reader.allocation_at(data).unwrap()
        );
        // Every data cluster in a hole of the file: zeros, as long as the reader's stretch.
        let mut holed = Qcow2::open(bytes).unwrap();
        holed.set_hole_query(AllHole(len));
        let reader = holed.reader().unwrap();
        let Some((Allocation::Data, n)) = reader.allocation_at(data).unwrap() else {
            panic!("the reader alone looks at no holes here");
        };
        let aware = HoleAwareReader::new(&reader);
        assert_eq!(
            aware.allocation_at(data).unwrap(),
            Some((Allocation::Zero, n))
        );
        assert_eq!(first_data(&aware), None);
    }
}
