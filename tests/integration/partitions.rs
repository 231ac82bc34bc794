//! `examples/partitions.rs` reads the MBR of `fixtures/partitioned.qcow2` through the crate;
//! the partitions it lists equal those `sfdisk --json` lists on the raw disk `qemu-img`
//! converts the image to.

use crate::common;

#[path = "../../examples/partitions.rs"]
mod example;

use serde_json::Value;

#[test]
fn partitions_read_through_the_crate_equal_sfdisk_on_qemu_img_raw() {
    let Some(qemu) = common::Qemu::find_or_skip("partitions_equal_sfdisk") else {
        return;
    };
    let Some(sfdisk) = common::find_tool("sfdisk", "SFDISK")
        .or_else(|| Some(std::path::PathBuf::from("/usr/sbin/sfdisk")).filter(|p| p.is_file()))
    else {
        common::missing_tool("partitions_equal_sfdisk", "sfdisk (Debian package fdisk)");
        return;
    };
    let tmp = common::TempDir::new("partitions");
    let raw = tmp.join("disk.raw");
    let fixture = common::fixtures_dir().join("partitioned.qcow2");
    qemu.img(
        tmp.path(),
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            fixture.as_os_str(),
            raw.as_os_str(),
        ],
    );
    let out = common::run(std::process::Command::new(sfdisk).arg("--json").arg(&raw));
    let table: Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = &table["partitiontable"];
    assert_eq!(table["label"], "dos");
    assert_eq!(table["sectorsize"], 512);
    let theirs: Vec<example::Partition> = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let number = node.strip_prefix(raw.to_str().unwrap()).unwrap();
            example::Partition {
                number: number.parse().unwrap(),
                start: p["start"].as_u64().unwrap(),
                sectors: p["size"].as_u64().unwrap(),
                kind: u8::from_str_radix(p["type"].as_str().unwrap(), 16).unwrap(),
                bootable: p["bootable"].as_bool().unwrap_or(false),
            }
        })
        .collect();

    let image = qcow2::Qcow2::open_path(&fixture).unwrap();
    let reader = image.reader().unwrap();
    let ours = example::partitions(&reader).unwrap();
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 5, "primary, extended and logical partitions");
}
