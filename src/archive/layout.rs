//! The archive layout — a public contract read by Drill, Hive, Spark, Athena,
//! DuckDB and DataFusion:
//!
//! ```text
//! <root>/<stream>/dt=YYYY-MM-DD/hr=HH/<shard>_<first-seq>_<first-sub>_<count>.parquet
//! <root>/<stream>/_fluxcap/…          checkpoints, lease (never read as data)
//! <root>/<stream>/_fluxcap/staging/<epoch>/dt=YYYY-MM-DD/hr=HH/<name>.parquet
//!                                     files of a flush before it is committed and published
//! <root>/<stream>/_fluxcap/keys/dt=YYYY-MM-DD/<name>.json
//!                                     key summaries of committed flushes (optional hints
//!                                     for lookups by partition_key, see `key_index`)
//! <root>/_fluxcap/…                   tool-wide state (replays)
//! ```
//!
//! A file under `dt=…/hr=…/` is *published*: it appears only after the flush
//! that wrote it is committed, never changes and never disappears (see
//! `checkpoint`). Its staged copy lives under `_fluxcap/staging/`, named by the
//! lease epoch of the archiver that wrote it, so that two archivers never write
//! the same staged object.
//!
//! `dt`/`hr` come from the approximate arrival timestamp in UTC. A data file
//! holds consecutive records of one shard, so its first record and its count
//! determine its records: the same records always give the same name, which
//! the commit protocol relies on (a re-run overwrites, never duplicates).

use chrono::{DateTime, Datelike, Timelike, Utc};
use object_store::path::Path;

use crate::record::Position;

/// Name of the folder holding non-data objects (ignored by every engine: it starts with `_`).
pub const STATE_DIR: &str = "_fluxcap";

/// Hive partition of an arrival time: (`YYYY-MM-DD`, `HH`).
pub fn partition_of(arrival_ms: i64) -> (String, String) {
    let t =
        DateTime::<Utc>::from_timestamp_millis(arrival_ms).unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    (
        format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
        format!("{:02}", t.hour()),
    )
}

/// Key of an hour partition: milliseconds of the hour's start.
pub fn hour_key(arrival_ms: i64) -> i64 {
    arrival_ms.div_euclid(3_600_000) * 3_600_000
}

/// The archive's paths, relative to the store root.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Key prefix of the archive inside the store (empty for a local directory root).
    root: Path,
}

impl Layout {
    /// A layout rooted at `root` (an object-store key prefix, may be empty).
    pub fn new(root: impl Into<Path>) -> Self {
        Layout { root: root.into() }
    }

    /// The archive root prefix.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<stream>`: the stream's table directory.
    pub fn stream_dir(&self, stream: &str) -> Path {
        self.root.clone().join(stream)
    }

    /// `<root>/<stream>/dt=…/hr=…`.
    pub fn partition_dir(&self, stream: &str, hour_ms: i64) -> Path {
        let (dt, hr) = partition_of(hour_ms);
        self.stream_dir(stream)
            .join(format!("dt={dt}"))
            .join(format!("hr={hr}"))
    }

    /// The data file for `count` consecutive records of `shard` starting at `first`.
    pub fn data_file(
        &self,
        stream: &str,
        hour_ms: i64,
        shard: &str,
        first: &Position,
        count: usize,
    ) -> Path {
        self.partition_dir(stream, hour_ms)
            .join(data_file_name(shard, first, count))
    }

    /// `<root>/<stream>/_fluxcap/checkpoints/<shard>/`.
    pub fn checkpoint_dir(&self, stream: &str, shard: &str) -> Path {
        self.stream_dir(stream)
            .join(STATE_DIR)
            .join("checkpoints")
            .join(shard)
    }

    /// `<root>/<stream>/_fluxcap/checkpoints/`.
    pub fn checkpoints_root(&self, stream: &str) -> Path {
        self.stream_dir(stream).join(STATE_DIR).join("checkpoints")
    }

    /// One checkpoint generation object.
    pub fn checkpoint(&self, stream: &str, shard: &str, generation: u64) -> Path {
        self.checkpoint_dir(stream, shard)
            .join(format!("{generation:020}.json"))
    }

    /// `<root>/<stream>/_fluxcap/finished.json`: the final checkpoints of
    /// finished shards (see `manifest`).
    pub fn finished_manifest(&self, stream: &str) -> Path {
        self.stream_dir(stream)
            .join(STATE_DIR)
            .join("finished.json")
    }

    /// `<root>/<stream>/_fluxcap/verified.json`: how far `verify` proved
    /// each shard (see `verify`).
    pub fn verified_watermark(&self, stream: &str) -> Path {
        self.stream_dir(stream)
            .join(STATE_DIR)
            .join("verified.json")
    }

    /// `<root>/<stream>/_fluxcap/lease/`.
    pub fn lease_dir(&self, stream: &str) -> Path {
        self.stream_dir(stream).join(STATE_DIR).join("lease")
    }

    /// `<root>/<stream>/_fluxcap/workers/`: heartbeats of shared archivers.
    pub fn workers_dir(&self, stream: &str) -> Path {
        self.stream_dir(stream).join(STATE_DIR).join("workers")
    }

    /// `<root>/<stream>/_fluxcap/owners/`: which shared archiver owns which shard.
    pub fn owners_dir(&self, stream: &str) -> Path {
        self.stream_dir(stream).join(STATE_DIR).join("owners")
    }

    /// One lease epoch object.
    pub fn lease(&self, stream: &str, epoch: u64) -> Path {
        self.lease_dir(stream).join(format!("{epoch:020}.json"))
    }

    /// `<root>/<stream>/_fluxcap/identity.json`: the stream's incarnations.
    pub fn identity(&self, stream: &str) -> Path {
        self.stream_dir(stream)
            .join(STATE_DIR)
            .join("identity.json")
    }

    /// `<root>/<stream>/_fluxcap/staging/`: staged files of every epoch.
    pub fn staging_root(&self, stream: &str) -> Path {
        self.stream_dir(stream).join(STATE_DIR).join(STAGING)
    }

    /// The staged object of the published file `published` (a path of
    /// [`Layout::data_file`]), written by the archiver of lease `epoch`.
    pub fn staged(&self, stream: &str, epoch: u64, published: &Path) -> Option<Path> {
        let base = self.stream_dir(stream);
        let rel: Vec<_> = published.prefix_match(&base)?.collect();
        let mut p = self.staging_root(stream).join(format!("{epoch:010}"));
        for part in rel {
            p = p.join(part);
        }
        Some(p)
    }

    /// `<root>/fluxcap-positions/<stream>/positions.parquet`: the stream's
    /// published positions, a table beside the archive that cluster engines
    /// join (see `positions`). Outside the stream's folder, so that a scan of
    /// the stream never reads it, and without a leading `_` or `.`, so that
    /// Drill, Hive and Spark list it.
    pub fn positions(&self, stream: &str) -> Path {
        self.positions_dir(stream).join(POSITIONS_FILE)
    }

    /// `<root>/fluxcap-positions/<stream>/`: the positions table's folder.
    pub fn positions_dir(&self, stream: &str) -> Path {
        self.root.clone().join(POSITIONS_DIR).join(stream)
    }

    /// `<root>/_fluxcap/`: tool-wide state.
    pub fn global_state_dir(&self) -> Path {
        self.root.clone().join(STATE_DIR)
    }
}

/// Folder (under the archive root) of every stream's positions table; no
/// stream may have this name.
pub const POSITIONS_DIR: &str = "fluxcap-positions";

/// File name of a stream's positions table.
pub const POSITIONS_FILE: &str = "positions.parquet";

/// Folder (below [`STATE_DIR`]) of staged data files.
pub const STAGING: &str = "staging";

/// The published path of a staged object: the path without its
/// `_fluxcap/staging/<epoch>` segments; `None` when `staged` is not staged.
pub fn published_of(staged: &Path) -> Option<Path> {
    let parts: Vec<_> = staged.parts().collect();
    let i = parts.windows(3).position(|w| {
        w[0].as_ref() == STATE_DIR
            && w[1].as_ref() == STAGING
            && parse_epoch_dir(w[2].as_ref()).is_some()
    })?;
    Some(Path::from_iter(
        parts[..i].iter().chain(parts[i + 3..].iter()).cloned(),
    ))
}

/// The lease epoch of a staged object's folder name (`0000000007`).
pub fn parse_epoch_dir(name: &str) -> Option<u64> {
    (name.len() == 10 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

/// The lease epoch a staged object was written under.
pub fn staged_epoch(staged: &Path) -> Option<u64> {
    let parts: Vec<_> = staged.parts().collect();
    parts.windows(3).find_map(|w| {
        (w[0].as_ref() == STATE_DIR && w[1].as_ref() == STAGING)
            .then(|| parse_epoch_dir(w[2].as_ref()))
            .flatten()
    })
}

/// `<shard>_<first-seq>_<first-sub>_<count>.parquet`
pub fn data_file_name(shard: &str, first: &Position, count: usize) -> String {
    format!(
        "{shard}_{}_{}_{count}.parquet",
        first.sequence_number, first.subsequence_number
    )
}

/// What a data file's name says about its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFileName {
    /// Shard of every record in the file.
    pub shard_id: String,
    /// Position of the first record.
    pub first: Position,
    /// Number of records.
    pub count: usize,
}

/// Parse a data file name; `None` for anything that is not one of ours.
pub fn parse_data_file_name(name: &str) -> Option<DataFileName> {
    let stem = name.strip_suffix(".parquet")?;
    let mut parts = stem.rsplitn(4, '_');
    let count = parts.next()?.parse().ok()?;
    let sub = parts.next()?.parse().ok()?;
    let seq = parts.next()?;
    let shard = parts.next()?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) || shard.is_empty() {
        return None;
    }
    Some(DataFileName {
        shard_id: shard.to_string(),
        first: Position::new(seq, sub),
        count,
    })
}

/// Parse the zero-padded number of a generation/epoch object name.
pub fn parse_generation(name: &str) -> Option<u64> {
    name.strip_suffix(".json")?.parse().ok()
}

/// True when a segment of `path` below `base` starts with `_` or `.`: not
/// table data for any engine (the archive root itself may have any name).
pub fn is_hidden_below(base: &Path, path: &Path) -> bool {
    path.prefix_match(base).is_some_and(|mut parts| {
        parts.any(|p| {
            let s = p.as_ref();
            s.starts_with('_') || s.starts_with('.')
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_utc_hours() {
        // 2026-11-25T13:59:59.999Z
        let t = 1_795_615_199_999;
        assert_eq!(partition_of(t), ("2026-11-25".into(), "13".into()));
        assert_eq!(partition_of(t + 1), ("2026-11-25".into(), "14".into()));
        assert_eq!(hour_key(t), 1_795_611_600_000);
    }

    #[test]
    fn names_are_deterministic_and_parse_back() {
        let l = Layout::new("pre/fix");
        let p = Position::new(
            "49590338271490256608559692538361571095921575989136588898",
            3,
        );
        let path = l.data_file("orders", 1_795_615_199_999, "shardId-000000000001", &p, 42);
        assert_eq!(
            path.as_ref(),
            "pre/fix/orders/dt=2026-11-25/hr=13/shardId-000000000001_49590338271490256608559692538361571095921575989136588898_3_42.parquet"
        );
        let parsed = parse_data_file_name(path.filename().unwrap()).unwrap();
        assert_eq!(parsed.shard_id, "shardId-000000000001");
        assert_eq!(parsed.first, p);
        assert_eq!(parsed.count, 42);
        assert!(parse_data_file_name("_x.json").is_none());
        let table = l.stream_dir("orders");
        assert!(is_hidden_below(&table, &l.checkpoint("orders", "s", 1)));
        assert!(!is_hidden_below(&table, &path));
        let staged = l.staged("orders", 7, &path).unwrap();
        assert_eq!(
            staged.as_ref(),
            "pre/fix/orders/_fluxcap/staging/0000000007/dt=2026-11-25/hr=13/shardId-000000000001_49590338271490256608559692538361571095921575989136588898_3_42.parquet"
        );
        assert!(is_hidden_below(&table, &staged));
        assert_eq!(published_of(&staged), Some(path.clone()));
        assert_eq!(staged_epoch(&staged), Some(7));
        assert_eq!(published_of(&path), None);
        let under_underscore_root = Layout::new("_root");
        assert!(!is_hidden_below(
            &under_underscore_root.stream_dir("orders"),
            &under_underscore_root.data_file("orders", 0, "s", &p, 1)
        ));
    }
}
