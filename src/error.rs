//! The library's error type.
//!
//! Every variant carries what a user needs to act: which stream, shard, object
//! or configuration key. `main.rs` turns each variant into one message and an
//! exit code ([`Error::exit_code`]).

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, by what a caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is missing, unreadable or invalid.
    #[error("configuration error in {file}: key `{key}`: {message}")]
    Config {
        /// The file (or environment variable / flag) that set the bad value.
        file: String,
        /// Dotted key path, e.g. `archive.zstd_level`.
        key: String,
        /// What was expected.
        message: String,
    },

    /// A configuration file could not be read or parsed.
    #[error("cannot read configuration {file}: {message}")]
    ConfigFile {
        /// The file.
        file: String,
        /// Parser or I/O message, with line and column when known.
        message: String,
    },

    /// A command-line argument is invalid (beyond what clap checks).
    #[error("{0}")]
    Usage(String),

    /// The stream does not exist (or is not visible with these credentials).
    #[error("stream `{stream}` not found in Kinesis ({detail})")]
    StreamNotFound {
        /// Stream name.
        stream: String,
        /// Service message.
        detail: String,
    },

    /// A Kinesis call failed and retrying will not help.
    #[error("kinesis {operation} failed for stream `{stream}`{}: {message}", shard_suffix(.shard))]
    Kinesis {
        /// API operation, e.g. `GetRecords`.
        operation: &'static str,
        /// Stream name.
        stream: String,
        /// Shard id, when the call was about one shard.
        shard: Option<String>,
        /// Service or transport message.
        message: String,
    },

    /// Drill refused or failed a query, or could not be reached.
    #[error("Drill at {url}: {message}")]
    Drill {
        /// Drill's REST address.
        url: String,
        /// Drill's own message (or why Drill could not be asked).
        message: String,
    },

    /// The target stream refused one record of a replay as many times in a
    /// row as `replay.retry_attempts` allows.
    #[error(
        "kinesis PutRecords refused a record {attempts} times in a row (stream `{stream}`, shard `{shard}`, \
         partition key {partition_key:?}, record {record} of the replay), last with {error}"
    )]
    RecordRefused {
        /// Target stream.
        stream: String,
        /// Target shard id.
        shard: String,
        /// The record's partition key.
        partition_key: String,
        /// The record's ordinal in the replay's order.
        record: u64,
        /// Consecutive failed attempts.
        attempts: u32,
        /// The last ErrorCode (per entry, or of the whole call) and its message.
        error: String,
    },

    /// A replay into the stream it reads from, without the confirmation.
    #[error(
        "the target is the source stream `{stream}`: its consumers will read the replayed records again \
         (see docs/replay-consistency.md); pass --confirm-same-stream to go ahead"
    )]
    SameStream {
        /// The stream.
        stream: String,
    },

    /// An EMR call failed, or a cluster is not in the state asked for.
    #[error("emr {operation} failed: {message}")]
    Emr {
        /// API operation, e.g. `RunJobFlow`.
        operation: &'static str,
        /// Service message, or what the cluster's state is.
        message: String,
    },

    /// An object-store operation failed.
    #[error("archive store error at {location}: {source}")]
    Store {
        /// The object or prefix, as a URL-like location.
        location: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },

    /// The archive location cannot be used (missing bucket, no permission, bad URL).
    #[error("archive location {location} is not usable: {message}")]
    Location {
        /// The configured location.
        location: String,
        /// Why.
        message: String,
    },

    /// Another archiver holds the stream's lease.
    #[error(
        "stream `{stream}` is being archived by another process ({owner}); its lease expires at {expires}. \
         Stop it first, or wait for the lease to expire if it died on another host"
    )]
    LeaseHeld {
        /// Stream name.
        stream: String,
        /// Description of the holder (host, pid, start time).
        owner: String,
        /// RFC 3339 expiry of the holder's lease.
        expires: String,
    },

    /// A single archiver and shared ones (`--shared`) on the same stream.
    #[error("stream `{stream}` is being archived by {running} ({owner}): {hint}")]
    ArchiverModeConflict {
        /// Stream name.
        stream: String,
        /// "a single archiver" or "shared archivers".
        running: &'static str,
        /// The running one (host, pid, start time).
        owner: String,
        /// What to do.
        hint: &'static str,
    },

    /// Another process is running (or resuming) this replay.
    #[error(
        "replay {id} is being run by another process ({owner}); its lease expires at {expires}. \
         Stop it first, or wait for the lease to expire if it died on another host"
    )]
    ReplayHeld {
        /// Replay id.
        id: String,
        /// Description of the holder (host, pid, start time).
        owner: String,
        /// RFC 3339 expiry of the holder's lease.
        expires: String,
    },

    /// A conditional write lost: another writer changed the state we based our
    /// work on. The process stops instead of corrupting the archive.
    #[error(
        "fenced: another archiver wrote {object} concurrently (stream `{stream}`); stopping without committing"
    )]
    Fenced {
        /// Stream name.
        stream: String,
        /// The object whose conditional write failed.
        object: String,
    },

    /// A checkpoint generation this archiver meant to write was written by an
    /// earlier holder of the lease whose request landed late (its process
    /// may be dead). The shard's state must be read again; nothing is lost.
    #[error(
        "the checkpoint of shard `{shard}` (stream `{stream}`) was changed by a late write of an earlier archiver (lease epoch {epoch}) at {object}"
    )]
    StaleCheckpoint {
        /// Stream name.
        stream: String,
        /// Shard id.
        shard: String,
        /// The generation object that was written late.
        object: String,
        /// Lease epoch of the late writer.
        epoch: u64,
    },

    /// A checkpoint or lease object could not be understood.
    #[error("corrupt state object {object}: {message}")]
    CorruptState {
        /// The object.
        object: String,
        /// Why.
        message: String,
    },

    /// Parquet encoding or decoding failed.
    #[error("parquet error in {object}: {source}")]
    Parquet {
        /// The object being written or read.
        object: String,
        /// The underlying error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// Arrow error while building or reading record batches.
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    /// Local file I/O failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `fluxcap verify` found gaps or duplicates.
    #[error("verification failed: {problems} problem(s) found")]
    VerifyFailed {
        /// Number of problems reported.
        problems: usize,
    },

    /// SQL that does not parse or plan (syntax, unknown table or column).
    #[error("SQL error: {message}")]
    Sql {
        /// The engine's message, with line and column when known.
        message: String,
    },

    /// A statement that would change something; the session is read-only.
    #[error(
        "read-only: `{statement}…` is not allowed ({message}); results can be written with -o FILE"
    )]
    ReadOnly {
        /// The statement's first words.
        statement: String,
        /// Why it was refused.
        message: String,
    },

    /// A statement too long or too deeply nested to be planned safely.
    #[error("statement refused: {message}")]
    TooComplex {
        /// Which limit, and how to stay within it.
        message: String,
    },

    /// A query ran longer than it may.
    #[error("query stopped after {limit} ({key})")]
    Timeout {
        /// The limit, as configured.
        limit: String,
        /// The configuration key that sets it.
        key: &'static str,
    },

    /// A query failed while running.
    #[error("query failed: {message}")]
    Query {
        /// The engine's message.
        message: String,
    },

    /// A replay finished, but some records could not be sent because the
    /// target cannot take them (larger than its maximum record size).
    #[error(
        "replay {id}: {count} record(s) larger than the target's maximum record size were not sent; they are listed in {list}"
    )]
    Rejected {
        /// Replay id.
        id: String,
        /// Records not sent.
        count: u64,
        /// Where they are listed.
        list: String,
    },

    /// `--resume` was given options that differ from the ones the replay
    /// was started with (or that only apply when a replay starts).
    #[error(
        "replay {id} continues with the options it was started with (only --rate may change); these differ:\n  {}",
        .conflicts.join("\n  ")
    )]
    ResumeConflict {
        /// Replay id.
        id: String,
        /// One `--option: stored …, given …` per conflicting option.
        conflicts: Vec<String>,
    },

    /// The work was interrupted before it could finish (SIGINT/SIGTERM).
    #[error("interrupted")]
    Interrupted,
}

fn shard_suffix(shard: &Option<String>) -> String {
    match shard {
        Some(s) => format!(", shard `{s}`"),
        None => String::new(),
    }
}

impl Error {
    /// The process exit code for this error.
    ///
    /// | code | meaning |
    /// |---|---|
    /// | 1 | runtime failure (network, store, service) |
    /// | 2 | bad configuration or usage |
    /// | 3 | verification found gaps or duplicates; a replay could not send some records |
    /// | 4 | another archiver holds the stream, or fenced this one |
    /// | 130 | interrupted |
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config { .. }
            | Error::ConfigFile { .. }
            | Error::Usage(_)
            | Error::SameStream { .. }
            | Error::ResumeConflict { .. }
            | Error::Sql { .. }
            | Error::TooComplex { .. }
            | Error::ReadOnly { .. } => 2,
            Error::VerifyFailed { .. } | Error::Rejected { .. } => 3,
            Error::LeaseHeld { .. }
            | Error::Fenced { .. }
            | Error::ReplayHeld { .. }
            | Error::ArchiverModeConflict { .. } => 4,
            Error::Interrupted => 130,
            _ => 1,
        }
    }

    /// Build a [`Error::Store`] with the object location.
    pub fn store(location: impl std::fmt::Display, source: object_store::Error) -> Self {
        Error::Store {
            location: location.to_string(),
            source,
        }
    }
}
