//! Opening an image by path: following its backing chain and data file under a [`FilePolicy`].

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::header::MAGIC;
use crate::image::Qcow2;
use crate::io::read_up_to;
use crate::options::{FilePolicy, FileRole, OpenOptions};

impl Qcow2<File> {
    /// Open an image by path as `qemu-img` does: follow its backing chain (names resolved
    /// relative to the directory of the image that names them) and open its external data
    /// file, with default options ([`FilePolicy::Any`]).
    ///
    /// ```
    /// use positioned_io::ReadAt;
    ///
    /// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
    /// let mut buf = vec![0u8; 4096];
    /// image.reader()?.read_exact_at(0, &mut buf)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_path_with(path, &OpenOptions::default())
    }

    /// Open an image by path, opening other files only as `options.files` allows.
    pub fn open_path_with(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut visited = HashSet::new();
        visited.insert(canonical(path)?);
        open_chain_link(file, path.to_path_buf(), options, &mut visited, 0)
    }
}

/// Open one qcow2 image of a chain and, below it, the rest. Depth is bounded by the limits,
/// so the recursion is too.
fn open_chain_link(
    file: File,
    path: PathBuf,
    options: &OpenOptions,
    visited: &mut HashSet<PathBuf>,
    depth: u32,
) -> Result<Qcow2<File>> {
    let secret = options.secret_for_path(&path);
    let mut image = Qcow2::open_with_secret(file, options, secret.as_ref())?;
    image.path = Some(path.clone());
    if let Some(name) = image.header().data_file().map(str::to_owned) {
        let data_path = resolve(&path, &name)?;
        let data = open_allowed(&data_path, FileRole::DataFile, &options.files)?;
        image.set_data_file(data);
    }
    let Some(name) = image.header().backing_file().map(str::to_owned) else {
        return Ok(image);
    };
    if options.backing_as_zeros {
        image.set_backing_zeros();
        return Ok(image);
    }
    let next_depth = depth.saturating_add(1);
    if next_depth > options.limits.max_chain_depth {
        return Err(Error::BackingChain {
            path,
            reason: format!(
                "backing chain deeper than {}",
                options.limits.max_chain_depth
            ),
        });
    }
    let backing_path = resolve(&path, &name)?;
    let file = open_allowed(&backing_path, FileRole::Backing, &options.files)?;
    if !visited.insert(canonical(&backing_path).unwrap_or_else(|_| backing_path.clone())) {
        return Err(Error::BackingChain {
            path: backing_path,
            reason: "backing chain loops back to an image already in it".to_owned(),
        });
    }
    let format = match image.header().backing_format() {
        Some(f) => f.to_owned(),
        None => probe_format(&file, &backing_path)?.to_owned(),
    };
    match format.as_str() {
        "qcow2" => {
            let backing = open_chain_link(file, backing_path, options, visited, next_depth)?;
            image.set_backing_image(backing);
        }
        "raw" | "file" => {
            let size = file
                .metadata()
                .map_err(|e| {
                    Error::io(format!("reading the size of {}", backing_path.display()), e)
                })?
                .len();
            // QEMU counts a raw file in whole sectors: the partial last one reads as zeros.
            let size = size.checked_next_multiple_of(512).unwrap_or(size);
            image.set_backing_raw_from(file, size, Some(backing_path));
        }
        _ => {
            return Err(Error::UnsupportedBackingFormat {
                format,
                path: backing_path,
            })
        }
    }
    Ok(image)
}

/// QEMU's rule without a backing format: probe the content. qcow2's magic means qcow2; the
/// magic of another format QEMU knows means that format (which we then refuse rather than
/// misread as raw); anything else is raw.
fn probe_format(file: &File, path: &Path) -> Result<&'static str> {
    let mut head = [0u8; 512];
    let got = read_up_to(file, 0, &mut head)
        .map_err(|e| Error::io(format!("probing {}", path.display()), e))?;
    Ok(probe_bytes(head.get(..got).unwrap_or_default()))
}

/// The format whose signature starts `head`, as QEMU's format probes would name it.
fn probe_bytes(head: &[u8]) -> &'static str {
    const SIGNATURES: &[(usize, &[u8], &str)] = &[
        (0, b"KDMV", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"QED\0", "qed"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"XenIxHYPVFS", "bochs"),
        (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    ];
    if head.get(..4) == Some(&MAGIC.to_be_bytes()[..]) {
        // Version 1 is the old qcow format, not qcow2.
        return if head.get(4..8) == Some(&1u32.to_be_bytes()[..]) {
            "qcow"
        } else {
            "qcow2"
        };
    }
    SIGNATURES
        .iter()
        .find(|(at, sig, _)| head.get(*at..at.saturating_add(sig.len())) == Some(*sig))
        .map_or("raw", |(_, _, name)| *name)
}

/// Resolve a name from an image header against the directory of the image naming it.
pub(crate) fn resolve(image: &Path, name: &str) -> Result<PathBuf> {
    let name = name.strip_prefix("file:").unwrap_or(name);
    if has_protocol(name) {
        return Err(Error::FileRefused {
            path: PathBuf::from(name),
            role: "backing or data file",
            reason: "protocol and json: file names are not supported".to_owned(),
        });
    }
    let name = Path::new(name);
    if name.is_absolute() {
        return Ok(name.to_path_buf());
    }
    Ok(image.parent().unwrap_or(Path::new("")).join(name))
}

/// QEMU's `path_has_protocol`: a colon before any slash.
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
    }
}

fn canonical(path: &Path) -> Result<PathBuf> {
    path.canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", path.display()), e))
}

fn open_allowed(path: &Path, role: FileRole, policy: &FilePolicy) -> Result<File> {
    let refuse = |reason: String| Error::FileRefused {
        path: path.to_path_buf(),
        role: role.describe(),
        reason,
    };
    let open = || {
        File::open(path)
            .map_err(|e| Error::io(format!("opening {} {}", role.describe(), path.display()), e))
    };
    match policy {
        FilePolicy::Any => open(),
        FilePolicy::Nothing => Err(refuse("the open policy allows no other files".to_owned())),
        FilePolicy::Under(dir) => {
            let dir = canonical(dir)?;
            let target = canonical(path)?;
            if !target.starts_with(&dir) {
                return Err(refuse(format!("it is not under {}", dir.display())));
            }
            // Open the resolved path so a symlink swapped in after the check cannot escape.
            File::open(&target).map_err(|e| Error::io(format!("opening {}", target.display()), e))
        }
        FilePolicy::Callback(f) => f(path, role).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => refuse(e.to_string()),
            _ => Error::io(format!("opening {} {}", role.describe(), path.display()), e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_like_qemu() {
        let img = Path::new("/images/vm/top.qcow2");
        assert_eq!(
            resolve(img, "base.qcow2").unwrap(),
            Path::new("/images/vm/base.qcow2")
        );
        assert_eq!(
            resolve(img, "../b.raw").unwrap(),
            Path::new("/images/vm/../b.raw")
        );
        assert_eq!(
            resolve(img, "/abs/b.qcow2").unwrap(),
            Path::new("/abs/b.qcow2")
        );
        assert_eq!(
            resolve(img, "file:b.qcow2").unwrap(),
            Path::new("/images/vm/b.qcow2")
        );
        assert!(resolve(img, "nbd://host/export").is_err());
        assert!(resolve(img, "json:{\"driver\":\"file\"}").is_err());
        assert!(!has_protocol("dir/with:colon"));
    }

    #[test]
    fn probing_names_formats_it_does_not_read() {
        let mut qcow2 = MAGIC.to_be_bytes().to_vec();
        qcow2.extend(3u32.to_be_bytes());
        assert_eq!(probe_bytes(&qcow2), "qcow2");
        qcow2[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(probe_bytes(&qcow2), "qcow");
        assert_eq!(probe_bytes(b"KDMV\x01\x00"), "vmdk");
        let mut vdi = vec![0u8; 0x44];
        vdi[0x40..].copy_from_slice(b"\x7f\x10\xda\xbe");
        assert_eq!(probe_bytes(&vdi), "vdi");
        assert_eq!(probe_bytes(b"just some disk bytes"), "raw");
        assert_eq!(probe_bytes(b""), "raw");
    }
}
