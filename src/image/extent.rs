//! Where guest data is stored in one image: [`Reader::extent_at`], like `qemu-img map` of
//! one layer.

use positioned_io::ReadAt;

use crate::error::Result;
use crate::format::table::{Extent, ExtentKind};
use crate::image::plan::Planner;
use crate::image::reader::Reader;

/// Most extents one [`Reader::extent_at`] call joins, so that every call is bounded whatever
/// the image holds; the extent returned is then cut short there.
const MAX_SEGMENTS_PER_CALL: u32 = 1 << 12;

impl<'a, I: ReadAt> Reader<'a, I> {
    /// The longest extent stored one way that starts at guest offset `pos`, or `None` at or
    /// past the end of the guest. Walk the whole disk by calling it again at the end of each
    /// extent:
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
    /// let reader = image.reader()?;
    /// let mut pos = 0;
    /// while let Some(extent) = reader.extent_at(pos)? {
    ///     println!("{:>10} {:>8} {:?}", extent.start, extent.length, extent.kind);
    ///     pos += extent.length;
    /// }
    /// assert_eq!(pos, image.guest_size());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    ///
    /// The map is this image's own, like `qemu-img map` of one layer: a backing image's
    /// clusters show as [`ExtentKind::Unallocated`]. [`Reader::map`] maps the whole chain.
    /// An extent's host offsets follow on without a jump; a compressed extent is (part of)
    /// one cluster.
    pub fn extent_at(&self, pos: u64) -> Result<Option<Extent>> {
        self.extent_in(pos..u64::MAX)
    }

    /// Like [`extent_at`](Self::extent_at) at `range.start`, but the extent ends at
    /// `range.end` at the latest: a lookup of one guest range costs what that range holds, not
    /// what the extent around it does (on a fully allocated image, [`extent_at`](Self::extent_at)
    /// looks at every cluster up to the end of the file's contiguous run). `None` when the
    /// range is empty or starts at or past the end of the guest.
    ///
    /// ```
    /// use qcow2::ExtentKind;
    ///
    /// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
    /// let reader = image.reader()?;
    /// // Where the 4 KiB at guest offset 64 KiB are stored.
    /// let extent = reader.extent_in(65536..65536 + 4096)?.expect("inside the guest");
    /// assert_eq!(extent.start, 65536);
    /// assert!(extent.length <= 4096);
    /// if let ExtentKind::Data { host_offset } = extent.kind {
    ///     println!("{} bytes at file offset {host_offset}", extent.length);
    /// }
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn extent_in(&self, range: std::ops::Range<u64>) -> Result<Option<Extent>> {
        let pos = range.start;
        let size = self.guest_size().min(range.end);
        if pos >= size {
            return Ok(None);
        }
        let mut planner = Planner::new(self.tables());
        let mut kind: Option<ExtentKind> = None;
        let mut end = pos;
        for _ in 0..MAX_SEGMENTS_PER_CALL {
            if end >= size {
                break;
            }
            let extent = planner.extent(end, size)?;
            match kind {
                None => kind = Some(extent.kind),
                Some(k) if k.continued_by(extent.kind, end.saturating_sub(pos)) => {}
                Some(_) => break,
            }
            end = end.saturating_add(extent.length);
        }
        Ok(kind.map(|kind| Extent {
            start: pos,
            length: end.saturating_sub(pos),
            kind,
        }))
    }
}
