//! The disks the commands read: a qcow2 image (with its chain) or a raw file, by the format
//! given with `-f` or probed from the file's first bytes, as qemu-img probes.

use std::fs::File;
use std::path::Path;

use positioned_io::ReadAt;
use qcow2::{OpenOptions, Qcow2, RawDisk};

use crate::common;

/// A disk opened by path.
pub enum Disk {
    /// A qcow2 image, its backing chain opened.
    Image(Box<Qcow2<File>>),
    /// A raw file: its holes (which the file system reports) read as zeros, as in QEMU's
    /// block status, so a sparse file is read by its data only.
    Raw(RawDisk<File>),
}

impl Disk {
    /// Open `path` as `format`, or as the format its first bytes say (qcow2's magic, else
    /// raw); an encrypted image is unlocked with the secret given as qemu-img takes it.
    pub fn open(
        path: &Path,
        format: Option<&str>,
        secret: &crate::secret::SecretArgs,
    ) -> Result<Disk, String> {
        let fail = |e: &dyn std::fmt::Display| common::could_not_open(path, e);
        // Opened once, without blocking, and checked on the descriptor: a FIFO cannot hang
        // the open, and the file probed is the file read.
        let file = qcow2::open_file(path, &OpenOptions::new().allow_devices(true))
            .map_err(|e| fail(&common::chain(&e)))?;
        let format = match format {
            Some(f) => f.to_owned(),
            None => probe(&file)
                .map_err(|e| fail(&common::chain(&e)))?
                .to_owned(),
        };
        match format.as_str() {
            "qcow2" => {
                drop(file);
                Ok(Disk::Image(Box::new(crate::convert::open_image(
                    path, secret,
                )?)))
            }
            "raw" => Ok(Disk::Raw(
                RawDisk::from_file(file).map_err(|e| fail(&common::chain(&e)))?,
            )),
            other => Err(fail(&format!(
                "unsupported format '{other}' (qcow2 and raw are read)"
            ))),
        }
    }
}

/// `qcow2` when the file starts with qcow2's magic, else `raw`.
fn probe(file: &File) -> std::io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        let n = file.read_at(got as u64, &mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(if got == 4 && u32::from_be_bytes(magic) == qcow2::MAGIC {
        "qcow2"
    } else {
        "raw"
    })
}
