//! List the partitions of the guest disk in a qcow2 image, with a partition-table crate
//! (`mbrman`) reading through the crate: a [`qcow2::Reader`] is `ReadAt + Size`, and
//! `positioned_io::SizeCursor` turns it into the `Read + Seek` such crates take.
//!
//! ```sh
//! cargo run --example partitions -- fixtures/partitioned.qcow2
//! ```
//!
//! Prints one line per partition: number, first sector, sectors, type, `*` when bootable.

use positioned_io::{ReadAt, Size, SizeCursor};

/// One partition of an MBR table (sectors of 512 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-4 for primary partitions, 5 and up for logical ones.
    pub number: usize,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub sectors: u64,
    /// The MBR type byte (0x83 Linux, 0x05 extended, ...).
    pub kind: u8,
    /// The boot flag is set.
    pub bootable: bool,
}

/// The MBR partitions of a guest disk, read through any `ReadAt + Size` (a `qcow2::Reader`).
pub fn partitions<R: ReadAt + Size>(disk: R) -> Result<Vec<Partition>, mbrman::Error> {
    let mut cursor = SizeCursor::new(disk);
    let mbr = mbrman::MBR::read_from(&mut cursor, 512)?;
    Ok(mbr
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(number, p)| Partition {
            number,
            start: u64::from(p.starting_lba),
            sectors: u64::from(p.sectors),
            kind: p.sys,
            bootable: p.is_active(),
        })
        .collect())
}

#[allow(dead_code)] // the tests include this file for `partitions` alone
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: partitions IMAGE.qcow2")?;
    let image = qcow2::Qcow2::open_path(&path)?;
    let reader = image.reader()?;
    for p in partitions(&reader)? {
        let boot = if p.bootable { "\t*" } else { "" };
        println!(
            "{}\t{}\t{}\t{:#04x}{boot}",
            p.number, p.start, p.sectors, p.kind
        );
    }
    Ok(())
}
