//! One image: [`Qcow2`](crate::Qcow2) (loading, open options, opening by path and following
//! the chain), the planner over its L1/L2 tables, and the [`Reader`](crate::Reader) that
//! executes plans; beside them, the writers of new images: `create` (an empty image laid out
//! as `qemu-img create` lays it out) and `builder` (which fills an empty image, append-only).

pub(crate) mod builder;
pub(crate) mod create;
pub(crate) mod dirty;
pub(crate) mod extent;
pub(crate) mod layer;
pub(crate) mod open;
pub(crate) mod options;
pub(crate) mod owned;
pub(crate) mod plan;
pub(crate) mod prealloc;
pub(crate) mod qcow2;
pub(crate) mod reader;
pub(crate) mod rewrite;
pub(crate) mod write;
