//! The "verified up to" watermark of `fluxcap verify --since-last`.
//!
//! ```text
//!   <stream>/_fluxcap/verified.json
//!   { "version": 1, "stream": "orders", "written_at": "…",
//!     "shards": { "<checkpoint key>": { "position": {…}, "records": N, "files": F,
//!                                        "open_hours": ["dt=…/hr=…"], "verified_at": "…" } } }
//! ```
//!
//! Each `verify` records, for every shard it found without problems, the end
//! of the chain it proved (the shard's checkpoint position then) and the
//! records and files up to it. `--since-last` takes that position as the
//! chain's start and reads only the footers of files that start after it —
//! plus, with hourly publication, the files of the hours that still had
//! committed files waiting to be published (`open_hours`): those can be
//! merged later with parts that come after the watermark. Files wholly
//! before the watermark are not read again: `--since-last` does not notice
//! a file removed or damaged after it was verified (a full `verify` does).
//!
//! A shard with problems gets no entry (the next `--since-last` checks it
//! whole); an entry ahead of the shard's checkpoint is ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::archive::checkpoint::read_json;
use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::record::Position;

/// Format version of the watermark written by this version.
pub const WATERMARK_VERSION: u32 = 1;

/// How far `verify` proved each shard of a stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Watermark {
    /// Format version ([`WATERMARK_VERSION`]).
    pub version: u32,
    /// Stream name.
    pub stream: String,
    /// When it was written (RFC 3339).
    pub written_at: String,
    /// Per checkpoint key.
    pub shards: BTreeMap<String, ShardMark>,
}

/// How far one shard was proved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardMark {
    /// End of the proved chain (`None`: nothing archived then).
    pub position: Option<Position>,
    /// Records up to it.
    pub records: u64,
    /// Data files up to it.
    pub files: u64,
    /// Hour partitions (`dt=…/hr=…`) that had committed files not published
    /// yet: their files are read again by the next `--since-last`.
    #[serde(default)]
    pub open_hours: Vec<String>,
    /// When it was proved (RFC 3339).
    pub verified_at: String,
}

/// Read the watermark of `stream`; `None` when there is none. An object of
/// a later format version, or one that is not readable, is reported (the
/// caller verifies everything instead).
pub async fn load(archive: &Archive, stream: &str) -> Result<Option<Watermark>> {
    let path = archive.layout.verified_watermark(stream);
    match read_json::<Watermark>(archive, &path).await {
        Ok(w) if w.version == 0 || w.version > WATERMARK_VERSION || w.stream != stream => {
            Err(Error::CorruptState {
                object: archive.describe(&path),
                message: format!(
                    "watermark of version {} for stream {:?} (this version reads version {WATERMARK_VERSION} for {stream:?})",
                    w.version, w.stream
                ),
            })
        }
        Ok(w) => Ok(Some(w)),
        Err(Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write the watermark of `stream` (overwriting: any verify's watermark is
/// true, a later one only saves more work).
pub async fn store(archive: &Archive, stream: &str, w: &Watermark) -> Result<()> {
    let path = archive.layout.verified_watermark(stream);
    let body = serde_json::to_vec(w).map_err(|e| Error::CorruptState {
        object: archive.describe(&path),
        message: e.to_string(),
    })?;
    archive.put_bytes(&path, body.into()).await?;
    archive.sync_local(&path).await
}
