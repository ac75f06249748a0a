//! The archive: layout, Parquet writer, checkpoint/commit protocol, the
//! archiver loop, and the read-side checks (`status`, `verify`).

pub mod archiver;
pub mod budget;
pub mod checkpoint;
pub mod footer;
pub mod identity;
pub mod ingest;
pub mod key_index;
pub mod layout;
pub mod lease;
pub mod manifest;
pub mod positions;
pub mod status;
pub mod store;
pub mod verify;
pub mod writer;
