//! The 0.3 API's style: one builder style, `Debug` everywhere, error chains that show each
//! text once, the typed error behind `io::Error`, short files, `FilePolicy::Under("")`.

use std::error::Error as _;
use std::fmt::Debug;
use std::path::PathBuf;

use crate::common::fixture;
// The re-export is the very crate the API uses: its traits are the ones `Reader` implements.
use qcow2::positioned_io::{ReadAt, Size};
use qcow2::{
    Chunk, Error, FilePolicy, OpenOptions, ParallelReadOptions, PositionalSink, Qcow2, Secret,
};

/// Every text of the chain `err`, `err.source()`, ..., joined as chain printers do.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text += ": ";
        text += &cause.to_string();
        source = cause.source();
    }
    text
}

#[test]
fn positioned_io_is_reexported() {
    let image = Qcow2::open_path(fixture("v3-64k-basic.qcow2")).unwrap();
    let reader = image.reader().unwrap();
    fn read_at<R: qcow2::positioned_io::ReadAt + Size>(r: &R) -> u64 {
        let mut b = [0u8; 1];
        r.read_at(0, &mut b).unwrap();
        r.size().unwrap().unwrap()
    }
    assert_eq!(read_at(&reader), image.guest_size());
}

#[test]
fn public_types_are_debug() {
    fn debug<T: Debug>(_: &T) {}
    let image = Qcow2::open_path(fixture("bitmaps.qcow2")).unwrap();
    let reader = image.reader().unwrap();
    let map = reader.map(..);
    let text = format!("{reader:?} {map:?}");
    assert!(
        text.contains("Reader") && text.contains("MapIter"),
        "{text}"
    );
    debug(&image.dirty_extents("b0").unwrap());
    debug(&OpenOptions::new());
    debug(&ParallelReadOptions::new());
    debug(&qcow2::ConvertOptions::new());
    debug(&qcow2::CompareOptions::new());
    debug(&Secret::new("x"));
}

#[test]
fn secret_takes_a_secret_and_what_converts_into_one() {
    let path = fixture("luks.qcow2");
    let unlocked = |options: OpenOptions| {
        Qcow2::open_path_with(&path, &options)
            .unwrap()
            .reader()
            .unwrap()
            .read_at(0, &mut [0u8; 512])
            .is_ok()
    };
    if !cfg!(feature = "encryption") {
        return;
    }
    assert!(unlocked(OpenOptions::new().secret(Secret::new("abc"))));
    let secret = Secret::from("abc");
    assert!(unlocked(OpenOptions::new().secret(&secret)));
    assert!(unlocked(OpenOptions::new().secret(String::from("abc"))));
    let text = String::from("abc");
    assert!(unlocked(OpenOptions::new().secret(&text)));
    assert!(unlocked(OpenOptions::new().secret(b"abc")));
    assert!(unlocked(OpenOptions::new().secret(&b"abc"[..])));
    assert!(unlocked(OpenOptions::new().secret(b"abc".to_vec())));
    let bytes = b"abc".to_vec();
    assert!(unlocked(OpenOptions::new().secret(&bytes)));
    assert!(unlocked(OpenOptions::new().secret(*b"abc")));
    assert!(unlocked(
        OpenOptions::new().secret(bytes.into_boxed_slice())
    ));
    assert!(unlocked(OpenOptions::new().secret("abc")));
}

#[test]
fn under_an_empty_path_is_the_current_directory() {
    // Tests run in the crate's directory: the chain's files lie under it.
    let top = std::path::Path::new("fixtures/chain-top.qcow2");
    assert!(std::env::current_dir().unwrap().join(top).exists());
    let options = OpenOptions::new().files(FilePolicy::Under("".into()));
    let image = Qcow2::open_path_with(top, &options).unwrap();
    assert!(image.has_backing_attached());

    // ... and files outside it are still refused.
    let dir = std::env::temp_dir().join(format!("qcow2-under-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["chain-base.qcow2", "chain-mid.qcow2", "chain-top.qcow2"] {
        std::fs::copy(fixture(name), dir.join(name)).unwrap();
    }
    let err = Qcow2::open_path_with(dir.join("chain-top.qcow2"), &options).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(err, Error::FileRefused { .. }), "{err}");
}

#[test]
fn io_errors_show_their_source_once() {
    let err = Qcow2::open_path(fixture("no-such-file.qcow2")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let cause = err.source().expect("an io::Error").to_string();
    assert!(!err.to_string().contains(&cause), "{err}");
    assert_eq!(chain(&err).matches(&cause).count(), 1, "{}", chain(&err));
}

#[test]
fn sink_and_read_failures_show_their_source_once() {
    let image = Qcow2::open_path(fixture("v3-64k-basic.qcow2")).unwrap();
    let reader = image.reader().unwrap();
    let err = reader
        .read_parallel(.., &ParallelReadOptions::new(), |chunk: Chunk<'_>| {
            Err(std::io::Error::other(format!(
                "sink gave up at {}",
                chunk.offset()
            )))
        })
        .unwrap_err();
    assert!(matches!(err, Error::SinkFailed { .. }), "{err}");
    let text = chain(&err);
    assert_eq!(text.matches("sink gave up").count(), 1, "{text}");

    // A read that fails: an encrypted image opened without its secret.
    let image = Qcow2::open_path(fixture("luks.qcow2")).unwrap();
    let err = image
        .reader()
        .unwrap()
        .read_parallel(.., &ParallelReadOptions::new(), |_| Ok(()))
        .unwrap_err();
    assert!(matches!(err, Error::ReadFailed { .. }), "{err}");
    let inner = err.source().expect("the read's error").to_string();
    assert!(!err.to_string().contains(&inner), "{err}");
    assert_eq!(chain(&err).matches(&inner).count(), 1, "{}", chain(&err));
}

#[test]
fn the_typed_error_comes_back_from_io_error() {
    let image = Qcow2::open_path(fixture("luks.qcow2")).unwrap();
    let err = image
        .reader()
        .unwrap()
        .read_at(0, &mut [0u8; 512])
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
    let by_ref = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
    assert!(matches!(by_ref, Some(Error::Encrypted { .. })), "{err}");
    let owned = err.into_inner().map(|e| e.downcast::<Error>());
    assert!(matches!(owned, Some(Ok(e)) if matches!(*e, Error::Encrypted { .. })));
}

#[test]
fn short_files_are_too_short_not_a_bad_magic() {
    for len in [0usize, 3] {
        let err = Qcow2::open(vec![0u8; len]).unwrap_err();
        assert!(
            matches!(err, Error::TooShort { len: l } if l == len as u64),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("the file is too short to be a qcow2 image ({len} bytes)")
        );
        assert!(err.is_not_qcow2());
    }
    // The magic and a version, and then the file ends.
    let mut head = std::fs::read(fixture("v3-64k-basic.qcow2")).unwrap();
    head.truncate(50);
    let err = Qcow2::open(head).unwrap_err();
    assert!(matches!(err, Error::TooShort { len: 50 }), "{err}");
    assert!(!err.is_not_qcow2());
    // A file of 4 bytes or more with another magic is not qcow2, as before.
    let err = Qcow2::open(b"RAW!".to_vec()).unwrap_err();
    assert!(matches!(err, Error::NotQcow2 { .. }), "{err}");
    assert!(err.is_not_qcow2());
}

#[test]
fn dirty_extents_say_whether_in_use_bitmaps_are_read() {
    let image = Qcow2::open_path(fixture("bitmaps.qcow2")).unwrap();
    let a: Vec<_> = image.dirty_extents("b0").unwrap().collect();
    let b: Vec<_> = image.dirty_extents_allow_in_use("b0").unwrap().collect();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
fn positional_sink_is_implemented_for_files() {
    fn sink<S: PositionalSink + ?Sized>(_: &S) {}
    let file = tempfile_path("sink");
    let f = std::fs::File::create(&file).unwrap();
    sink(&f);
    std::fs::remove_file(&file).unwrap();
}

fn tempfile_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("qcow2-api-style-{what}-{}", std::process::id()))
}

/// The old names still compile for one release.
#[test]
#[allow(deprecated)]
fn deprecated_names_still_work() {
    let options = OpenOptions::new().decompression_threads(1);
    let image = Qcow2::open_path_with(fixture("v3-64k-basic.qcow2"), &options).unwrap();
    let mut out = Vec::new();
    image
        .reader()
        .unwrap()
        .read_parallel_to_writer(.., &qcow2::ParallelRead::new().threads(1), &mut out)
        .unwrap();
    assert_eq!(out.len() as u64, image.guest_size());
    fn old_sink<S: qcow2::WriteAt>(_: &S) {}
    let file = tempfile_path("old-sink");
    let f = std::fs::File::create(&file).unwrap();
    old_sink(&f);
    std::fs::remove_file(&file).unwrap();
}
