//! What a data file's footer says about the flush(es) that wrote it —
//! the chain `fluxcap verify` follows from the start of a shard to its
//! checkpoint.
//!
//! A file written by one flush carries the position before the flush, the
//! position of its last record and the flush's record count (all of its
//! files together). A file that merges a shard's flushes of one hour
//! (`archive.publish = "hour"`) carries one *segment* per flush part it holds.

use parquet::file::metadata::KeyValue;
use serde::{Deserialize, Serialize};

use crate::record::Position;

/// Footer keys of a data file, read by `fluxcap verify`.
pub mod meta {
    /// Position before the flush that wrote the file (`""` when none).
    pub const FLUSH_PREV: &str = "fluxcap.flush_prev";
    /// Position of the last record of the flush.
    pub const FLUSH_LAST: &str = "fluxcap.flush_last";
    /// Records in the whole flush (all of its files).
    pub const FLUSH_RECORDS: &str = "fluxcap.flush_records";
    /// Shard of the records.
    pub const SHARD: &str = "fluxcap.shard_id";
    /// A merged file's flush segments (JSON, see [`super::Segment`]).
    pub const SEGMENTS: &str = "fluxcap.segments";
}

/// Encode a position for file metadata: `<seq>:<sub>`, or `""` for none.
pub fn encode_position(p: Option<&Position>) -> String {
    p.map(|p| format!("{}:{}", p.sequence_number, p.subsequence_number))
        .unwrap_or_default()
}

/// The footer metadata of every file of one flush of `shard`: the position
/// before it, its last record and its record count (all files together).
pub fn flush_metadata(
    prev: Option<&Position>,
    last: Option<&Position>,
    records: u64,
    shard: &str,
) -> Vec<KeyValue> {
    let kv = |k: &str, v: String| KeyValue::new(k.to_string(), v);
    vec![
        kv(meta::FLUSH_PREV, encode_position(prev)),
        kv(meta::FLUSH_LAST, encode_position(last)),
        kv(meta::FLUSH_RECORDS, records.to_string()),
        kv(meta::SHARD, shard.to_string()),
    ]
}

/// Decode [`encode_position`].
pub fn decode_position(s: &str) -> Option<Position> {
    let (seq, sub) = s.split_once(':')?;
    Some(Position::new(seq, sub.parse().ok()?))
}

/// The part of one flush that a file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Position before the flush (`""`: the start of the shard).
    pub prev: String,
    /// Position of the flush's last record.
    pub last: String,
    /// Records in the whole flush (all of its files).
    pub records: u64,
    /// Records of the flush in this file.
    pub count: u64,
}

/// The footer metadata of a file that merges `segments`.
pub fn merged_metadata(segments: &[Segment], shard: &str) -> Vec<KeyValue> {
    vec![
        KeyValue::new(
            meta::SEGMENTS.to_string(),
            serde_json::to_string(segments).unwrap_or_default(),
        ),
        KeyValue::new(meta::SHARD.to_string(), shard.to_string()),
    ]
}

/// The segments a file's footer describes (`rows`: its row count, for a
/// file written by a single flush).
pub fn segments_of(kv: &std::collections::HashMap<String, String>, rows: u64) -> Vec<Segment> {
    if let Some(s) = kv.get(meta::SEGMENTS)
        && let Ok(segs) = serde_json::from_str::<Vec<Segment>>(s)
    {
        return segs;
    }
    vec![Segment {
        prev: kv.get(meta::FLUSH_PREV).cloned().unwrap_or_default(),
        last: kv.get(meta::FLUSH_LAST).cloned().unwrap_or_default(),
        records: kv
            .get(meta::FLUSH_RECORDS)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        count: rows,
    }]
}

/// A file's footer key-value metadata as a map.
pub fn key_values(
    meta: &parquet::file::metadata::FileMetaData,
) -> std::collections::HashMap<String, String> {
    meta.key_value_metadata()
        .map(|v| {
            v.iter()
                .filter_map(|k| Some((k.key.clone(), k.value.clone()?)))
                .collect()
        })
        .unwrap_or_default()
}
