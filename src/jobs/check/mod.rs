//! A read-only consistency check of a whole image, like `qemu-img check` (QEMU's
//! `qcow2_check_refcounts`): every reference to a host cluster is counted against the stored
//! refcounts, and table entries and COPIED flags are checked on the way.
//!
//! Memory stays bounded whatever the file size: references are counted for one window of
//! host clusters at a time (as many as [`CheckOptions::memory_budget`] allows, so a small file
//! is one window), with one pass over the metadata per window. L2 tables, snapshot L1 tables
//! and bitmap tables are streamed; the active L1 table and the refcount table are held.

mod compare;
mod counters;
mod repair;
mod report;
mod stored;
mod walk;

use std::ops::Range;

use positioned_io::{ReadAt, Size};

use crate::base::io::{be_u64_table, read_metadata};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::header::{self, TABLE_ENTRY_LEN};
use crate::format::refcount::RefcountLayout;
use crate::format::snapshot;
use crate::format::table::Geometry;
use crate::image::qcow2::Qcow2;

use counters::Counters;

pub use repair::{Repair, RepairReport, RepairStep};
pub use report::{CheckReport, Problem, ProblemClass, ProblemKind};

/// QEMU refuses to check files of more than `INT_MAX` clusters (`EFBIG`).
const MAX_FILE_CLUSTERS: u64 = i32::MAX as u64;

/// Options for [`Qcow2::check_with`].
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
/// // Count references with 1 MiB of counters at a time.
/// let options = qcow2::CheckOptions::new().memory_budget(1 << 20);
/// assert!(image.check_with(&options)?.is_clean());
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckOptions {
    memory_budget: u64,
    max_problems: usize,
}

impl CheckOptions {
    /// 32 MiB of counters, at most 100 000 problems kept.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of reference counters held at once (one counter per host cluster of a window,
    /// as wide as the image's refcounts; 32 MiB by default). Larger files take several passes
    /// over the metadata.
    #[must_use]
    pub fn memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Most problems kept in [`CheckReport::problems`] (100 000 by default); all are counted.
    #[must_use]
    pub fn max_problems(mut self, problems: usize) -> Self {
        self.max_problems = problems;
        self
    }
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            memory_budget: 32 << 20,
            max_problems: 100_000,
        }
    }
}

impl<I: ReadAt + Size> Qcow2<I> {
    /// Check the whole image read-only, as `qemu-img check` does, with default options.
    ///
    /// Inconsistencies are counted and listed in the [`CheckReport`]; an `Err` means the
    /// check could not complete (I/O error, unknown file length, a bitmap table QEMU would
    /// refuse, a file of more than 2^31 clusters), where `qemu-img check` exits with status 1.
    /// The bitmap directory was checked as QEMU checks it when the image was opened.
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
    /// let report = image.check()?;
    /// assert_eq!((report.corruptions, report.leaks), (0, 0));
    /// assert!(report.compressed_clusters > 0);
    /// for problem in &report.problems {
    ///     eprintln!("{problem} (at file offset {:#x})", problem.offset);
    /// }
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn check(&self) -> Result<CheckReport> {
        self.check_with(&CheckOptions::default())
    }

    /// [`Qcow2::check`] with options.
    ///
    /// ```
    /// // Keep at most 10 problems in the report (all are counted).
    /// let options = qcow2::CheckOptions::new().max_problems(10).memory_budget(1 << 20);
    /// let image = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
    /// let report = image.check_with(&options)?;
    /// assert!(report.problems.len() <= 10);
    /// print!("{}", report.summary());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn check_with(&self, options: &CheckOptions) -> Result<CheckReport> {
        // As `qemu-img check`: an encrypted image is checked only once it is unlocked.
        if let Some(crypt) = &self.crypt {
            crypt.check_unlocked()?;
        }
        Checker::new(self, options)?.run()
    }
}

/// Where a problem goes in QEMU's output order: the walk (by reference number; a problem of
/// the reference itself before those found after it), then the refcount comparison (by
/// cluster), then the COPIED flags (by position). The last part orders the clusters of one
/// reference, which may fall in different windows, or the problems found after one reference
/// (by their place in the walk, the same in every pass).
type SortKey = (u8, u64, u8, u64);
/// Within the walk: a problem of the reference numbered `seq` itself ...
const AT_REFERENCE: u8 = 0;
/// ... and one found after it, before the next reference.
const AFTER_REFERENCE: u8 = 1;
const PHASE_WALK: u8 = 1;
const PHASE_COMPARE: u8 = 2;
const PHASE_COPIED: u8 = 3;

/// The state of one check.
pub(crate) struct Checker<'a, I> {
    image: &'a Qcow2<I>,
    geometry: Geometry,
    layout: RefcountLayout,
    file_len: u64,
    /// Host clusters of the file, the last partial one included.
    file_clusters: u64,
    reftable: Vec<u64>,
    snapshots_size: u64,
    /// Clusters counted in the current pass.
    window: Range<u64>,
    counters: Counters,
    /// The first pass also records problems that belong to no cluster, and the statistics.
    first_pass: bool,
    /// References counted so far in this pass: the walk's position, the same in every pass.
    seq: u64,
    /// Places in this pass where a problem that belongs to no reference may be found.
    sites: u64,
    /// A reference reached the cluster just past the end of the file (QEMU then grows its
    /// table by that cluster, which is compared too).
    grown: bool,
    highest: u64,
    /// What a pass may spend walking, and what is left of it in this pass.
    budget: walk::WalkBudget,
    left: walk::BudgetLeft,
    l2_buf: Vec<u8>,
    report: CheckReport,
    found: Vec<(SortKey, Problem)>,
    max_problems: usize,
}

impl<'a, I: ReadAt + Size> Checker<'a, I> {
    fn new(image: &'a Qcow2<I>, options: &CheckOptions) -> Result<Self> {
        let header = image.header();
        let cluster_bits = header.cluster_bits();
        let file_len = image
            .io
            .size()
            .map_err(|e| Error::io("reading the file length", e))?
            .ok_or_else(|| {
                Error::io(
                    "reading the file length",
                    std::io::Error::other("the source has no known length"),
                )
            })?;
        let file_clusters = file_len.div_ceil(header.cluster_size());
        Limits::check_in(
            "clusters",
            "checked host clusters",
            file_clusters,
            MAX_FILE_CLUSTERS,
        )?;
        let layout = RefcountLayout {
            cluster_bits,
            order: header.refcount_order(),
        };
        let width = Counters::width(layout.order);
        // One more slot than the file has clusters: a reference may reach just past it.
        let slots = file_clusters.saturating_add(1);
        let window_len = options
            .memory_budget
            .checked_div(width)
            .unwrap_or(1)
            .clamp(1, slots);
        let mut report = CheckReport::new(
            image
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        report.total_clusters = image.guest_size().div_ceil(header.cluster_size());
        Ok(Checker {
            image,
            geometry: image.geometry,
            layout,
            file_len,
            file_clusters,
            reftable: read_reftable(image)?,
            snapshots_size: snapshot_table_size(image)?,
            window: 0..0,
            counters: Counters::new(layout.order, usize::try_from(window_len).unwrap_or(1)),
            first_pass: true,
            seq: 0,
            sites: 0,
            grown: false,
            highest: 0,
            budget: walk::WalkBudget::default(),
            left: walk::BudgetLeft::default(),
            l2_buf: vec![0u8; 1usize << cluster_bits.min(header::MAX_CLUSTER_BITS)],
            report,
            found: Vec::new(),
            max_problems: options.max_problems,
        })
    }

    fn run(self) -> Result<CheckReport> {
        Ok(self.run_counting()?.0)
    }

    /// Run the check; also returns the references counted in the last window (the whole
    /// file when one window holds it).
    fn run_counting(mut self) -> Result<(CheckReport, Counters)> {
        let window_len = self.counters_len();
        self.budget = self.walk_budget()?;
        for window in counters::windows(self.file_clusters.saturating_add(1), window_len) {
            self.counters.clear();
            self.window = window;
            self.walk()?;
            self.compare_window()?;
            self.first_pass = false;
        }
        self.check_copied_flags()?;
        self.report.image_end_offset = self
            .highest
            .saturating_add(1)
            .saturating_mul(self.image.cluster_size());
        self.found.sort_by_key(|(key, _)| *key);
        self.report.problems = self.found.into_iter().map(|(_, p)| p).collect();
        Ok((self.report, self.counters))
    }

    fn counters_len(&self) -> u64 {
        match &self.counters {
            Counters::U8(v) => v.len() as u64,
            Counters::U16(v) => v.len() as u64,
            Counters::U32(v) => v.len() as u64,
            Counters::U64(v) => v.len() as u64,
        }
    }

    /// Host clusters QEMU compares: the file's, plus the one past it if it was referenced.
    fn compared_clusters(&self) -> u64 {
        self.file_clusters.saturating_add(u64::from(self.grown))
    }

    /// Count and keep a problem.
    fn problem(&mut self, key: SortKey, kind: ProblemKind, offset: u64) {
        self.report.count(kind.class());
        let problem = Problem { kind, offset };
        if self.found.len() < self.max_problems {
            self.found.push((key, problem));
        } else {
            self.report.problems_omitted = self.report.problems_omitted.saturating_add(1);
        }
    }

    /// The next place in the walk where a problem may be found.
    fn next_site(&mut self) -> SortKey {
        self.sites = self.sites.saturating_add(1);
        (PHASE_WALK, self.seq, AFTER_REFERENCE, self.sites)
    }

    /// A problem of the walk that belongs to no cluster: recorded in the first pass only.
    fn walk_problem(&mut self, kind: ProblemKind, offset: u64) {
        let key = self.next_site();
        if self.first_pass {
            self.problem(key, kind, offset);
        }
    }
}

/// Check the whole image in one window, every problem kept, and count the references to each
/// host cluster of the file (and to the one just past it): what a repair starts from. The
/// counts take 8 bytes a cluster; the caller bounds the file's size first.
pub(crate) fn check_counting<I: ReadAt + Size>(
    image: &Qcow2<I>,
) -> Result<(CheckReport, Vec<u64>)> {
    let options = CheckOptions {
        memory_budget: u64::MAX,
        max_problems: usize::MAX,
    };
    let checker = Checker::new(image, &options)?;
    let slots = checker.file_clusters.saturating_add(1);
    let (report, counters) = checker.run_counting()?;
    let len = usize::try_from(slots).map_err(|_| Error::Internal("cluster count"))?;
    Ok((report, (0..len).map(|i| counters.get(i)).collect()))
}

/// The problems of the active tables' COPIED flags judged against `counts` (a repair's new
/// refcounts, one per host cluster) instead of the stored refcounts, in the check's order.
pub(crate) fn copied_problems<I: ReadAt + Size>(
    image: &Qcow2<I>,
    counts: &[u64],
) -> Result<Vec<Problem>> {
    let options = CheckOptions {
        memory_budget: 1,
        max_problems: usize::MAX,
    };
    let mut checker = Checker::new(image, &options)?;
    checker.copied_with(&mut compare::NewCounts(counts))?;
    checker.found.sort_by_key(|(key, _)| *key);
    Ok(checker.found.into_iter().map(|(_, p)| p).collect())
}

/// The refcount table, as QEMU holds it (its size was checked against the limits on open).
fn read_reftable<I: ReadAt>(image: &Qcow2<I>) -> Result<Vec<u64>> {
    let header = image.header();
    let bytes = u64::from(header.refcount_table_clusters()) << header.cluster_bits();
    let table = read_metadata(
        &image.io,
        header.refcount_table_offset(),
        bytes,
        "refcount table",
    )?;
    Ok(be_u64_table(&table).to_vec())
}

/// The snapshot table's length as QEMU counts it: up to the end of the last entry's name,
/// without its padding.
///
/// Why the table is walked again though [`Qcow2::snapshots`] parsed it at open: the parsed
/// entries drop what their lengths are made of (the extra data size, and the id's and name's
/// byte lengths: a name that is not UTF-8 is kept with U+FFFD in its place), so the length
/// cannot be computed from them. Only the 40-byte fixed part of each entry is read again, and
/// every check here was already made at open ([`snapshot::entry_len`], the same offsets), so
/// a broken table never gets this far: it fails the open. Keeping the table's length at open
/// (QEMU's `s->snapshots_size`) would end this walk.
fn snapshot_table_size<I: ReadAt>(image: &Qcow2<I>) -> Result<u64> {
    let header = image.header();
    let start = header.snapshots_offset();
    let mut offset = start;
    let mut size = 0;
    for _ in 0..header.nb_snapshots() {
        let fixed = read_metadata(
            &image.io,
            offset,
            header::SNAPSHOT_HEADER_LEN,
            "snapshot table entry",
        )?;
        let (len, padded) = snapshot::entry_len(&fixed, offset, image.limits())?;
        size = offset.saturating_sub(start).saturating_add(len);
        offset = offset
            .checked_add(padded)
            .ok_or_else(|| Error::malformed("snapshot table offset overflows", offset))?;
    }
    Ok(size)
}

/// Bytes of `entries` table entries.
fn table_bytes(entries: u64) -> u64 {
    entries.saturating_mul(TABLE_ENTRY_LEN)
}
