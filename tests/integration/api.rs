//! The public API's promises, on committed fixtures (no QEMU needed).

use std::fs::File;

use crate::common::fixture;
use positioned_io::{ReadAt, Size};
use qcow2::{Error, FilePolicy, OpenOptions, Qcow2, Reader};

fn qcow2_error(e: &std::io::Error) -> &Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .unwrap_or_else(|| panic!("not a qcow2::Error: {e}"))
}

#[test]
fn image_and_reader_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Qcow2<File>>();
    send_sync::<Qcow2<Vec<u8>>>();
    send_sync::<Reader<'static, File>>();
    send_sync::<Error>();
}

#[test]
fn reads_at_and_across_the_end() {
    let image = Qcow2::open(File::open(fixture("v3-odd-size.qcow2")).unwrap()).unwrap();
    let reader = image.reader().unwrap();
    let size = image.guest_size();
    assert_eq!(size, 1_000_448);
    assert_eq!(reader.size().unwrap(), Some(size));
    let mut buf = vec![0xEE; 10_000];
    assert_eq!(reader.read_at(size, &mut buf).unwrap(), 0);
    assert_eq!(reader.read_at(size + 12345, &mut buf).unwrap(), 0);
    assert_eq!(reader.read_at(size - 100, &mut buf).unwrap(), 100);
    assert!(reader.read_exact_at(size - 100, &mut buf).is_err());
    assert_eq!(reader.read_at(0, &mut []).unwrap(), 0);
}

#[test]
fn open_accepts_any_read_at() {
    let bytes = std::fs::read(fixture("v2-64k.qcow2")).unwrap();
    let from_vec = Qcow2::open(bytes.clone()).unwrap();
    let from_slice = Qcow2::open(&bytes[..]).unwrap();
    let (mut a, mut b) = (vec![0u8; 300_000], vec![0u8; 300_000]);
    from_vec
        .reader()
        .unwrap()
        .read_exact_at(12_345, &mut a)
        .unwrap();
    from_slice
        .reader()
        .unwrap()
        .read_exact_at(12_345, &mut b)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(from_vec.header().version(), 2);
}

#[test]
fn backing_file_is_never_opened_by_open() {
    let image = Qcow2::open(File::open(fixture("chain-top.qcow2")).unwrap()).unwrap();
    assert_eq!(image.header().backing_file(), Some("chain-mid.qcow2"));
    assert!(!image.has_backing_attached());
    let reader = image.reader().unwrap();
    let mut buf = vec![0u8; image.guest_size() as usize];
    let err = reader.read_exact_at(0, &mut buf).unwrap_err();
    assert!(
        matches!(qcow2_error(&err), Error::BackingMissing { name } if name == "chain-mid.qcow2")
    );
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    // An empty read needs no byte of the missing backing file.
    assert_eq!(reader.read_at(0, &mut []).unwrap(), 0);
    let mut one = [0u8; 1];
    assert!(reader.read_exact_at(0, &mut one).is_err());
}

#[test]
fn backing_zeros_on_request_and_manual_chain_matches_open_path() {
    let mut zeros = Qcow2::open(File::open(fixture("chain-top.qcow2")).unwrap()).unwrap();
    zeros.set_backing_zeros();
    let size = zeros.guest_size() as usize;
    let mut z = vec![0u8; size];
    zeros.reader().unwrap().read_exact_at(0, &mut z).unwrap();

    let mut mid = Qcow2::open(File::open(fixture("chain-mid.qcow2")).unwrap()).unwrap();
    mid.set_backing_image(Qcow2::open(File::open(fixture("chain-base.qcow2")).unwrap()).unwrap());
    let mut top = Qcow2::open(File::open(fixture("chain-top.qcow2")).unwrap()).unwrap();
    top.set_backing_image(mid);
    let mut manual = vec![0u8; size];
    top.reader().unwrap().read_exact_at(0, &mut manual).unwrap();

    let by_path = Qcow2::open_path(fixture("chain-top.qcow2")).unwrap();
    let mut expected = vec![0u8; size];
    by_path
        .reader()
        .unwrap()
        .read_exact_at(0, &mut expected)
        .unwrap();
    assert_eq!(manual, expected);
    assert_ne!(
        z, expected,
        "the chain's lower layers hold data the top does not"
    );
    // Wherever the zero-backed read has data, it is the top image's own data.
    for (i, (&a, &b)) in z.iter().zip(&expected).enumerate() {
        assert!(a == 0 || a == b, "byte {i}");
    }
    let info = by_path.info();
    assert_eq!(info.backing_chain.len(), 2);
    assert_eq!(info.backing_chain[1].format, "qcow2");
}

#[test]
fn open_policies() {
    let nothing = OpenOptions::new().files(FilePolicy::Nothing);
    let err = Qcow2::open_path_with(fixture("chain-top.qcow2"), &nothing)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Error::FileRefused {
                role: "backing file",
                ..
            }
        ),
        "{err}"
    );
    // An image naming no other file opens under any policy.
    Qcow2::open_path_with(fixture("v2-64k.qcow2"), &nothing).unwrap();

    // The backing file lies in fixtures/, not in this subdirectory of it.
    let elsewhere = fixture("hostile");
    let under = OpenOptions::new().files(FilePolicy::Under(elsewhere));
    let err = Qcow2::open_path_with(fixture("chain-top.qcow2"), &under)
        .err()
        .unwrap();
    assert!(matches!(err, Error::FileRefused { .. }), "{err}");
    let inside = OpenOptions::new().files(FilePolicy::Under(fixture("")));
    Qcow2::open_path_with(fixture("chain-top.qcow2"), &inside).unwrap();

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let callback = OpenOptions::new().files(FilePolicy::Callback(std::sync::Arc::new(
        move |path, role| {
            log.lock()
                .unwrap()
                .push((path.file_name().unwrap().to_owned(), role));
            if path.ends_with("chain-base.qcow2") {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "not this one",
                ));
            }
            File::open(path)
        },
    )));
    let err = Qcow2::open_path_with(fixture("chain-top.qcow2"), &callback)
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::FileRefused { ref reason, .. } if reason.contains("not this one")),
        "{err}"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);

    let zeros = OpenOptions::new()
        .files(FilePolicy::Nothing)
        .backing_as_zeros(true);
    Qcow2::open_path_with(fixture("chain-top.qcow2"), &zeros).unwrap();
}

#[test]
fn data_file_is_required_and_attachable() {
    let image = Qcow2::open(File::open(fixture("extdata.qcow2")).unwrap()).unwrap();
    assert_eq!(image.header().data_file(), Some("extdata.data"));
    assert!(matches!(
        image.reader().err().unwrap(),
        Error::DataFileMissing { .. }
    ));
    let mut image = image;
    image
        .set_data_file(File::open(fixture("extdata.data")).unwrap())
        .unwrap();
    let mut a = vec![0u8; image.guest_size() as usize];
    image.reader().unwrap().read_exact_at(0, &mut a).unwrap();
    let by_path = Qcow2::open_path(fixture("extdata.qcow2")).unwrap();
    let mut b = vec![0u8; a.len()];
    by_path.reader().unwrap().read_exact_at(0, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn refusals_name_what_is_refused() {
    let err = Qcow2::open(File::open(fixture("v3-corrupt.qcow2")).unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Corrupt));
    // Encrypted images open without their secret; reads are refused.
    let read_err = |name: &str| {
        let image = Qcow2::open(File::open(fixture(name)).unwrap()).unwrap();
        let io = image
            .reader()
            .unwrap()
            .read_exact_at(0, &mut [0u8; 512])
            .unwrap_err();
        assert_eq!(io.kind(), std::io::ErrorKind::Unsupported);
        io.into_inner()
            .unwrap()
            .downcast::<Error>()
            .map(|e| *e)
            .unwrap()
    };
    let err = read_err("luks.qcow2");
    assert!(
        matches!(
            err,
            Error::Encrypted {
                method: 2,
                name: "LUKS"
            }
        ),
        "{err}"
    );
    let err = read_err("aes.qcow2");
    assert!(matches!(err, Error::Encrypted { method: 1, .. }), "{err}");
    let err = Qcow2::open(File::open(fixture("backing-raw-base.raw")).unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotQcow2 { .. }), "{err}");
    let image = Qcow2::open_path(fixture("snap.qcow2")).unwrap();
    assert!(matches!(
        image.snapshot_reader("nope").err().unwrap(),
        Error::NoSuchSnapshot(_)
    ));
}

#[test]
fn header_facts_of_fixtures() {
    let dirty = Qcow2::open(File::open(fixture("v3-dirty.qcow2")).unwrap()).unwrap();
    assert!(dirty.header().is_dirty());
    assert!(dirty.info().dirty);
    let zstd = Qcow2::open(File::open(fixture("zstd-64k-convert.qcow2")).unwrap()).unwrap();
    assert_eq!(
        zstd.header().compression_type(),
        qcow2::CompressionType::Zstd
    );
    let names: Vec<String> = zstd
        .header()
        .features()
        .into_iter()
        .filter_map(|f| f.name)
        .collect();
    assert!(names.iter().any(|n| n == "compression type"), "{names:?}");
    let ext = Qcow2::open(File::open(fixture("extl2-64k.qcow2")).unwrap()).unwrap();
    assert!(ext.header().has_extended_l2());
    let bitmaps = Qcow2::open(File::open(fixture("bitmaps.qcow2")).unwrap()).unwrap();
    let names: Vec<&str> = bitmaps.bitmaps().iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["b0", "b1"]);
    let snap = Qcow2::open(File::open(fixture("snap.qcow2")).unwrap()).unwrap();
    let ids: Vec<&str> = snap.snapshots().iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["1", "2"]);
    // By id and by name, the same snapshot.
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
    snap.snapshot_reader("1")
        .unwrap()
        .read_exact_at(0, &mut a)
        .unwrap();
    snap.snapshot_reader("s1")
        .unwrap()
        .read_exact_at(0, &mut b)
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn guest_size_counts_whole_sectors_like_qemu() {
    // qemu-img info reports a header size of 1000448 + 100 as 1000448.
    let mut bytes = std::fs::read(fixture("v3-odd-size.qcow2")).unwrap();
    bytes[24..32].copy_from_slice(&(1_000_448u64 + 100).to_be_bytes());
    let image = Qcow2::open(bytes).unwrap();
    assert_eq!(image.header().size(), 1_000_548);
    assert_eq!(image.guest_size(), 1_000_448);
    assert_eq!(image.reader().unwrap().guest_size(), 1_000_448);
    assert_eq!(image.info().virtual_size, 1_000_448);
}

#[test]
fn data_cluster_wholly_past_the_end_of_the_file_is_an_error() {
    // Full preallocation: the last data clusters end the file, contiguous with the ones before.
    let mut bytes = std::fs::read(fixture("prealloc-full.qcow2")).unwrap();
    let image = Qcow2::open(bytes.clone()).unwrap();
    let cluster = image.cluster_size() as usize;
    let size = image.guest_size() as usize;
    // Cut half a cluster: the last cluster is short and reads as zeros there, like QEMU.
    bytes.truncate(bytes.len() - cluster / 2);
    let image = Qcow2::open(bytes.clone()).unwrap();
    let mut buf = vec![0xAAu8; size];
    image.reader().unwrap().read_exact_at(0, &mut buf).unwrap();
    assert!(buf[size - cluster / 2..].iter().all(|&b| b == 0));
    // Cut a whole cluster more: one read spanning both clusters must not invent zeros.
    bytes.truncate(bytes.len() - cluster);
    let image = Qcow2::open(bytes).unwrap();
    let err = image
        .reader()
        .unwrap()
        .read_exact_at(0, &mut buf)
        .unwrap_err();
    assert!(
        matches!(
            qcow2_error(&err),
            Error::PastEnd {
                what: "data cluster",
                ..
            }
        ),
        "{err}"
    );
}

#[cfg(feature = "zlib")]
#[test]
fn decompression_threads_do_not_change_what_is_read() {
    let read_all = |options: &OpenOptions| {
        let image = Qcow2::open_path_with(fixture("zlib-64k-convert.qcow2"), options).unwrap();
        let mut all = vec![0u8; image.guest_size() as usize];
        image.reader().unwrap().read_exact_at(0, &mut all).unwrap();
        all
    };
    let one = read_all(&OpenOptions::new().threads(1));
    let four = read_all(&OpenOptions::new().threads(4));
    let default = read_all(&OpenOptions::new());
    assert_eq!(one, four);
    assert_eq!(one, default);
    assert!(one.iter().any(|&b| b != 0));
}
