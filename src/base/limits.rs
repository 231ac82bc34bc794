//! Bounds on what an image may make the reader allocate or follow.

/// Largest L1 table QEMU uses, in bytes (QEMU `QCOW_MAX_L1_SIZE`): the default bound.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;

/// Limits checked before every allocation or traversal sized by values read from the image.
///
/// The defaults accept every image QEMU itself opens (they are QEMU's own limits) while
/// keeping a hostile image from making the reader allocate more than a few tens of MiB.
///
/// ```
/// let mut limits = qcow2::Limits::default();
/// limits.l2_cache_bytes = 1 << 20; // keep at most 1 MiB of L2 tables in memory
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest L1 table, in bytes (QEMU: `QCOW_MAX_L1_SIZE`, 32 MiB).
    pub max_l1_bytes: u64,
    /// Largest refcount table, in bytes (QEMU: `QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
    pub max_refcount_table_bytes: u64,
    /// Most internal snapshots (QEMU: `QCOW_MAX_SNAPSHOTS`, 65536).
    pub max_snapshots: u64,
    /// Largest snapshot table, in bytes (QEMU: `QCOW_MAX_SNAPSHOTS_SIZE`, 64 MiB).
    pub max_snapshot_table_bytes: u64,
    /// Largest extra data of one snapshot entry (QEMU: `QCOW_MAX_SNAPSHOT_EXTRA_DATA`, 1 KiB).
    pub max_snapshot_extra_bytes: u64,
    /// Most bitmaps in the bitmaps extension (QEMU: `QCOW2_MAX_BITMAPS`, 65535).
    pub max_bitmaps: u64,
    /// Largest bitmap directory, in bytes (QEMU: `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`, 1 KiB per
    /// bitmap: 65535 KiB).
    pub max_bitmap_directory_bytes: u64,
    /// Longest backing-file name (QEMU: 1023 bytes).
    pub max_backing_name_bytes: u64,
    /// Deepest backing chain followed by [`Qcow2::open_path`](crate::Qcow2::open_path).
    pub max_chain_depth: u32,
    /// Most bytes of bitmap tables read when an image is opened (QEMU checks the table of every
    /// bitmap not in use at open), in total; also the largest table
    /// [`Qcow2::dirty_extents`](crate::Qcow2::dirty_extents) reads. QEMU's own bound is 8 MiB
    /// per table (`BME_MAX_PHYS_SIZE` over a 512-byte cluster, 8 bytes an entry).
    pub max_bitmap_table_bytes: u64,
    /// Bytes of L2 tables kept in memory for an image and its whole backing chain, which
    /// share one cache of 4 KiB slices (at least one slice is always kept; QEMU's default is
    /// 32 MiB too). Each [`Reader`](crate::Reader), and each image of a chain for the reads
    /// made through it, also keeps the last 32 slices it used (128 KiB at most) and a buffer
    /// for reading them (128 KiB at most), so that threads with a reader each do not contend
    /// for the shared cache and a walk does not fill it with every slice it passes.
    /// Decompressed clusters have a budget of their own, 8 MiB per chain (buffers kept for
    /// reuse included).
    pub l2_cache_bytes: u64,
    /// Most PBKDF2 blocks one open may compute to unlock LUKS images: every key slot tried,
    /// in every image of the chain one [`Qcow2::open_path_with`](crate::Qcow2::open_path_with)
    /// opens, draws on this one budget ([`Qcow2::open_with`](crate::Qcow2::open_with) opens
    /// one image, with a budget of its own).
    ///
    /// A block is one HMAC of the LUKS header's hash. Trying a key slot of `iterations` costs
    /// `iterations * ceil(key_bytes / digest_len)` blocks (PBKDF2 derives each digest-sized
    /// piece of the key separately: SHA-1 costs twice what SHA-256 does for a 64-byte key),
    /// plus the master-key digest's iterations (one block each: the digest is 20 bytes), plus
    /// one hash per digest-sized piece of the key for each anti-forensic stripe but the last.
    /// The work is counted before it is done: a slot that would take the open past the limit
    /// is not tried, and the open fails with [`Error::LimitExceeded`](crate::Error::LimitExceeded).
    /// A wrong secret makes every active slot be tried, as in QEMU, and each counts.
    ///
    /// The default, 2^27 (134 million blocks, about 15 s of SHA-256 on one fast core), is
    /// 6 times what an image made with `qemu-img`'s default iteration time (2 s) costs when
    /// made on such a core (`aes-256-xts` with SHA-256: about 18 million blocks for the key
    /// slot and 2 million for the master-key digest).
    pub max_kdf_blocks: u64,
    /// Largest LUKS header area (header and key material), in bytes (QEMU's aes-256-xts
    /// header takes 2 MiB).
    pub max_luks_header_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_l1_bytes: MAX_L1_BYTES,
            max_refcount_table_bytes: 8 << 20,
            max_snapshots: 65536,
            max_snapshot_table_bytes: 64 << 20,
            max_snapshot_extra_bytes: 1024,
            max_bitmaps: 65535,
            max_bitmap_directory_bytes: 1024 * 65535,
            max_backing_name_bytes: 1023,
            max_chain_depth: 64,
            max_bitmap_table_bytes: 64 << 20,
            l2_cache_bytes: 32 << 20,
            max_kdf_blocks: 1 << 27,
            max_luks_header_bytes: 16 << 20,
        }
    }
}

impl Limits {
    /// No limits beyond what the format itself can express. For trusted images only.
    ///
    /// ```
    /// // A trusted image with a huge snapshot table.
    /// let options = qcow2::OpenOptions::new().limits(qcow2::Limits::unlimited());
    /// let image = qcow2::Qcow2::open_path_with("fixtures/snap.qcow2", &options)?;
    /// # let _ = image;
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn unlimited() -> Self {
        Limits {
            max_l1_bytes: u64::MAX,
            max_refcount_table_bytes: u64::MAX,
            max_snapshots: u64::MAX,
            max_snapshot_table_bytes: u64::MAX,
            max_snapshot_extra_bytes: u64::MAX,
            max_bitmaps: u64::MAX,
            max_bitmap_directory_bytes: u64::MAX,
            max_backing_name_bytes: u64::MAX,
            max_chain_depth: u32::MAX,
            max_bitmap_table_bytes: u64::MAX,
            l2_cache_bytes: 32 << 20,
            max_kdf_blocks: u64::MAX,
            max_luks_header_bytes: u64::MAX,
        }
    }

    /// Fail with [`Error::LimitExceeded`](crate::Error::LimitExceeded) when `requested > limit`
    /// (both in bytes).
    pub(crate) fn check(what: &'static str, requested: u64, limit: u64) -> crate::Result<()> {
        Self::check_in("bytes", what, requested, limit)
    }

    /// [`Limits::check`] for a limit that counts something else than bytes.
    pub(crate) fn check_in(
        unit: &'static str,
        what: &'static str,
        requested: u64,
        limit: u64,
    ) -> crate::Result<()> {
        if requested > limit {
            return Err(crate::Error::LimitExceeded {
                what,
                requested,
                limit,
                unit,
            });
        }
        Ok(())
    }
}
