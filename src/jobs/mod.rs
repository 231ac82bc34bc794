//! What `qemu-img` does with an image, read-only: info, check, convert, compare (and later
//! create, commit, ...). Built on the guest views and the image below them.

pub(crate) mod amend;
pub(crate) mod check;
pub(crate) mod commit;
pub(crate) mod compare;
pub(crate) mod convert;
pub(crate) mod hole_aware;
pub(crate) mod human;
pub(crate) mod info;
#[cfg(feature = "serde")]
pub(crate) mod qjson;
pub(crate) mod rebase;
pub(crate) mod snapshot;
