//! Repairing what a check found, as `qemu-img check -r leaks | -r all` does (QEMU's
//! `qcow2_check_refcounts` with a fix mode): refcounts higher than the references (leaks),
//! lower ones and a broken refcount structure (`-r all`), and the COPIED flags of the active
//! tables.
//!
//! QEMU mends refcounts and flags in place. Here every change lands whole or not at all
//! ([`Rewrite`]): a new refcount structure holding the counted references, new copies of the
//! L1 and L2 tables whose flags change, then one header write. Where QEMU would have changed
//! the tables in place, a second such change moves the new structures down into the clusters
//! the first one freed, so the repaired image ends where QEMU's does (the check's "Image end
//! offset"). A crash leaves the old image, the repaired one, or (between the two changes) the
//! repaired one with its structures further up the file.

use std::collections::BTreeMap;
use std::fmt;

use positioned_io::{ReadAt, Size};

use super::stored::{Stored, StoredRefcounts};
use super::{check_counting, copied_problems, CheckReport, Problem, ProblemClass, ProblemKind};
use crate::base::io::{read_metadata, Storage};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::feature::INCOMPAT_DIRTY;
use crate::format::header::at;
use crate::format::new_header::put;
use crate::format::refcount::{RefTableEntry, RefcountLayout, REFT_OFFSET_MASK};
use crate::format::table::{L1_OFFSET_MASK, OFLAG_COPIED};
use crate::image::options::OpenOptions;
use crate::image::qcow2::Qcow2;
use crate::image::rewrite::{l1_bytes, Rewrite};
use crate::jobs::snapshot::{rebuild_active, set_l1};

/// What [`Qcow2::repair`] may change: `qemu-img check -r leaks` or `-r all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Repair {
    /// Lower refcounts that are higher than the references to their cluster (leaks), and set
    /// the COPIED flags right when nothing else is wrong. A used cluster with refcount 0
    /// needs [`Repair::All`]: the repair then stops before changing anything.
    Leaks,
    /// Everything `Leaks` repairs, and refcounts lower than the references, a refcount
    /// structure QEMU would rebuild, and every wrong COPIED flag of the active tables.
    All,
}

/// One line of what a repairing check reports, in the order `qemu-img check -r` prints them
/// on stderr. Its `Display` is qemu-img's line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RepairStep {
    /// A problem found, left as it is (printed as [`Problem`] prints it).
    Found(Problem),
    /// A problem repaired (`Repairing ...`).
    Repaired(Problem),
    /// The refcount table and blocks are built again from the references counted.
    Rebuilding,
    /// [`Repair::Leaks`] met a used cluster with refcount 0: the repair stops, nothing changed.
    NeedsRebuild,
}

impl fmt::Display for RepairStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProblemKind as K;
        match self {
            RepairStep::Found(problem) => problem.fmt(f),
            RepairStep::Rebuilding => f.write_str("Rebuilding refcount structure"),
            RepairStep::NeedsRebuild => f.write_str("ERROR need to rebuild refcount structures"),
            RepairStep::Repaired(problem) => match &problem.kind {
                K::LeakedCluster {
                    cluster,
                    refcount,
                    references,
                }
                | K::RefcountTooLow {
                    cluster,
                    refcount,
                    references,
                } => write!(
                    f,
                    "Repairing cluster {cluster} refcount={refcount} reference={references}"
                ),
                K::CopiedFlagL2Table {
                    l1_index,
                    l1_entry,
                    refcount,
                } => write!(
                    f,
                    "Repairing OFLAG_COPIED L2 cluster: l1_index={l1_index} \
                     l1_entry={l1_entry:x} refcount={refcount}"
                ),
                K::CopiedFlagData { l2_entry, refcount } => write!(
                    f,
                    "Repairing OFLAG_COPIED data cluster: l2_entry={l2_entry:x} \
                     refcount={refcount}"
                ),
                other => {
                    let text = other.to_string();
                    let rest = text.strip_prefix("ERROR").unwrap_or(&text);
                    write!(f, "Repairing{rest}")
                }
            },
        }
    }
}

/// What [`Qcow2::repair`] did and how the image stands now.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// What the repairing check found and did, line by line, in qemu-img's order.
    pub steps: Vec<RepairStep>,
    /// Leaked clusters repaired.
    pub leaks_fixed: u64,
    /// Corruptions repaired (refcounts too low, COPIED flags, a rebuilt refcount structure).
    pub corruptions_fixed: u64,
    /// False when the repair stopped before changing anything: [`Repair::Leaks`] and a used
    /// cluster with refcount 0 (qemu-img then fails with "Input/output error", status 1).
    pub completed: bool,
    /// The image now. When anything was repaired, a new check of the repaired image
    /// (qemu-img's "Double checking the fixed image now..."); otherwise what the repairing
    /// check left (its problems are the steps found). Its `leaks_fixed` and
    /// `corruptions_fixed` are this repair's.
    pub report: CheckReport,
}

impl RepairReport {
    /// Whether anything was repaired (qemu-img then checks the image again).
    pub fn repaired(&self) -> bool {
        self.leaks_fixed > 0 || self.corruptions_fixed > 0
    }

    /// What `qemu-img check -r` prints on stdout before the check of the repaired image
    /// (human output), or nothing when nothing was repaired.
    pub fn repaired_summary(&self) -> String {
        if !self.repaired() {
            return String::new();
        }
        format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked \
             clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            self.leaks_fixed, self.corruptions_fixed
        )
    }
}

/// The storage seen through `ReadAt + Size`, for the check.
struct Measured<'a, S>(&'a S);

impl<S: Storage> ReadAt for Measured<'_, S> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read_at(pos, buf)
    }
}

impl<S: Storage> Size for Measured<'_, S> {
    fn size(&self) -> std::io::Result<Option<u64>> {
        self.0.length().map(Some)
    }
}

/// Counts of what is still wrong, as QEMU's `BdrvCheckResult` keeps them during a repair.
#[derive(Debug, Default, Clone, Copy)]
struct Left {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
}

impl Left {
    fn count(&mut self, class: ProblemClass) {
        let n = match class {
            ProblemClass::Corruption => &mut self.corruptions,
            ProblemClass::Leak => &mut self.leaks,
            ProblemClass::CheckError => &mut self.check_errors,
        };
        *n = n.saturating_add(1);
    }

    fn any(&self) -> bool {
        self.corruptions > 0 || self.leaks > 0 || self.check_errors > 0
    }
}

/// What the repairing check decided.
struct Plan {
    steps: Vec<RepairStep>,
    left: Left,
    leaks_fixed: u64,
    corruptions_fixed: u64,
    /// The references counted to each host cluster (and the one past the file).
    references: Vec<u64>,
    /// The new refcount of each host cluster.
    counts: Vec<u64>,
    rebuild: bool,
    /// The active tables get new COPIED flags.
    fix_copied: bool,
    /// The length QEMU grows the file to for a refcount block past its end (0: none).
    grown_len: u64,
}

impl<S: Storage> Qcow2<S> {
    /// Check the image and repair what `mode` allows, as `qemu-img check -r leaks | -r all`
    /// does: the same problems repaired, the same lines reported, and when anything was
    /// repaired a new check of the repaired image. The image must be open for writing
    /// ([`OpenOptions::write`](crate::OpenOptions::write)); a crash leaves it as it was or
    /// repaired (never worse). A dirty image (lazy refcounts) is marked clean once nothing
    /// is left wrong.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("qcow2-doc-repair-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let path = dir.join("disk.qcow2");
    /// qcow2::create(&path, &qcow2::CreateOptions::new(64 << 20))?;
    /// // Leak a cluster: give cluster 4 (just past the file) refcount 1 (16-bit refcounts,
    /// // the refcount block at 128 KiB).
    /// let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    /// file.set_len(5 << 16)?;
    /// std::os::unix::fs::FileExt::write_all_at(&file, &1u16.to_be_bytes(), (2 << 16) + 8)?;
    ///
    /// let options = qcow2::OpenOptions::new().write(true);
    /// let mut image = qcow2::Qcow2::open_path_with(&path, &options)?;
    /// assert_eq!(image.check()?.leaks, 1);
    /// let repair = image.repair(qcow2::Repair::Leaks)?;
    /// assert_eq!(repair.leaks_fixed, 1);
    /// assert_eq!(repair.steps[1].to_string(), "Repairing cluster 4 refcount=1 reference=0");
    /// assert!(repair.report.is_clean() && image.check()?.is_clean());
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn repair(&mut self, mode: Repair) -> Result<RepairReport> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if let Some(crypt) = &self.crypt {
            crypt.check_unlocked()?;
        }
        let (first, plan) = {
            let view = self.measured_view()?;
            let (first, references) = check_counting(&view)?;
            let plan = plan_repair(&view, &first, references, mode)?;
            (first, plan)
        };
        if plan.steps.contains(&RepairStep::NeedsRebuild) {
            let mut report = first;
            report.check_errors = report.check_errors.saturating_add(1);
            return Ok(RepairReport {
                steps: plan.steps,
                leaks_fixed: 0,
                corruptions_fixed: 0,
                completed: false,
                report,
            });
        }
        let changes = plan.leaks_fixed > 0 || plan.corruptions_fixed > 0;
        let mark_clean = plan.left.check_errors == 0 && plan.left.corruptions == 0;
        let clear_dirty = mark_clean && self.header.is_dirty();
        if changes {
            self.apply(&plan, clear_dirty)?;
        } else if clear_dirty {
            Rewrite::new(self)?
                .commit(|h| clear_dirty_bit(h, self.header.incompatible_features()))?;
            self.reload()?;
        }
        let mut report = if changes {
            let view = self.measured_view()?;
            super::Checker::new(&view, &super::CheckOptions::default())?.run()?
        } else {
            unrepaired_report(first, &plan)
        };
        report.leaks_fixed = plan.leaks_fixed;
        report.corruptions_fixed = plan.corruptions_fixed;
        Ok(RepairReport {
            steps: plan.steps,
            leaks_fixed: plan.leaks_fixed,
            corruptions_fixed: plan.corruptions_fixed,
            completed: true,
            report,
        })
    }

    /// The image opened again over the same storage, read-only, for the check (which needs
    /// the file's length as `Size`). The walk reads metadata only: no secret is needed.
    fn measured_view(&self) -> Result<Qcow2<Measured<'_, S>>> {
        let file_clusters = self
            .io
            .length()
            .map_err(|e| Error::io("reading the image file's length", e))?
            .div_ceil(self.cluster_size());
        // The repair holds up to five counts a cluster at once (the check's counters, the
        // references, the new refcounts, and the rewrite's two).
        Limits::check(
            "refcounts of a repair",
            file_clusters.saturating_mul(40),
            self.limits.max_refcount_table_bytes.saturating_mul(64),
        )?;
        let options = OpenOptions::new().limits(self.limits.clone());
        let mut view = Qcow2::open_with(Measured(&self.io), &options)?;
        view.path = self.path.clone();
        Ok(view)
    }

    /// Write the repair. QEMU mends in place; here each change writes new structures, so
    /// a last change puts what moved back where QEMU leaves it: the active L1 and L2 tables
    /// where they were, the refcount structure where it was (or, after a rebuild, where
    /// QEMU's rebuild puts it: where the first change put it).
    fn apply(&mut self, plan: &Plan, clear_dirty: bool) -> Result<()> {
        let original = self.placement()?;
        let original_len = self
            .io
            .length()
            .map_err(|e| Error::io("reading the image file's length", e))?;
        if plan.rebuild && !plan.fix_copied {
            // Where QEMU's rebuild puts the new structure, and nothing else moves.
            self.write_counts(plan, clear_dirty, None)?;
            return self.grow(plan.grown_len);
        }
        let mut refcounts_at = original.clone();
        let mut keep_free = None;
        if plan.rebuild {
            // Where QEMU's rebuild would put the new structure: kept free by the first
            // change (which also copies tables), taken by the last.
            let dry = Rewrite::with_counts(self, plan.references.clone(), plan.counts.clone())?;
            let (table, clusters, blocks) = dry.planned_refcounts()?;
            refcounts_at.refcount_table = table;
            refcounts_at.refcount_blocks = blocks;
            keep_free = Some((table, clusters));
        }
        self.write_counts(plan, clear_dirty, keep_free.map(|t| (t, &refcounts_at)))?;
        self.put_back(&original, &refcounts_at)?;
        self.trim(original_len)?;
        self.grow(plan.grown_len)
    }

    /// Make the file `len` bytes long if it is shorter, as QEMU's `-r all` grows it to hold
    /// a refcount block that lay past its end (the block's clusters stay free).
    fn grow(&self, len: u64) -> Result<()> {
        let now = self
            .io
            .length()
            .map_err(|e| Error::io("reading the image file's length", e))?;
        if now < len {
            self.io
                .set_len(len)
                .map_err(|e| Error::io("growing the image file", e))?;
            self.io
                .sync()
                .map_err(|e| Error::io("syncing the image", e))?;
        }
        Ok(())
    }

    /// Cut off the clusters the first change appended that the last one left free, so the
    /// file is no longer than before (or than what it holds now): QEMU's repair in place
    /// leaves the file's length alone.
    fn trim(&self, original_len: u64) -> Result<()> {
        let len = self
            .io
            .length()
            .map_err(|e| Error::io("reading the image file's length", e))?;
        if len <= original_len {
            return Ok(());
        }
        let header = &self.header;
        let layout = RefcountLayout {
            cluster_bits: header.cluster_bits(),
            order: header.refcount_order(),
        };
        let table = read_metadata(
            &self.io,
            header.refcount_table_offset(),
            u64::from(header.refcount_table_clusters()) << layout.cluster_bits,
            "refcount table",
        )?;
        let table: Vec<u64> = table
            .chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
            .collect();
        let mut stored = StoredRefcounts::new(&self.io, layout, &table);
        let first = original_len.div_ceil(self.cluster_size());
        let mut keep = original_len;
        for c in first..len.div_ceil(self.cluster_size()) {
            if stored.get(c)? != Stored::Refcount(0) {
                keep = c.saturating_add(1) << layout.cluster_bits;
            }
        }
        if keep < len {
            self.io
                .set_len(keep)
                .map_err(|e| Error::io("cutting the image file short", e))?;
            self.io
                .sync()
                .map_err(|e| Error::io("syncing the image", e))?;
        }
        Ok(())
    }

    /// The first change: the new refcounts, the dirty bit cleared if asked, and (when the
    /// flags need it) the active tables' COPIED flags set right; with `keep_free` (the
    /// refcount table's offset and clusters, and the placement holding the blocks) those
    /// clusters are left alone.
    fn write_counts(
        &mut self,
        plan: &Plan,
        clear_dirty: bool,
        keep_free: Option<((u64, u64), &Placement)>,
    ) -> Result<()> {
        let l1_size = self.header.l1_size();
        let features = self.header.incompatible_features();
        let active = self.l1.to_vec();
        let cluster = self.cluster_size();
        {
            let mut rw = Rewrite::with_counts(self, plan.references.clone(), plan.counts.clone())?;
            if let Some(((table, clusters), placed)) = keep_free {
                rw.protect(table, clusters.saturating_mul(cluster));
                for &block in placed.refcount_blocks.iter().filter(|&&b| b != 0) {
                    rw.protect(block, cluster);
                }
            }
            let new_l1 = if plan.fix_copied {
                new_active_tables(self, &mut rw, &active)?
            } else {
                None
            };
            rw.commit(|h| {
                if let Some(l1) = new_l1 {
                    set_l1(h, l1, l1_size);
                }
                if clear_dirty {
                    clear_dirty_bit(h, features)?;
                }
                Ok(())
            })?;
        }
        self.reload()
    }

    /// Where the active L1 table, its L2 tables and the refcount structure are now.
    fn placement(&self) -> Result<Placement> {
        let header = &self.header;
        let bits = header.cluster_bits();
        let table_at = header.refcount_table_offset();
        let table = read_metadata(
            &self.io,
            table_at,
            u64::from(header.refcount_table_clusters()) << bits,
            "refcount table",
        )?;
        let blocks = table
            .chunks_exact(8)
            .map(|chunk| {
                let entry = chunk.try_into().map(u64::from_be_bytes).unwrap_or(0);
                match RefTableEntry::decode(entry, bits) {
                    RefTableEntry::Block(at) => at,
                    _ => 0,
                }
            })
            .collect();
        Ok(Placement {
            l1_offset: header.l1_table_offset(),
            l1: self.l1.to_vec(),
            refcount_table: table_at,
            refcount_blocks: blocks,
        })
    }

    /// A last change moving the active L2 tables and L1 table back to where `original` had
    /// them, and the refcount structure to where `refcounts` has it, where those clusters
    /// are free (the earlier changes freed them).
    fn put_back(&mut self, original: &Placement, refcounts: &Placement) -> Result<()> {
        let cluster = self.cluster_size();
        let l1_size = self.header.l1_size();
        let current_l1 = self.header.l1_table_offset();
        {
            let mut rw = Rewrite::new(self)?;
            rw.place_refcounts(refcounts.refcount_table, refcounts.refcount_blocks.clone());
            let mut entries = self.l1.to_vec();
            let mut moved = false;
            for (i, entry) in entries.iter_mut().enumerate() {
                let l2 = *entry & L1_OFFSET_MASK;
                let before = original.l1.get(i).map_or(0, |e| e & L1_OFFSET_MASK);
                if l2 == 0 || l2 == before {
                    continue;
                }
                let bytes = read_metadata(&self.io, l2, cluster, "L2 table")?;
                let to = rw.allocate_preferring(before, cluster)?;
                rw.write(to, &bytes)?;
                rw.release(l2, cluster);
                *entry = to | (*entry & OFLAG_COPIED);
                moved = true;
            }
            let new_l1 = if moved || current_l1 != original.l1_offset {
                let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                let at = rw.allocate_preferring(original.l1_offset, l1_bytes(l1_size).max(1))?;
                if !bytes.is_empty() {
                    rw.write(at, &bytes)?;
                }
                rw.release(current_l1, l1_bytes(l1_size));
                Some(at)
            } else {
                None
            };
            rw.commit(|h| {
                if let Some(l1) = new_l1 {
                    set_l1(h, l1, l1_size);
                }
                Ok(())
            })?;
        }
        self.reload()
    }
}

/// Where an image's active tables and refcount structure are.
#[derive(Debug, Clone)]
struct Placement {
    l1_offset: u64,
    l1: Vec<u64>,
    refcount_table: u64,
    /// Each refcount table entry's block (0 for none).
    refcount_blocks: Vec<u64>,
}

/// New copies of the active L2 tables whose COPIED flags change, and of the L1 table, with
/// the flags set right for the new counts; the old L1 table released. The new L1 table's
/// offset, `None` when nothing changed.
fn new_active_tables<S: Storage>(
    image: &Qcow2<S>,
    rw: &mut Rewrite<'_, S>,
    active: &[u64],
) -> Result<Option<u64>> {
    let current = image.header().l1_table_offset();
    let moved = rebuild_active(image, rw, active, Some(current))?;
    if moved.is_some() {
        rw.release(current, l1_bytes(image.header().l1_size()));
    }
    Ok(moved)
}

/// Clear the dirty bit in the header's incompatible features (QEMU's `qcow2_mark_clean`).
fn clear_dirty_bit(header: &mut [u8], features: u64) -> Result<()> {
    put(
        header,
        at::INCOMPATIBLE_FEATURES,
        &(features & !INCOMPAT_DIRTY).to_be_bytes(),
    );
    Ok(())
}

/// Where a problem comes from in the check: the walk, the refcount comparison, or the COPIED
/// flags.
fn is_comparison(kind: &ProblemKind) -> bool {
    matches!(
        kind,
        ProblemKind::LeakedCluster { .. }
            | ProblemKind::RefcountTooLow { .. }
            | ProblemKind::RefcountUnreadable { .. }
    )
}

fn is_copied_flag(kind: &ProblemKind) -> bool {
    matches!(
        kind,
        ProblemKind::CopiedFlagL2Table { .. } | ProblemKind::CopiedFlagData { .. }
    )
}

/// A problem of the refcount structure itself, which QEMU mends by rebuilding it.
fn breaks_refcount_structure(kind: &ProblemKind) -> bool {
    matches!(
        kind,
        ProblemKind::RefcountTableEntryReserved { .. }
            | ProblemKind::RefcountBlockUnaligned { .. }
            | ProblemKind::RefcountBlockShared { .. }
            | ProblemKind::RefcountTooLow { refcount: 0, .. }
    )
}

/// Decide what to repair from the first check, in QEMU's order: the walk's problems, the
/// comparison (reported, then repaired), a rebuild, the COPIED flags against the new counts.
fn plan_repair<I: ReadAt + Size>(
    image: &Qcow2<I>,
    first: &CheckReport,
    references: Vec<u64>,
    mode: Repair,
) -> Result<Plan> {
    let old = old_structure(image)?;
    let walk: Vec<&Problem> = first
        .problems
        .iter()
        .filter(|p| !is_comparison(&p.kind) && !is_copied_flag(&p.kind))
        .collect();
    let mut compared: Vec<Problem> = first
        .problems
        .iter()
        .filter(|p| is_comparison(&p.kind))
        .cloned()
        .collect();
    let mut left = Left::default();
    walk.iter().for_each(|p| left.count(p.kind.class()));
    let mut steps = Vec::new();
    let mut grown = Vec::new();
    for problem in &walk {
        // A refcount block past the end of the file: QEMU's `-r all` grows the file to hold
        // it (counted as repaired), and the block's zeros then call for a rebuild.
        if let (Repair::All, Some(cluster)) = (mode, outside_block(image, problem)?) {
            steps.push(RepairStep::Repaired((*problem).clone()));
            grown.push(cluster);
            compared.push(Problem {
                kind: ProblemKind::RefcountTooLow {
                    cluster,
                    refcount: 0,
                    references: 1,
                },
                offset: cluster << image.header().cluster_bits(),
            });
        } else {
            steps.push(RepairStep::Found((*problem).clone()));
        }
    }
    compared.sort_by_key(|p| p.offset);
    steps.extend(compared.iter().cloned().map(RepairStep::Found));
    let rebuild = walk
        .iter()
        .map(|p| &p.kind)
        .chain(compared.iter().map(|p| &p.kind))
        .any(breaks_refcount_structure);
    let mut plan = Plan {
        steps: Vec::new(),
        left,
        leaks_fixed: 0,
        corruptions_fixed: 0,
        counts: references.clone(),
        references,
        rebuild,
        fix_copied: false,
        grown_len: grown
            .iter()
            .map(|c| c.saturating_add(1) << image.header().cluster_bits())
            .max()
            .unwrap_or(0),
    };
    if rebuild {
        if mode == Repair::Leaks {
            steps.push(RepairStep::NeedsRebuild);
            plan.steps = steps;
            return Ok(plan);
        }
        steps.push(RepairStep::Rebuilding);
        steps.extend(old_structure_leaks(image, &old, &grown, &plan.references));
        // The walk's problems with the old structure are gone with it.
        let mut after = Left::default();
        walk.iter()
            .filter(|p| {
                !breaks_refcount_structure(&p.kind)
                    && !matches!(p.kind, ProblemKind::RefcountBlockOutsideImage { .. })
            })
            .for_each(|p| after.count(p.kind.class()));
        let mut before = left;
        compared.iter().for_each(|p| before.count(p.kind.class()));
        plan.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
        plan.leaks_fixed = before.leaks.saturating_sub(after.leaks);
        after.check_errors = before.check_errors;
        plan.left = after;
    } else if plan.left.corruptions > 0 || !compared.is_empty() {
        for problem in compared {
            let repaired = match problem.kind {
                ProblemKind::LeakedCluster { .. } => {
                    plan.leaks_fixed = plan.leaks_fixed.saturating_add(1);
                    true
                }
                ProblemKind::RefcountTooLow {
                    cluster, refcount, ..
                } => {
                    if mode == Repair::All {
                        plan.corruptions_fixed = plan.corruptions_fixed.saturating_add(1);
                        true
                    } else {
                        set_count(&mut plan.counts, cluster, refcount);
                        plan.left.count(ProblemClass::Corruption);
                        false
                    }
                }
                _ => {
                    plan.left.count(problem.kind.class());
                    false
                }
            };
            steps.push(if repaired {
                RepairStep::Repaired(problem)
            } else {
                RepairStep::Found(problem)
            });
        }
    }
    // The new structure replaces the old one: its references leave the counts.
    for (&cluster, &k) in &old {
        if let Some(n) = usize::try_from(cluster)
            .ok()
            .and_then(|c| plan.counts.get_mut(c))
        {
            *n = n.saturating_sub(k);
        }
    }
    // QEMU's check_oflag_copied, against the refcounts as repaired.
    let fix_copied = mode == Repair::All || !plan.left.any();
    for problem in copied_problems(image, &plan.counts)? {
        if fix_copied {
            plan.corruptions_fixed = plan.corruptions_fixed.saturating_add(1);
            plan.fix_copied = true;
            steps.push(RepairStep::Repaired(problem));
        } else {
            plan.left.count(problem.kind.class());
            steps.push(RepairStep::Found(problem));
        }
    }
    plan.steps = steps;
    Ok(plan)
}

/// The cluster of the refcount block past the end of the file `problem` reports, if it
/// reports one.
fn outside_block<I: ReadAt + Size>(image: &Qcow2<I>, problem: &Problem) -> Result<Option<u64>> {
    if !matches!(problem.kind, ProblemKind::RefcountBlockOutsideImage { .. }) {
        return Ok(None);
    }
    // The problem's offset is the refcount table entry's.
    let entry = read_metadata(&image.io, problem.offset, 8, "refcount table entry")?;
    let entry = entry
        .as_slice()
        .try_into()
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    Ok(Some(
        (entry & REFT_OFFSET_MASK) >> image.header().cluster_bits(),
    ))
}

fn set_count(counts: &mut [u64], cluster: u64, value: u64) {
    if let Some(slot) = usize::try_from(cluster)
        .ok()
        .and_then(|c| counts.get_mut(c))
    {
        *slot = value;
    }
}

/// The clusters of the refcount table and of the blocks the check counted (aligned, inside
/// the file), each with how many of those references it has.
fn old_structure<I: ReadAt + Size>(image: &Qcow2<I>) -> Result<BTreeMap<u64, u64>> {
    let header = image.header();
    let bits = header.cluster_bits();
    let file_clusters = image
        .io
        .size()
        .map_err(|e| Error::io("reading the file length", e))?
        .unwrap_or(0)
        .div_ceil(image.cluster_size());
    let mut old: BTreeMap<u64, u64> = BTreeMap::new();
    let table_at = header.refcount_table_offset();
    let table_clusters = u64::from(header.refcount_table_clusters());
    let first = table_at >> bits;
    for c in first..first.saturating_add(table_clusters) {
        bump(&mut old, c);
    }
    let table = read_metadata(
        &image.io,
        table_at,
        table_clusters << bits,
        "refcount table",
    )?;
    for chunk in table.chunks_exact(8) {
        let entry = chunk.try_into().map(u64::from_be_bytes).unwrap_or(0);
        if let RefTableEntry::Block(at) = RefTableEntry::decode(entry, bits) {
            if at >> bits < file_clusters {
                bump(&mut old, at >> bits);
            }
        }
    }
    Ok(old)
}

/// What a rebuild leaves unreferenced, which QEMU reports as leaks it repairs right after
/// rebuilding, in cluster order: the old table and blocks (`old`), and the blocks past the
/// end of the file it grew the file for (`grown`).
fn old_structure_leaks(
    image: &Qcow2<impl ReadAt>,
    old: &BTreeMap<u64, u64>,
    grown: &[u64],
    references: &[u64],
) -> Vec<RepairStep> {
    let bits = image.header().cluster_bits();
    let mut dropped = old.clone();
    grown.iter().for_each(|&c| bump(&mut dropped, c));
    dropped
        .into_iter()
        .filter_map(|(cluster, k)| {
            let counted = usize::try_from(cluster)
                .ok()
                .and_then(|c| references.get(c))
                .copied()
                .unwrap_or(0);
            let refcount = if grown.contains(&cluster) {
                counted.saturating_add(1)
            } else {
                counted
            };
            (refcount > 0).then(|| {
                RepairStep::Repaired(Problem {
                    kind: ProblemKind::LeakedCluster {
                        cluster,
                        refcount,
                        references: refcount.saturating_sub(k),
                    },
                    offset: cluster << bits,
                })
            })
        })
        .collect()
}

fn bump(counts: &mut BTreeMap<u64, u64>, cluster: u64) {
    let n = counts.entry(cluster).or_default();
    *n = n.saturating_add(1);
}

/// The report when nothing was repaired: the first check's statistics, with what is left
/// wrong counted as QEMU counts it after its repair attempts.
fn unrepaired_report(first: CheckReport, plan: &Plan) -> CheckReport {
    let mut report = first;
    report.corruptions = plan.left.corruptions;
    report.leaks = plan.left.leaks;
    report.check_errors = plan.left.check_errors;
    report.problems = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            RepairStep::Found(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    report.problems_omitted = 0;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: ProblemKind) -> Problem {
        Problem { kind, offset: 0 }
    }

    #[test]
    fn steps_print_as_qemu_img_prints_them() {
        let leak = problem(ProblemKind::LeakedCluster {
            cluster: 9,
            refcount: 2,
            references: 1,
        });
        assert_eq!(
            RepairStep::Found(leak.clone()).to_string(),
            "Leaked cluster 9 refcount=2 reference=1"
        );
        assert_eq!(
            RepairStep::Repaired(leak).to_string(),
            "Repairing cluster 9 refcount=2 reference=1"
        );
        let low = problem(ProblemKind::RefcountTooLow {
            cluster: 6,
            refcount: 1,
            references: 2,
        });
        assert_eq!(
            RepairStep::Repaired(low).to_string(),
            "Repairing cluster 6 refcount=1 reference=2"
        );
        let l1 = problem(ProblemKind::CopiedFlagL2Table {
            l1_index: 0,
            l1_entry: 0x40000,
            refcount: 1,
        });
        assert_eq!(
            RepairStep::Repaired(l1).to_string(),
            "Repairing OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=40000 refcount=1"
        );
        let data = problem(ProblemKind::CopiedFlagData {
            l2_entry: 0x60000,
            refcount: 1,
        });
        assert_eq!(
            RepairStep::Repaired(data).to_string(),
            "Repairing OFLAG_COPIED data cluster: l2_entry=60000 refcount=1"
        );
        assert_eq!(
            RepairStep::Rebuilding.to_string(),
            "Rebuilding refcount structure"
        );
        assert_eq!(
            RepairStep::NeedsRebuild.to_string(),
            "ERROR need to rebuild refcount structures"
        );
    }

    #[test]
    fn only_a_refcount_of_zero_or_a_broken_structure_needs_a_rebuild() {
        let low = |refcount| ProblemKind::RefcountTooLow {
            cluster: 1,
            refcount,
            references: 2,
        };
        assert!(breaks_refcount_structure(&low(0)));
        assert!(!breaks_refcount_structure(&low(1)));
        assert!(breaks_refcount_structure(
            &ProblemKind::RefcountBlockShared {
                index: 0,
                references: 2
            }
        ));
        assert!(!breaks_refcount_structure(&ProblemKind::LeakedCluster {
            cluster: 1,
            refcount: 1,
            references: 0
        }));
    }

    #[test]
    fn nothing_repaired_prints_no_repair_summary() {
        let report = RepairReport {
            steps: Vec::new(),
            leaks_fixed: 0,
            corruptions_fixed: 0,
            completed: true,
            report: CheckReport::new("x".into()),
        };
        assert!(!report.repaired());
        assert_eq!(report.repaired_summary(), "");
        let fixed = RepairReport {
            leaks_fixed: 2,
            corruptions_fixed: 1,
            ..report
        };
        assert_eq!(
            fixed.repaired_summary(),
            "The following inconsistencies were found and repaired:\n\n    2 leaked clusters\n    \
             1 corruptions\n\nDouble checking the fixed image now...\n"
        );
    }
}
