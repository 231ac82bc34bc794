//! Where QEMU has an opinion, the crate agrees with it: each test makes an image with
//! `qemu-img`/`qemu-io`, patches a few bytes where the case needs it, and asserts in the same
//! test what QEMU does with it (`qemu-img convert` succeeds with these bytes, or fails) and
//! that the crate does the same (the same bytes, or a specific `Error`).
//!
//! Needs `qemu-img` and `qemu-io`: without them each test prints a loud SKIPPED notice, or
//! fails when `CI=true`.

use crate::common;

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{describe_difference, Env};
use positioned_io::ReadAt;
use qcow2::{Error, FilePolicy, OpenOptions, Qcow2};

/// What the tests here ask of an [`Env`] beyond QEMU's tools: the crate's reading of an image,
/// next to QEMU's.
trait Compare {
    /// The crate's whole guest, opened by path (following backing and data files).
    fn crate_reads(&self, image: &str, options: &OpenOptions) -> Result<Vec<u8>, Error>;
    /// Both read `image` and get the same bytes.
    fn assert_same_read(&self, image: &str, options: &OpenOptions) -> Vec<u8>;
    /// QEMU refuses to read `image`; so does the crate, with an error `check` accepts.
    fn assert_both_refuse(&self, image: &str, check: impl Fn(&Error) -> bool);
}

impl Compare for Env {
    fn crate_reads(&self, image: &str, options: &OpenOptions) -> Result<Vec<u8>, Error> {
        let image = Qcow2::open_path_with(self.path(image), options)?;
        read_guest(&image)
    }

    fn assert_same_read(&self, image: &str, options: &OpenOptions) -> Vec<u8> {
        let theirs = self
            .qemu_reads(image)
            .unwrap_or_else(|e| panic!("{image}: qemu-img convert failed: {e}"));
        let ours = self
            .crate_reads(image, options)
            .unwrap_or_else(|e| panic!("{image}: the crate failed: {e}"));
        if let Some(diff) = describe_difference(image, 0, &ours, &theirs) {
            panic!("{diff}");
        }
        ours
    }

    fn assert_both_refuse(&self, image: &str, check: impl Fn(&Error) -> bool) {
        let theirs = self.qemu_reads(image);
        assert!(theirs.is_err(), "{image}: qemu-img convert read it");
        match self.crate_reads(image, &OpenOptions::new()) {
            Ok(_) => panic!(
                "{image}: the crate read it; QEMU said {}",
                theirs.unwrap_err()
            ),
            Err(e) => assert!(
                check(&e),
                "{image}: wrong error {e:?}; QEMU said {}",
                theirs.unwrap_err()
            ),
        }
    }
}

fn read_guest<I: ReadAt>(image: &Qcow2<I>) -> Result<Vec<u8>, Error> {
    let reader = image.reader()?;
    let mut buf = vec![0u8; reader.guest_size() as usize];
    reader.read_exact_at(0, &mut buf).map_err(|e| {
        match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(inner)) => *inner,
            Some(Err(other)) => Error::from_io("reading", std::io::Error::other(other)),
            None => Error::from_io("reading", std::io::Error::other("unknown")),
        }
    })?;
    Ok(buf)
}

fn be_u64(data: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(data[at as usize..at as usize + 8].try_into().unwrap())
}

fn be_u32(data: &[u8], at: u64) -> u32 {
    u32::from_be_bytes(data[at as usize..at as usize + 4].try_into().unwrap())
}

/// File offset of the (standard, 8-byte) L2 entry of guest cluster `index` in L2 table 0.
fn l2_entry_at(data: &[u8], index: u64) -> u64 {
    let l1 = be_u64(data, 40);
    let l2 = be_u64(data, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "no L2 table");
    l2 + 8 * index
}

#[test]
fn a_data_file_name_without_the_data_file_bit_is_reported_but_never_opened() {
    let Some(env) = Env::new("conf_datafile_nobit") else {
        return;
    };
    env.img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]);
    env.io("plain.qcow2", &["write -q -P 0xaa 0 64k"]);
    // Add a data-file extension naming a program, bit 2 clear: after the end marker at 112
    // there is room in the first cluster.
    let name = b"/usr/bin/qemu-img";
    let mut ext = 0x4441_5441u32.to_be_bytes().to_vec();
    ext.extend((name.len() as u32).to_be_bytes());
    ext.extend(name);
    ext.resize(ext.len().next_multiple_of(8) + 8, 0); // padding, then an end marker
    let data = env.read_file("plain.qcow2");
    env.patch("plain.qcow2", extensions_end(&data), &ext);
    let info = env.qemu.info_json(env.dir.path(), "plain.qcow2", false);
    assert_eq!(
        info["format-specific"]["data"]["data-file"], "/usr/bin/qemu-img",
        "qemu-img info reports the name: {info}"
    );
    let read = env.assert_same_read("plain.qcow2", &OpenOptions::new());
    assert!(read[..65536].iter().all(|&b| b == 0xaa));
    let image = Qcow2::open_path(env.path("plain.qcow2")).unwrap();
    assert_eq!(image.header().data_file(), Some("/usr/bin/qemu-img"));
    assert_eq!(image.header().external_data_file(), None);
    // Attaching a data file to it is refused, as QEMU refuses `data-file=` for it.
    let mut image = Qcow2::open(File::open(env.path("plain.qcow2")).unwrap()).unwrap();
    assert!(matches!(
        image.set_data_file(vec![0u8; 10]),
        Err(Error::DataFileNotUsed)
    ));
}

#[test]
fn data_file_raw_needs_a_data_file() {
    let Some(env) = Env::new("conf_datafile_raw") else {
        return;
    };
    env.img(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    let autoclear = be_u64(&env.read_file("img.qcow2"), 88);
    env.patch("img.qcow2", 88, &(autoclear | 2).to_be_bytes());
    env.assert_both_refuse("img.qcow2", |e| {
        matches!(e, Error::Malformed { offset: 88, .. })
    });
}

#[test]
fn a_data_cluster_away_from_its_guest_offset_in_a_data_file_is_an_error() {
    let Some(env) = Env::new("conf_datafile_offset") else {
        return;
    };
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data",
        "img.qcow2",
        "1M",
    ]);
    env.io("img.qcow2", &["write -q -P 0x5a 0 128k"]);
    env.assert_same_read("img.qcow2", &OpenOptions::new());
    let data = env.read_file("img.qcow2");
    let at = l2_entry_at(&data, 0);
    let entry = be_u64(&data, at);
    assert_eq!(
        entry & 0x00ff_ffff_ffff_fe00,
        0,
        "guest cluster 0 at host 0"
    );
    // Guest cluster 0 now claims host cluster 1.
    env.patch("img.qcow2", at, &(entry | 0x10000).to_be_bytes());
    env.assert_both_refuse("img.qcow2", |e| {
        matches!(e, Error::DataFileOffsetMismatch { host_offset: 0x10000, guest_offset: 0, entry_at }
            if *entry_at == at)
    });
}

#[test]
fn a_zero_flag_in_a_version_2_image_is_corruption() {
    let Some(env) = Env::new("conf_v2_zero") else {
        return;
    };
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1M",
    ]);
    env.io("v2.qcow2", &["write -q -P 0x33 0 64k"]);
    env.assert_same_read("v2.qcow2", &OpenOptions::new());
    let data = env.read_file("v2.qcow2");
    let at = l2_entry_at(&data, 0);
    env.patch("v2.qcow2", at, &(be_u64(&data, at) | 1).to_be_bytes());
    env.assert_both_refuse(
        "v2.qcow2",
        |e| matches!(e, Error::InvalidL2Entry { entry_at, .. } if *entry_at == at),
    );
}

#[test]
fn extensions_start_at_header_length_even_when_it_is_not_a_multiple_of_8() {
    let Some(env) = Env::new("conf_header_length") else {
        return;
    };
    env.img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    env.io("base.qcow2", &["write -q -P 0x44 0 64k"]);
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "1M",
    ]);
    // header_length 112 -> 108: the extensions move 4 bytes down, after the compression type.
    let data = env.read_file("top.qcow2");
    assert_eq!(be_u32(&data, 100), 112);
    let area = data[112..1024].to_vec();
    env.patch("top.qcow2", 100, &108u32.to_be_bytes());
    env.patch("top.qcow2", 108, &area);
    let name_at = be_u64(&data, 8);
    env.patch("top.qcow2", 8, &(name_at - 4).to_be_bytes());
    let info = env.qemu.info_json(env.dir.path(), "top.qcow2", false);
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    let read = env.assert_same_read("top.qcow2", &OpenOptions::new());
    assert!(read[..65536].iter().all(|&b| b == 0x44));
    let image = Qcow2::open_path(env.path("top.qcow2")).unwrap();
    assert_eq!(image.header().header_length(), 108);
    assert_eq!(image.header().backing_format(), Some("qcow2"));
}

#[test]
fn version_2_extensions_start_at_byte_72() {
    let Some(env) = Env::new("conf_v2_ext") else {
        return;
    };
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "base.qcow2",
        "1M",
    ]);
    env.io("base.qcow2", &["write -q -P 0x45 0 64k"]);
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "1M",
    ]);
    let data = env.read_file("top.qcow2");
    assert_eq!(
        be_u32(&data, 72),
        0xe279_2aca,
        "backing format extension at 72"
    );
    env.assert_same_read("top.qcow2", &OpenOptions::new());
    // What a v3 reader would take for header fields is an extension here: one of 0x7fffffff
    // bytes is too large for QEMU, and for us.
    let mut bogus = 0xdead_beefu32.to_be_bytes().to_vec();
    bogus.extend(0x7fff_ffffu32.to_be_bytes());
    env.patch("top.qcow2", 72, &bogus);
    env.assert_both_refuse("top.qcow2", |e| {
        matches!(e, Error::Malformed { offset: 72, .. })
    });
}

/// File offset of the end marker of the header extensions (version 3).
fn extensions_end(data: &[u8]) -> u64 {
    let mut at = u64::from(be_u32(data, 100));
    while be_u32(data, at) != 0 {
        at += 8 + u64::from(be_u32(data, at + 4)).next_multiple_of(8);
    }
    at
}

/// An overlay of `base` whose backing name (and format) are then replaced by `name` (and
/// `format`), written where qemu-img put the name.
fn overlay_named(env: &Env, top: &str, name: &[u8], format: Option<&[u8]>) {
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &"x".repeat(200),
        "-F",
        "qcow2",
        top,
        "1M",
    ]);
    let data = env.read_file(top);
    let name_at = be_u64(&data, 8);
    env.patch(top, 16, &(name.len() as u32).to_be_bytes());
    let mut padded = name.to_vec();
    padded.resize(200, 0);
    env.patch(top, name_at, &padded);
    if let Some(format) = format {
        // The backing-format extension is the first one, at 112.
        assert_eq!(be_u32(&data, 112), 0xe279_2aca);
        env.patch(top, 116, &(format.len() as u32).to_be_bytes());
        let mut f = format.to_vec();
        f.resize(8, 0);
        env.patch(top, 120, &f);
    }
}

#[test]
fn backing_names_are_c_strings_of_bytes() {
    let Some(env) = Env::new("conf_backing_names") else {
        return;
    };
    env.img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    env.io("base.qcow2", &["write -q -P 0x61 0 64k"]);
    // A name that ends at its first NUL.
    overlay_named(&env, "nul.qcow2", b"base.qcow2\0junk", None);
    let read = env.assert_same_read("nul.qcow2", &OpenOptions::new());
    assert!(read[..65536].iter().all(|&b| b == 0x61));
    // A backing format with trailing NULs is the format.
    overlay_named(&env, "fmt.qcow2", b"base.qcow2", Some(b"qcow2\0\0"));
    env.assert_same_read("fmt.qcow2", &OpenOptions::new());
    let image = Qcow2::open_path(env.path("fmt.qcow2")).unwrap();
    assert_eq!(image.header().backing_format(), Some("qcow2"));
    // A name of length 0: no backing file at all.
    overlay_named(&env, "empty.qcow2", b"", None);
    let read = env.assert_same_read("empty.qcow2", &OpenOptions::new());
    assert!(read.iter().all(|&b| b == 0));
    let image = Qcow2::open_path(env.path("empty.qcow2")).unwrap();
    assert_eq!(image.header().backing_file(), None);
    // A name that is not UTF-8 still finds its file.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"b\xffse.qcow2");
        std::fs::copy(env.path("base.qcow2"), env.dir.join(odd)).unwrap();
        overlay_named(&env, "odd.qcow2", b"b\xffse.qcow2", None);
        let read = env.assert_same_read("odd.qcow2", &OpenOptions::new());
        assert!(read[..65536].iter().all(|&b| b == 0x61));
        let image = Qcow2::open_path(env.path("odd.qcow2")).unwrap();
        assert_eq!(
            image.header().backing_file_bytes(),
            Some(&b"b\xffse.qcow2"[..])
        );
    }
}

#[test]
fn file_prefixed_backing_names_are_relative_to_the_current_directory() {
    let Some(env) = Env::new("conf_file_prefix") else {
        return;
    };
    std::fs::create_dir(env.path("vm")).unwrap();
    env.img(&["create", "-q", "-f", "qcow2", "vm/base.qcow2", "1M"]);
    env.io("vm/base.qcow2", &["write -q -P 0x62 0 64k"]);
    overlay_named(&env, "vm/top.qcow2", b"file:base.qcow2", Some(b"qcow2"));
    // From the temp dir, `file:base.qcow2` is ./base.qcow2, which does not exist: QEMU fails.
    assert!(env.qemu_reads("vm/top.qcow2").is_err());
    // The crate resolves it the same way: against the current directory, not vm/.
    let image = Qcow2::open(File::open(env.path("vm/top.qcow2")).unwrap()).unwrap();
    assert_eq!(image.header().backing_file(), Some("file:base.qcow2"));
    let cwd = std::env::current_dir().unwrap();
    let err = Qcow2::open_path(env.path("vm/top.qcow2")).unwrap_err();
    assert!(
        !cwd.join("base.qcow2").exists() && matches!(err, Error::Io { .. }),
        "{err:?}"
    );
    // Named absolutely, it is found.
    let abs = format!("file:{}", env.path("vm/base.qcow2").display());
    overlay_named(&env, "vm/abs.qcow2", abs.as_bytes(), Some(b"qcow2"));
    env.assert_same_read("vm/abs.qcow2", &OpenOptions::new());
}

/// An overlay of `backing` with no backing format recorded (qemu-img insists on one: its
/// extension is turned into an unknown one), so both readers probe the backing file.
fn overlay_unformatted(env: &Env, backing: &str, top: &str) {
    env.img(&[
        "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", top, "1M",
    ]);
    assert_eq!(be_u32(&env.read_file(top), 112), 0xe279_2aca);
    env.patch(top, 112, &0x1234_5678u32.to_be_bytes());
}

#[test]
fn backing_files_are_probed_as_qemu_probes_them() {
    let Some(env) = Env::new("conf_probe") else {
        return;
    };
    // (file content prefix, file name): QEMU takes each for a format other than raw and
    // refuses to use it; so does the crate (UnsupportedBackingFormat), rather than misreading
    // it as raw.
    let mut bochs = vec![0u8; 512];
    bochs[..22].copy_from_slice(b"Bochs Virtual HD Image");
    bochs[32..39].copy_from_slice(b"Redolog");
    bochs[48..55].copy_from_slice(b"Growing");
    bochs[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"COWD\x01\0\0\0".to_vec(), "cowd.img"),
        (b"KDMV\x01\0\0\0".to_vec(), "kdmv.img"),
        (bochs, "bochs.img"),
        (b"plain data".to_vec(), "image.dmg"),
    ];
    for (head, name) in cases {
        let mut file = head.clone();
        file.resize(1 << 20, 0);
        std::fs::write(env.path(name), &file).unwrap();
        let top = format!("top-{name}.qcow2");
        overlay_unformatted(&env, name, &top);
        let theirs = env.qemu_reads(&top);
        assert!(theirs.is_err(), "{name}: QEMU read it as raw");
        let ours = Qcow2::open_path(env.path(&top));
        assert!(
            matches!(ours, Err(Error::UnsupportedBackingFormat { .. })),
            "{name}: {:?} (QEMU: {})",
            ours.err(),
            theirs.unwrap_err()
        );
    }
    // The same bytes under an ordinary name and without a magic: raw, for both.
    std::fs::write(env.path("plain.img"), vec![0x63u8; 1 << 20]).unwrap();
    overlay_unformatted(&env, "plain.img", "top-plain.qcow2");
    env.assert_same_read("top-plain.qcow2", &OpenOptions::new());
}

#[test]
fn a_fifo_backing_file_is_refused_at_once() {
    let Some(env) = Env::new("conf_fifo") else {
        return;
    };
    let fifo = env.path("pipe");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "pipe",
        "-F",
        "raw",
        "top.qcow2",
        "1M",
    ]);
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "data.qcow2",
        "1M",
    ]);
    std::fs::remove_file(env.path("d.raw")).unwrap();
    let made = Command::new("mkfifo")
        .arg(env.path("d.raw"))
        .status()
        .expect("mkfifo");
    assert!(made.success());
    for (image, policy) in [
        ("top.qcow2", FilePolicy::Any),
        ("top.qcow2", FilePolicy::Under(env.dir.path().to_path_buf())),
        ("data.qcow2", FilePolicy::Any),
    ] {
        let started = Instant::now();
        let path = env.path(image);
        let options = OpenOptions::new().files(policy);
        let result = std::thread::spawn(move || Qcow2::open_path_with(path, &options).err())
            .join()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{image}: took {:?}",
            started.elapsed()
        );
        assert!(
            matches!(result, Some(Error::NotRegularFile { kind: "FIFO", .. })),
            "{image}: {result:?}"
        );
    }
    // The image itself may not be a FIFO either.
    let started = Instant::now();
    let err = Qcow2::open_path(&fifo).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(err, Error::NotRegularFile { .. }), "{err:?}");
    // Nor a directory or a character device.
    for other in [env.dir.path(), Path::new("/dev/zero")] {
        let err = Qcow2::open_path(other).unwrap_err();
        assert!(matches!(err, Error::NotRegularFile { .. }), "{err:?}");
    }
}

#[test]
fn under_holds_for_the_file_actually_opened() {
    let Some(env) = Env::new("conf_under") else {
        return;
    };
    std::fs::create_dir(env.path("jail")).unwrap();
    env.img(&["create", "-q", "-f", "qcow2", "secret.qcow2", "1M"]);
    env.io("secret.qcow2", &["write -q -P 0x66 0 64k"]);
    env.img(&["create", "-q", "-f", "qcow2", "jail/base.qcow2", "1M"]);
    env.io("jail/base.qcow2", &["write -q -P 0x67 0 64k"]);
    let under = || OpenOptions::new().files(FilePolicy::Under(env.path("jail")));
    // Inside: fine.
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "jail/ok.qcow2",
        "1M",
    ]);
    let read = env.crate_reads("jail/ok.qcow2", &under()).unwrap();
    assert!(read[..65536].iter().all(|&b| b == 0x67));
    // A symlink inside the directory that leads out of it: QEMU follows it, Under refuses.
    std::os::unix::fs::symlink(env.path("secret.qcow2"), env.path("jail/link.qcow2")).unwrap();
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "link.qcow2",
        "-F",
        "qcow2",
        "jail/escape.qcow2",
        "1M",
    ]);
    assert!(
        env.qemu_reads("jail/escape.qcow2").is_ok(),
        "QEMU follows it"
    );
    let err = env.crate_reads("jail/escape.qcow2", &under()).unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    // A `..` name that leads out.
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "../secret.qcow2",
        "-F",
        "qcow2",
        "jail/dotdot.qcow2",
        "1M",
    ]);
    let err = env.crate_reads("jail/dotdot.qcow2", &under()).unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    // A directory symlinked into the jail whose target is outside.
    std::os::unix::fs::symlink(env.dir.path(), env.path("jail/up")).unwrap();
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "up/secret.qcow2",
        "-F",
        "qcow2",
        "jail/updir.qcow2",
        "1M",
    ]);
    let err = env.crate_reads("jail/updir.qcow2", &under()).unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
}

/// The guest cluster `index` of `image` is compressed; append `input` at the end of the file
/// as its new compressed data (whole sectors) and point the descriptor there.
#[cfg(feature = "zstd")]
fn replace_compressed(env: &Env, image: &str, index: u64, input: &[u8]) {
    let mut data = env.read_file(image);
    let cluster_bits = be_u32(&data, 20);
    let at = l2_entry_at(&data, index);
    let entry = be_u64(&data, at);
    assert_ne!(entry & (1 << 62), 0, "cluster {index} is compressed");
    let host = data.len().next_multiple_of(512) as u64;
    data.resize(host as usize, 0);
    data.extend(input);
    data.resize(data.len().next_multiple_of(512), 0);
    let sectors = input.len().div_ceil(512) as u64;
    let shift = 62 - (cluster_bits - 8);
    let new = (1 << 62) | ((sectors - 1) << shift) | host;
    data[at as usize..at as usize + 8].copy_from_slice(&new.to_be_bytes());
    std::fs::write(env.path(image), data).unwrap();
}

#[cfg(feature = "zstd")]
#[test]
fn zstd_clusters_of_other_writers_read_as_qemu_reads_them() {
    use std::io::Write;
    let Some(env) = Env::new("conf_zstd") else {
        return;
    };
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(env.path("src.raw"), pattern.repeat(4)).unwrap();
    env.compress("src.raw", "z.qcow2", "compression_type=zstd");
    env.assert_same_read("z.qcow2", &OpenOptions::new());
    let cluster: Vec<u8> = (0..65536u32).map(|i| (i % 199) as u8).collect();
    // Cluster 1: three frames. Cluster 2: no content size, a 16 MiB window.
    let mut frames = zstd::bulk::compress(&cluster[..10000], 1).unwrap();
    frames.extend(zstd::bulk::compress(&cluster[10000..50000], 5).unwrap());
    frames.extend(zstd::bulk::compress(&cluster[50000..], 3).unwrap());
    replace_compressed(&env, "z.qcow2", 1, &frames);
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(24))
        .unwrap();
    enc.include_contentsize(false).unwrap();
    enc.write_all(&cluster).unwrap();
    replace_compressed(&env, "z.qcow2", 2, &enc.finish().unwrap());
    let read = env.assert_same_read("z.qcow2", &OpenOptions::new());
    assert_eq!(&read[65536..131072], &cluster[..]);
    assert_eq!(&read[131072..196608], &cluster[..]);
    // A cluster whose frames stop short is refused by both.
    replace_compressed(
        &env,
        "z.qcow2",
        3,
        &zstd::bulk::compress(&cluster[..1000], 1).unwrap(),
    );
    env.assert_both_refuse("z.qcow2", |e| {
        matches!(
            e,
            Error::BadCompressedCluster {
                guest_offset: 0x30000,
                ..
            }
        )
    });
}

#[cfg(feature = "zlib")]
#[test]
fn two_descriptors_at_one_host_offset_read_the_same_in_any_order() {
    let Some(env) = Env::new("conf_cache_key") else {
        return;
    };
    let pattern: Vec<u8> = (0..4 * 65536u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(env.path("src.raw"), &pattern).unwrap();
    env.compress("src.raw", "c.qcow2", "");
    // Cluster 1's descriptor: cluster 0's host offset, one sector longer (QEMU reads the extra
    // sector and ignores it once the cluster is full): the same data, a different key.
    let data = env.read_file("c.qcow2");
    let (at0, at1) = (l2_entry_at(&data, 0), l2_entry_at(&data, 1));
    let e0 = be_u64(&data, at0);
    let shift = 62 - (16 - 8);
    let sectors = (e0 >> shift) & ((1 << 8) - 1);
    let e1 = (e0 & !(((1u64 << 8) - 1) << shift)) | ((sectors + 1) << shift);
    env.patch("c.qcow2", at1, &e1.to_be_bytes());
    let theirs = env.qemu_reads("c.qcow2").expect("QEMU reads it");
    assert_eq!(&theirs[65536..131072], &theirs[..65536]);
    for order in [[0u64, 1], [1, 0]] {
        let image = Qcow2::open(File::open(env.path("c.qcow2")).unwrap()).unwrap();
        let reader = image.reader().unwrap();
        let mut got = [vec![0u8; 65536], vec![0u8; 65536]];
        for i in order {
            reader
                .read_exact_at(i * 65536, &mut got[i as usize])
                .unwrap();
        }
        assert_eq!(got[0], theirs[..65536], "order {order:?}");
        assert_eq!(got[1], theirs[65536..131072], "order {order:?}");
    }
}

#[test]
fn snapshot_read_errors_point_into_the_snapshot_l1_table() {
    let Some(env) = Env::new("conf_snap_l1") else {
        return;
    };
    env.img(&["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]);
    env.io("s.qcow2", &["write -q -P 0x71 0 64k"]);
    env.img(&["snapshot", "-c", "s1", "s.qcow2"]);
    let image = Qcow2::open(File::open(env.path("s.qcow2")).unwrap()).unwrap();
    let snap_l1 = image.snapshots()[0].l1_table_offset;
    assert_ne!(snap_l1, image.header().l1_table_offset());
    drop(image);
    let data = env.read_file("s.qcow2");
    let entry = be_u64(&data, snap_l1);
    env.patch("s.qcow2", snap_l1, &(entry | 0x200).to_be_bytes());
    let image = Qcow2::open(File::open(env.path("s.qcow2")).unwrap()).unwrap();
    let reader = image.snapshot_reader("s1").unwrap();
    let mut buf = [0u8; 512];
    let err = reader.read_exact_at(0, &mut buf).unwrap_err();
    let err = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
    assert!(
        matches!(err, Some(Error::Misaligned { what: "L2 table", at, .. }) if *at == snap_l1),
        "{err:?}"
    );
    // QEMU refuses to read that snapshot too.
    let out = Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args([
            "convert",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            "s.qcow2",
            "o.raw",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
