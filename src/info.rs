//! What `qemu-img info` reports about an image.

use positioned_io::ReadAt;

use crate::bitmap::Bitmap;
use crate::header::Header;
use crate::image::{Backing, ImageView, Qcow2};
use crate::snapshot::Snapshot;

/// One image of a backing chain, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// The path it was opened from, when known.
    pub filename: Option<String>,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Its virtual size.
    pub virtual_size: u64,
}

/// Image information, as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The path the image was opened from, when known.
    pub filename: Option<String>,
    /// Always `qcow2`.
    pub format: &'static str,
    /// `0.10` for version 2, `1.1` for version 3 (QEMU's `compat`).
    pub compat: &'static str,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts (compatible bit 0).
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// The dirty bit.
    pub dirty: bool,
    /// The corrupt bit.
    pub corrupt: bool,
    /// The backing file name as stored in the header.
    pub backing_filename: Option<String>,
    /// The backing format from the header extension.
    pub backing_filename_format: Option<String>,
    /// The backing file name resolved against this image's directory, as QEMU resolves it
    /// (known when the image was opened by path).
    pub full_backing_filename: Option<String>,
    /// The external data file name.
    pub data_file: Option<String>,
    /// Whether the external data file is a raw image by itself.
    pub data_file_raw: bool,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Persistent dirty bitmaps.
    pub bitmaps: Vec<Bitmap>,
    /// The whole backing chain below this image, as far as it is attached, nearest first.
    pub backing_chain: Vec<ChainEntry>,
}

impl<I: ReadAt + Send + Sync> Qcow2<I> {
    /// What `qemu-img info` reports for this image.
    pub fn info(&self) -> ImageInfo {
        info_of(self)
    }
}

fn info_of(view: &dyn ImageView) -> ImageInfo {
    let h: &Header = view.header();
    ImageInfo {
        filename: view.path().map(|p| p.display().to_string()),
        format: "qcow2",
        compat: if h.version() >= 3 { "1.1" } else { "0.10" },
        virtual_size: h.size() & !511, // QEMU counts whole sectors
        cluster_size: h.cluster_size(),
        compression_type: h.compression_type().name(),
        refcount_bits: h.refcount_bits(),
        lazy_refcounts: h.has_lazy_refcounts(),
        extended_l2: h.has_extended_l2(),
        dirty: h.is_dirty(),
        corrupt: h.is_corrupt(),
        backing_filename: h.backing_file().map(str::to_owned),
        backing_filename_format: h.backing_format().map(str::to_owned),
        full_backing_filename: match (view.path(), h.backing_file_path()) {
            (Some(path), Some(name)) => crate::open::resolve(path, name)
                .ok()
                .map(|p| p.display().to_string()),
            _ => None,
        },
        data_file: h.data_file().map(str::to_owned),
        data_file_raw: h.is_data_file_raw(),
        snapshots: view.snapshots().to_vec(),
        bitmaps: view.bitmaps().to_vec(),
        backing_chain: chain_below(view),
    }
}

fn chain_below(view: &dyn ImageView) -> Vec<ChainEntry> {
    let mut chain = Vec::new();
    let mut current = view.backing();
    while let Some(Backing::Source { source, format }) = current {
        let image = source.as_image();
        chain.push(ChainEntry {
            filename: source.path().map(|p| p.display().to_string()),
            format: (*format).to_owned(),
            virtual_size: source.guest_size(),
        });
        current = image.and_then(|i| i.backing());
    }
    chain
}

impl ImageInfo {
    /// The information as `qemu-img info --output=json` prints it for this image: the same
    /// field names and values (fields about the host file, such as `actual-size`, are left out).
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/snap.qcow2")?;
    /// let json = image.info().to_json();
    /// assert!(json.contains("\"virtual-size\": 2097152"));
    /// assert!(json.contains("\"name\": \"s1\""));
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn to_json(&self) -> String {
        let mut top = Json::object();
        top.num("virtual-size", self.virtual_size);
        if let Some(f) = &self.filename {
            top.str("filename", f);
        }
        top.num("cluster-size", self.cluster_size);
        top.str("format", self.format);
        if let Some(b) = &self.backing_filename {
            top.str("backing-filename", b);
        }
        if let Some(b) = &self.full_backing_filename {
            top.str("full-backing-filename", b);
        }
        if let Some(f) = &self.backing_filename_format {
            top.str("backing-filename-format", f);
        }
        top.bool("dirty-flag", self.dirty);
        if !self.snapshots.is_empty() {
            let list: Vec<String> = self.snapshots.iter().map(snapshot_json).collect();
            top.raw("snapshots", &array(&list));
        }
        let mut data = Json::object();
        data.str("compat", self.compat);
        data.str("compression-type", self.compression_type);
        if self.compat != "0.10" {
            data.bool("lazy-refcounts", self.lazy_refcounts);
            if !self.bitmaps.is_empty() {
                let list: Vec<String> = self.bitmaps.iter().map(bitmap_json).collect();
                data.raw("bitmaps", &array(&list));
            }
        }
        data.num("refcount-bits", u64::from(self.refcount_bits));
        if self.compat != "0.10" {
            if let Some(d) = &self.data_file {
                data.str("data-file", d);
            }
            if self.data_file.is_some() || self.data_file_raw {
                data.bool("data-file-raw", self.data_file_raw);
            }
            data.bool("corrupt", self.corrupt);
            data.bool("extended-l2", self.extended_l2);
        }
        let mut specific = Json::object();
        specific.str("type", "qcow2");
        specific.raw("data", &data.finish());
        top.raw("format-specific", &specific.finish());
        top.finish()
    }
}

impl std::fmt::Display for ImageInfo {
    /// The human-readable form, close to `qemu-img info`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(name) = &self.filename {
            writeln!(f, "image: {name}")?;
        }
        writeln!(f, "file format: {}", self.format)?;
        writeln!(f, "virtual size: {} bytes", self.virtual_size)?;
        writeln!(f, "cluster_size: {}", self.cluster_size)?;
        if let Some(b) = &self.backing_filename {
            writeln!(f, "backing file: {b}")?;
        }
        if let Some(b) = &self.backing_filename_format {
            writeln!(f, "backing file format: {b}")?;
        }
        if !self.snapshots.is_empty() {
            writeln!(f, "Snapshot list:")?;
            writeln!(
                f,
                "{:<8}{:<18}{:>12} {:>20} {:>16}",
                "ID", "TAG", "VM_SIZE", "DATE (s)", "VM_CLOCK (ns)"
            )?;
            for s in &self.snapshots {
                writeln!(
                    f,
                    "{:<8}{:<18}{:>12} {:>20} {:>16}",
                    s.id, s.name, s.vm_state_size, s.date_sec, s.vm_clock_nsec
                )?;
            }
        }
        writeln!(f, "Format specific information:")?;
        writeln!(f, "    compat: {}", self.compat)?;
        writeln!(f, "    compression type: {}", self.compression_type)?;
        writeln!(f, "    lazy refcounts: {}", self.lazy_refcounts)?;
        if !self.bitmaps.is_empty() {
            writeln!(f, "    bitmaps:")?;
            for b in &self.bitmaps {
                writeln!(
                    f,
                    "        {} (granularity {}, flags [{}])",
                    b.name,
                    b.granularity,
                    b.flag_names().join(", ")
                )?;
            }
        }
        writeln!(f, "    refcount bits: {}", self.refcount_bits)?;
        if let Some(d) = &self.data_file {
            writeln!(f, "    data file: {d}")?;
            writeln!(f, "    data file raw: {}", self.data_file_raw)?;
        }
        writeln!(f, "    corrupt: {}", self.corrupt)?;
        writeln!(f, "    extended l2: {}", self.extended_l2)?;
        writeln!(f, "    dirty: {}", self.dirty)?;
        for (depth, link) in self.backing_chain.iter().enumerate() {
            let name = link.filename.as_deref().unwrap_or("(attached source)");
            writeln!(
                f,
                "backing chain [{}]: {name} ({}, {} bytes)",
                depth.saturating_add(1),
                link.format,
                link.virtual_size
            )?;
        }
        Ok(())
    }
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

fn snapshot_json(s: &Snapshot) -> String {
    let mut o = Json::object();
    o.str("id", &s.id);
    o.str("name", &s.name);
    o.num("vm-state-size", s.vm_state_size);
    o.num("date-sec", u64::from(s.date_sec));
    o.num("date-nsec", u64::from(s.date_nsec));
    o.num("vm-clock-sec", s.vm_clock_nsec / NANOS_PER_SEC);
    o.num("vm-clock-nsec", s.vm_clock_nsec % NANOS_PER_SEC);
    // QEMU stores -1 when the icount was not recorded, and then leaves it out.
    if let Some(icount) = s.icount.filter(|&i| i != u64::MAX) {
        o.num("icount", icount);
    }
    o.finish()
}

fn bitmap_json(b: &Bitmap) -> String {
    let mut o = Json::object();
    let flags: Vec<String> = b.flag_names().iter().map(|f| quote(f)).collect();
    o.raw("flags", &array(&flags));
    o.str("name", &b.name);
    o.num("granularity", b.granularity);
    o.finish()
}

/// A minimal JSON object writer: enough for `to_json`, without a serialization dependency.
struct Json {
    fields: Vec<String>,
}

impl Json {
    fn object() -> Self {
        Json { fields: Vec::new() }
    }
    fn raw(&mut self, key: &str, value: &str) {
        self.fields.push(format!("{}: {value}", quote(key)));
    }
    fn str(&mut self, key: &str, value: &str) {
        self.raw(key, &quote(value));
    }
    fn num(&mut self, key: &str, value: u64) {
        self.raw(key, &value.to_string());
    }
    fn bool(&mut self, key: &str, value: bool) {
        self.raw(key, if value { "true" } else { "false" });
    }
    fn finish(self) -> String {
        format!("{{{}}}", self.fields.join(", "))
    }
}

fn array(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

/// A JSON string literal: names in images are untrusted, so everything is escaped.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len().saturating_add(2));
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_control_characters() {
        assert_eq!(quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
