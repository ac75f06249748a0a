//! flux-capacitor (`fluxcap`): long-term archival of Amazon Kinesis Data
//! Streams to zstd Parquet on S3 or a local directory, SQL over archived and
//! live records, and replay back into Kinesis.
//!
//! The library holds everything; the `fluxcap` binary only parses arguments
//! and calls one function per subcommand.

pub mod archive;
pub mod aws;
pub mod cluster;
pub mod config;
pub mod consistency;
pub mod error;
pub mod kinesis;
pub mod metrics;
pub mod query;
pub mod record;
pub mod replay;
pub mod server;

pub use error::{Error, Result};
