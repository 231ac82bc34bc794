//! `qemu-img info` and `qemu-img snapshot -l` as text, line for line as QEMU prints them
//! (`bdrv_node_info_dump`, `bdrv_snapshot_dump` and `dump_qdict` in block/qapi.c,
//! `dump_human_image_info` in qemu-img.c, `size_to_str` in util/cutils.c).
//!
//! QEMU pads with `printf` widths, which count bytes: so do the helpers here. The text is
//! bytes: QEMU prints file names as they are, UTF-8 or not.

use std::io::Write;

use crate::jobs::info::{BitmapInfo, FormatSpecific, ImageInfo, Qcow2Specific, SnapshotInfo};

/// `info` at `indentation` (4 spaces a level), then its children, as `qemu-img info` prints
/// a node of the block graph. `path` names the node (`""` for the image itself).
pub(crate) fn image(
    out: &mut Vec<u8>,
    info: &ImageInfo,
    indentation: usize,
    path: &str,
    utc_offset: &dyn Fn(i64) -> i64,
) {
    // A node without children is the host file: QEMU names its fields differently.
    let protocol = indentation > 0 && info.children.is_empty();
    node(out, info, indentation, protocol, utc_offset);
    for child in &info.children {
        let child_path = format!("{path}/{}", child.name);
        line(out, indentation, format_args!("Child node '{child_path}':"));
        image(
            out,
            &child.info,
            indentation.saturating_add(1),
            &child_path,
            utc_offset,
        );
    }
}

/// One node, without its children (`bdrv_node_info_dump`), and without `disk size:`.
fn node(
    out: &mut Vec<u8>,
    info: &ImageInfo,
    indentation: usize,
    protocol: bool,
    utc_offset: &dyn Fn(i64) -> i64,
) {
    let (name, format, size) = if protocol {
        ("filename", "protocol type", "file length")
    } else {
        ("image", "file format", "virtual size")
    };
    if let Some(filename) = name_bytes(&info.filename_bytes, &info.filename) {
        line_with(out, indentation, &format!("{name}: "), filename, b"");
    }
    line(out, indentation, format_args!("{format}: {}", info.format));
    line(
        out,
        indentation,
        format_args!(
            "{size}: {} ({} bytes)",
            size_to_str(info.virtual_size),
            info.virtual_size
        ),
    );
    if info.encrypted {
        line(out, indentation, format_args!("encrypted: yes"));
    }
    if let Some(cluster_size) = info.cluster_size {
        line(
            out,
            indentation,
            format_args!("cluster_size: {cluster_size}"),
        );
    }
    if info.dirty {
        line(out, indentation, format_args!("cleanly shut down: no"));
    }
    if let Some(backing) = name_bytes(&info.backing_filename_bytes, &info.backing_filename) {
        let full = name_bytes(
            &info.full_backing_filename_bytes,
            &info.full_backing_filename,
        );
        let mut rest = Vec::new();
        match full {
            None => rest.extend_from_slice(b" (cannot determine actual path)"),
            Some(full) if full != backing => {
                rest.extend_from_slice(b" (actual path: ");
                rest.extend_from_slice(full);
                rest.extend_from_slice(b")");
            }
            Some(_) => {}
        }
        line_with(out, indentation, "backing file: ", backing, &rest);
        if let Some(format) = &info.backing_filename_format {
            line(
                out,
                indentation,
                format_args!("backing file format: {format}"),
            );
        }
    }
    let indent = " ".repeat(indentation.saturating_mul(4));
    snapshots(out, &info.snapshots, &indent, utc_offset);
    if let Some(FormatSpecific::Qcow2(q)) = &info.format_specific {
        // A file node's data is empty, and QEMU prints nothing for it.
        line(
            out,
            indentation,
            format_args!("Format specific information:"),
        );
        qcow2_specific(out, q, indentation.saturating_add(1));
    }
}

/// The snapshot table (nothing without snapshots), each line after `indent`.
pub(crate) fn snapshots(
    out: &mut Vec<u8>,
    list: &[SnapshotInfo],
    indent: &str,
    utc_offset: &dyn Fn(i64) -> i64,
) {
    if list.is_empty() {
        return;
    }
    let _ = writeln!(out, "{indent}Snapshot list:");
    let _ = writeln!(
        out,
        "{indent}{} {} {:>8} {:>19} {:>15} {:>10}",
        left("ID", 7),
        left("TAG", 16),
        "VM_SIZE",
        "DATE",
        "VM_CLOCK",
        "ICOUNT"
    );
    for s in list {
        let _ = writeln!(out, "{indent}{}", snapshot_row(s, utc_offset));
    }
}

/// One row of the table (`bdrv_snapshot_dump`).
fn snapshot_row(s: &SnapshotInfo, utc_offset: &dyn Fn(i64) -> i64) -> String {
    let date = i64::from(s.date_sec);
    let secs = s.vm_clock_sec;
    // QEMU casts each part to a C int; none of them can overflow one.
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = match s.icount {
        Some(i) => (i as i64).to_string(), // QEMU prints it as int64
        None => "--".to_owned(),
    };
    format!(
        "{} {} {} {} {} {}",
        left(&s.id, 7),
        left(&s.name, 16),
        right(&size_to_str(s.vm_state_size), 8),
        right(&date_time(date.saturating_add(utc_offset(date))), 19),
        right(&clock, 15),
        right(&icount, 10)
    )
}

/// `qcow2` format-specific data (`dump_qdict` of `ImageInfoSpecificQCow2`): keys in QEMU's
/// order with dashes as spaces.
fn qcow2_specific(out: &mut Vec<u8>, q: &Qcow2Specific, level: usize) {
    line(out, level, format_args!("compat: {}", q.compat));
    line(
        out,
        level,
        format_args!("compression type: {}", q.compression_type),
    );
    if let Some(lazy) = q.lazy_refcounts {
        line(out, level, format_args!("lazy refcounts: {lazy}"));
    }
    if !q.bitmaps.is_empty() {
        line(out, level, format_args!("bitmaps:"));
        for (i, b) in q.bitmaps.iter().enumerate() {
            bitmap(out, i, b, level.saturating_add(1));
        }
    }
    line(
        out,
        level,
        format_args!("refcount bits: {}", q.refcount_bits),
    );
    if let Some(data_file) = &q.data_file {
        line(out, level, format_args!("data file: {data_file}"));
    }
    if let Some(e) = &q.encrypt {
        encrypt(out, e, level);
    }
    if let Some(raw) = q.data_file_raw {
        line(out, level, format_args!("data file raw: {raw}"));
    }
    if let Some(corrupt) = q.corrupt {
        line(out, level, format_args!("corrupt: {corrupt}"));
    }
    if let Some(extended_l2) = q.extended_l2 {
        line(out, level, format_args!("extended l2: {extended_l2}"));
    }
}

/// The `encrypt` block, keys in QEMU's order (the order `EncryptionInfo` declares them).
fn encrypt(out: &mut Vec<u8>, e: &crate::EncryptionInfo, level: usize) {
    line(out, level, format_args!("encrypt:"));
    let inner = level.saturating_add(1);
    let text = |out: &mut Vec<u8>, key: &str, value: &Option<String>| {
        if let Some(v) = value {
            line(out, inner, format_args!("{key}: {v}"));
        }
    };
    text(out, "ivgen alg", &e.ivgen_alg);
    if let Some(detached) = e.detached_header {
        line(out, inner, format_args!("detached header: {detached}"));
    }
    text(out, "hash alg", &e.hash_alg);
    text(out, "cipher alg", &e.cipher_alg);
    text(out, "uuid", &e.uuid);
    text(out, "ivgen hash alg", &e.ivgen_hash_alg);
    line(out, inner, format_args!("format: {}", e.format));
    text(out, "cipher mode", &e.cipher_mode);
    if !e.slots.is_empty() {
        line(out, inner, format_args!("slots:"));
        let item = inner.saturating_add(1);
        let field = item.saturating_add(1);
        for (i, slot) in e.slots.iter().enumerate() {
            line(out, item, format_args!("[{i}]:"));
            line(out, field, format_args!("active: {}", slot.active));
            if let Some(iters) = slot.iters {
                line(out, field, format_args!("iters: {iters}"));
            }
            line(out, field, format_args!("key offset: {}", slot.key_offset));
            if let Some(stripes) = slot.stripes {
                line(out, field, format_args!("stripes: {stripes}"));
            }
        }
    }
    if let Some(offset) = e.payload_offset {
        line(out, inner, format_args!("payload offset: {offset}"));
    }
    if let Some(iters) = e.master_key_iters {
        line(out, inner, format_args!("master key iters: {iters}"));
    }
}

/// Element `i` of the bitmaps list.
fn bitmap(out: &mut Vec<u8>, i: usize, b: &BitmapInfo, level: usize) {
    let inner = level.saturating_add(1);
    line(out, level, format_args!("[{i}]:"));
    line(out, inner, format_args!("flags:"));
    for (j, flag) in b.flags.iter().enumerate() {
        line(out, inner.saturating_add(1), format_args!("[{j}]: {flag}"));
    }
    line(out, inner, format_args!("name: {}", b.name));
    line(out, inner, format_args!("granularity: {}", b.granularity));
}

/// One line at `level` (4 spaces a level).
fn line(out: &mut Vec<u8>, level: usize, text: std::fmt::Arguments<'_>) {
    let _ = writeln!(out, "{:width$}{text}", "", width = level.saturating_mul(4));
}

/// One line at `level`: `prefix`, then `name` byte for byte, then `suffix`.
fn line_with(out: &mut Vec<u8>, level: usize, prefix: &str, name: &[u8], suffix: &[u8]) {
    let _ = write!(
        out,
        "{:width$}{prefix}",
        "",
        width = level.saturating_mul(4)
    );
    out.extend_from_slice(name);
    out.extend_from_slice(suffix);
    out.push(b'\n');
}

/// A name's bytes when known, else its text's.
fn name_bytes<'a>(bytes: &'a Option<Vec<u8>>, text: &'a Option<String>) -> Option<&'a [u8]> {
    bytes
        .as_deref()
        .or_else(|| text.as_deref().map(str::as_bytes))
}

/// `%-Ns`: `s` padded on the right to `width` bytes.
fn left(s: &str, width: usize) -> String {
    format!("{s}{}", " ".repeat(width.saturating_sub(s.len())))
}

/// `%Ns`: `s` padded on the left to `width` bytes.
fn right(s: &str, width: usize) -> String {
    format!("{}{s}", " ".repeat(width.saturating_sub(s.len())))
}

/// QEMU's `size_to_str`: three significant digits and a binary unit, switching to the next
/// unit from 1000 of the smaller (so 1000 KiB is "0.977 MiB"; 1023.5 KiB rounds to "1e+03 KiB"
/// as C's `%0.3g` does).
pub(crate) fn size_to_str(value: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = value as f64 / (1000.0 / 1024.0);
    // C's frexp exponent of `scaled`: floor(log2) + 1, and 0 for 0.
    let exponent = if scaled == 0.0 {
        0
    } else {
        let biased = (scaled.to_bits() >> 52) & 0x7ff;
        (biased as i64).saturating_sub(1022)
    };
    // C divides toward zero: an exponent of 0 gives unit 0.
    let unit = usize::try_from(exponent.saturating_sub(1) / 10)
        .unwrap_or(0)
        .min(SUFFIXES.len().saturating_sub(1));
    let divisor = (1u64 << unit.saturating_mul(10)) as f64;
    let suffix = SUFFIXES.get(unit).copied().unwrap_or_default();
    format!("{} {suffix}B", g3(value as f64 / divisor))
}

/// C's `%0.3g`: three significant digits, trailing zeros dropped, exponent notation when the
/// exponent is below -4 or above 2.
fn g3(x: f64) -> String {
    if x == 0.0 {
        return "0".to_owned();
    }
    // Rust rounds to the nearest, ties to even, on the exact value, as glibc does.
    let scientific = format!("{x:.2e}");
    let (mantissa, exp) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let negative = if x < 0.0 { "-" } else { "" };
    if !(-4..3).contains(&exp) {
        let mantissa = trim_fraction(mantissa.trim_start_matches('-'));
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{negative}{mantissa}e{sign}{:02}", exp.unsigned_abs());
    }
    let fixed = if exp < 0 {
        let zeros = "0".repeat(exp.unsigned_abs().saturating_sub(1) as usize);
        format!("0.{zeros}{digits}")
    } else {
        let point = (exp as usize).saturating_add(1).min(digits.len());
        let (whole, fraction) = digits.split_at(point);
        format!("{whole}.{fraction}")
    };
    format!("{negative}{}", trim_fraction(&fixed))
}

/// Drop trailing zeros after a decimal point, and the point if nothing follows it.
fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// `%Y-%m-%d %H:%M:%S` of seconds since the Unix epoch (proleptic Gregorian calendar).
pub(crate) fn date_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Year, month, day of a day count from 1970-01-01 (Howard Hinnant's `civil_from_days`).
/// `days` comes from a 32-bit date and a time-zone offset, far from any overflow.
#[allow(clippy::arithmetic_side_effects)]
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `qemu-img info` and `qemu-img snapshot -l` as text.
impl ImageInfo {
    /// The information as `qemu-img info` prints it, line for line, without the `disk size:`
    /// lines (they depend on the host file system). Snapshot dates are in UTC; see
    /// [`ImageInfo::to_human_with_offset`] for local time as `qemu-img` prints it.
    ///
    /// ```
    /// let info = qcow2::ImageInfo::from_path("fixtures/chain-mid.qcow2", &Default::default())?;
    /// let text = info.to_human();
    /// assert!(text.starts_with("image: fixtures/chain-mid.qcow2\nfile format: qcow2\n"));
    /// assert!(text.contains("\nvirtual size: 4 MiB (4194304 bytes)\n"));
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn to_human(&self) -> String {
        self.to_human_with_offset(&|_| 0)
    }

    /// Like [`ImageInfo::to_human`], with snapshot dates shifted by `utc_offset(date)`
    /// seconds (the local time zone's offset from UTC at that date).
    ///
    /// File names that are not UTF-8 are shown lossily here; [`ImageInfo::to_human_bytes`]
    /// has them byte for byte, as `qemu-img` prints them.
    pub fn to_human_with_offset(&self, utc_offset: &dyn Fn(i64) -> i64) -> String {
        String::from_utf8_lossy(&self.to_human_bytes(utc_offset)).into_owned()
    }

    /// [`ImageInfo::to_human_with_offset`] as bytes: file names (the image's, its backing
    /// file's) exactly as given or stored, UTF-8 or not, as `qemu-img info` prints them.
    pub fn to_human_bytes(&self, utc_offset: &dyn Fn(i64) -> i64) -> Vec<u8> {
        let mut out = Vec::new();
        image(&mut out, self, 0, "", utc_offset);
        out
    }

    /// Several images as `qemu-img info --backing-chain` prints them: separated by an empty
    /// line. Lossy where a file name is not UTF-8: see [`ImageInfo::chain_to_human_bytes`].
    ///
    /// ```
    /// use qcow2::{ImageInfo, OpenOptions};
    ///
    /// let chain = ImageInfo::chain_from_path("fixtures/chain-top.qcow2", &OpenOptions::new())?;
    /// let text = ImageInfo::chain_to_human(&chain, &|_secs| 0); // dates in UTC
    /// assert_eq!(text.lines().filter(|l| l.starts_with("image: ")).count(), 3);
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn chain_to_human(chain: &[ImageInfo], utc_offset: &dyn Fn(i64) -> i64) -> String {
        String::from_utf8_lossy(&Self::chain_to_human_bytes(chain, utc_offset)).into_owned()
    }

    /// [`ImageInfo::chain_to_human`] as bytes, file names byte for byte.
    pub fn chain_to_human_bytes(chain: &[ImageInfo], utc_offset: &dyn Fn(i64) -> i64) -> Vec<u8> {
        let texts: Vec<Vec<u8>> = chain
            .iter()
            .map(|info| info.to_human_bytes(utc_offset))
            .collect();
        texts.join(&b'\n')
    }

    /// The snapshot table as `qemu-img snapshot -l` prints it (nothing when there are no
    /// snapshots), dates shifted by `utc_offset(date)` seconds.
    pub fn snapshot_list(&self, utc_offset: &dyn Fn(i64) -> i64) -> String {
        let mut out = Vec::new();
        snapshots(&mut out, &self.snapshots, "", utc_offset);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_qemus() {
        // Expected strings are C's "%0.3g" outputs for these values (checked with printf).
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(459_264), "448 KiB");
        assert_eq!(size_to_str(1_179_648), "1.12 MiB"); // 1.125: ties to even
        assert_eq!(size_to_str(2 * 1024 * 1024), "2 MiB");
        assert_eq!(size_to_str(1_023_488), "1e+03 KiB"); // 999.5 KiB
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
        assert_eq!(g3(0.000_123_4), "0.000123");
        assert_eq!(g3(0.000_01), "1e-05");
        assert_eq!(g3(10.25), "10.2");
        assert_eq!(g3(250.5), "250");
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(date_time(0), "1970-01-01 00:00:00");
        assert_eq!(date_time(1_795_703_843), "2026-11-26 14:37:23");
        assert_eq!(date_time(u32::MAX.into()), "2106-02-07 06:28:15");
        assert_eq!(date_time(-1), "1969-12-31 23:59:59");
        assert_eq!(date_time(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn padding_counts_bytes() {
        assert_eq!(left("é", 4), "é  ");
        assert_eq!(right("ab", 4), "  ab");
        assert_eq!(left("longer than", 4), "longer than");
    }
}
