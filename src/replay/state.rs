//! A replay's state in the archive store: what it was asked to do (the
//! manifest, written once) and how far it got (progress, overwritten as it
//! goes). S3 is the only state, as for the archiver:
//!
//! ```text
//! <root>/_fluxcap/replays/<id>/manifest.json   options, source, target, horizon
//! <root>/_fluxcap/replays/<id>/progress.json   state, records acknowledged in order, counters
//! <root>/_fluxcap/replays/<id>/rejected.jsonl  records the target cannot take (too large), of every run
//! ```
//!
//! The rejected list only grows: a resumed run starts from the stored list,
//! adds the records it rejects that are not on it yet (by shard, sequence and
//! sub-sequence number), and writes it before any progress that moves past
//! them, so a record rejected before a crash is never forgotten.

use std::collections::BTreeMap;

use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::kinesis::writer::ShardStats;

/// Version of the manifest format.
pub const MANIFEST_VERSION: u32 = 2;

/// Where the records come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A configured stream: its archive and live records (`S`).
    Stream {
        /// Stream name.
        stream: String,
    },
    /// Parquet files with the record columns (`--from-parquet`).
    Parquet {
        /// Directory, file or `s3://bucket/prefix`.
        location: String,
        /// The stream named in annotations (`--stream`, if given).
        stream: Option<String>,
    },
}

impl Source {
    /// The stream name annotations carry.
    pub fn stream_label(&self) -> String {
        match self {
            Source::Stream { stream } => stream.clone(),
            Source::Parquet { stream, location } => stream
                .clone()
                .unwrap_or_else(|| format!("parquet:{location}")),
        }
    }
}

/// Which records, in which form (everything fixed when the replay starts).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Selection {
    /// Arrival time lower bound, inclusive (epoch ms).
    pub since_ms: Option<i64>,
    /// Arrival time upper bound, exclusive (epoch ms).
    pub until_ms: Option<i64>,
    /// Per-shard lower bounds on the sequence number, inclusive.
    pub from_sequence: BTreeMap<String, String>,
    /// Per-shard upper bounds on the sequence number, inclusive.
    pub to_sequence: BTreeMap<String, String>,
    /// SQL predicate over the record columns (`--where`).
    pub predicate: Option<String>,
    /// Keep only the last record per key.
    pub compact: bool,
    /// The compaction key (SQL expression; the partition key by default).
    pub key: Option<String>,
    /// Records matching this predicate delete their key (`--tombstone`).
    pub tombstone: Option<String>,
    /// A deleted key's last record (its tombstone) is sent, so consumers
    /// delete the key too (`--tombstones emit`); otherwise nothing of the
    /// key is sent (`drop`).
    #[serde(default)]
    pub emit_tombstones: bool,
    /// Replayed copies are selected too (`--include-replayed`), ordered and
    /// compacted by their original's position and sent unchanged. Manifests
    /// written before this option existed treated copies as originals: they
    /// read as `true`, so a resumed replay selects what it selected before.
    #[serde(default = "older_manifests_included_copies")]
    pub include_replayed: bool,
}

fn older_manifests_included_copies() -> bool {
    true
}

/// How records are annotated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Annotate {
    /// Annotate at all (`--no-annotate` turns it off).
    pub enabled: bool,
    /// Always wrap in the envelope, even JSON objects.
    pub envelope: bool,
    /// Records are binary: always the envelope.
    pub binary: bool,
    /// Name of the JSON field.
    pub field: String,
    /// `--annotate key=value` pairs.
    pub pairs: BTreeMap<String, String>,
    /// The `force_overwrite` flag.
    pub force_overwrite: bool,
}

/// A replay, as asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Replay id.
    pub id: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// The horizon time: live records that arrived later are never read.
    pub as_of_ms: i64,
    /// Where records come from.
    pub source: Source,
    /// The target as given (`kinesis://s`, `file://p`, `-`).
    pub target: String,
    /// Which records.
    pub selection: Selection,
    /// How they are annotated.
    pub annotate: Annotate,
    /// Overall records/s cap.
    pub rate: Option<f64>,
    /// A key's records are sent without waiting for each other (`--unordered`).
    #[serde(default)]
    pub unordered: bool,
    /// After the selection, keep forwarding new records (`--follow`).
    #[serde(default)]
    pub follow: bool,
    /// Per source shard, the last sequence number at the start (`None`: the
    /// shard was empty). Shards not listed did not exist at the start; both
    /// are excluded past this point. `None` for Parquet sources.
    pub horizon: Option<BTreeMap<String, Option<String>>>,
    /// Lineage depth of each source shard (0 = no known parent).
    pub lineage: BTreeMap<String, u32>,
}

/// State of a replay.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Being sent (or the process died: see [`Progress::updated_ms`]).
    Running,
    /// Stopped by a signal or an error; `--resume` continues.
    Interrupted,
    /// Stopped because its reader closed the output (`--to - | head`): a
    /// clean stop, and `--resume` continues.
    OutputClosed,
    /// Everything was sent.
    Done,
}

/// How far a replay got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// State.
    pub phase: Phase,
    /// Records in output order that are all acknowledged: a resumed replay
    /// starts with record number `sent`.
    pub sent: u64,
    /// Records selected in all, when known.
    pub total: Option<u64>,
    /// Bytes acknowledged (payload + key) up to `sent`.
    pub bytes: u64,
    /// File targets: bytes written up to `sent` (a resume truncates to it).
    pub file_offset: Option<u64>,
    /// Records not sent because the target cannot take them, in all runs
    /// (the lines of `rejected.jsonl`).
    pub rejected: u64,
    /// Per target shard counters of the last run.
    #[serde(default)]
    pub shards: Vec<ShardStats>,
    /// The last error, when interrupted by one.
    pub error: Option<String>,
    /// Last update (epoch ms): a running replay updates it every few seconds.
    pub updated_ms: i64,
    /// Host of the process running the replay.
    #[serde(default)]
    pub host: String,
    /// Its process id (a resume refuses while it is alive).
    #[serde(default)]
    pub pid: u32,
    /// `--follow`: the selection is completely sent (a resume only follows).
    #[serde(default)]
    pub selection_done: bool,
    /// `--follow`: per source shard, the last sequence number whose selected
    /// records are acknowledged (a resume reads after it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub follow: BTreeMap<String, String>,
    /// The position (hex of [`crate::consistency::position_key`]) of the
    /// last record of the acknowledged prefix of the output order: a resume
    /// selects only what comes after it. Absent in progress written before
    /// positions were saved: such a resume skips `sent` records instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<String>,
    /// Per target shard (hash key range), what is acknowledged above
    /// `through`: a shard held back by throttling does not make a resume
    /// send again what the other shards already took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetMark>,
}

/// What is acknowledged of the records routed to one target hash key range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetMark {
    /// The target shard (information only).
    pub shard_id: String,
    /// First hash key of the range (decimal).
    pub hash_start: String,
    /// Last hash key of the range (decimal, inclusive).
    pub hash_end: String,
    /// Every record of the range up to this position (hex key) is acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<String>,
    /// Records of the range after `through` that are acknowledged (hex keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acked: Vec<String>,
}

/// Paths of a replay's objects.
pub fn dir(archive: &Archive, id: &str) -> Path {
    archive.layout.global_state_dir().join("replays").join(id)
}

fn parse<T: for<'de> Deserialize<'de>>(archive: &Archive, p: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::CorruptState {
        object: archive.describe(p),
        message: e.to_string(),
    })
}

fn json<T: Serialize>(v: &T) -> bytes::Bytes {
    // Serialising these plain structs cannot fail.
    bytes::Bytes::from(serde_json::to_vec_pretty(v).unwrap_or_default())
}

/// Write the manifest.
pub async fn save_manifest(archive: &Archive, m: &Manifest) -> Result<()> {
    let p = dir(archive, &m.id).join("manifest.json");
    archive.put_bytes(&p, json(m)).await
}

/// Write the progress.
pub async fn save_progress(archive: &Archive, id: &str, p: &Progress) -> Result<()> {
    let path = dir(archive, id).join("progress.json");
    archive.put_bytes(&path, json(p)).await
}

/// Where a replay's rejected records are listed.
pub fn rejected_path(archive: &Archive, id: &str) -> Path {
    dir(archive, id).join("rejected.jsonl")
}

/// Write the rejected records' list: the whole list, the lines of earlier
/// runs first ([`load_rejected`]), so it only ever grows.
pub async fn save_rejected(archive: &Archive, id: &str, lines: &[String]) -> Result<Path> {
    let path = rejected_path(archive, id);
    let mut body = lines.join("\n");
    body.push('\n');
    archive.put_bytes(&path, body.into()).await?;
    Ok(path)
}

/// The stored rejected list of a replay (empty when there is none).
pub async fn load_rejected(archive: &Archive, id: &str) -> Result<Vec<String>> {
    let path = rejected_path(archive, id);
    let bytes = match archive.store.get(&path).await {
        Ok(r) => r
            .bytes()
            .await
            .map_err(|e| Error::store(archive.describe(&path), e))?,
        Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(Error::store(archive.describe(&path), e)),
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::CorruptState {
        object: archive.describe(&path),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if rejected_key(line).is_none() {
            return Err(Error::CorruptState {
                object: archive.describe(&path),
                message: format!("not a rejected record: {line:?}"),
            });
        }
        out.push(line.to_string());
    }
    Ok(out)
}

/// The identity of a line of the rejected list: (shard, sequence number,
/// sub-sequence number).
pub fn rejected_key(line: &str) -> Option<(String, String, i64)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((
        v.get("shard_id")?.as_str()?.to_string(),
        v.get("sequence_number")?.as_str()?.to_string(),
        v.get("subsequence_number")?.as_i64()?,
    ))
}

/// Read a replay's manifest and progress.
pub async fn load(archive: &Archive, id: &str) -> Result<(Manifest, Option<Progress>)> {
    let d = dir(archive, id);
    let mp = d.clone().join("manifest.json");
    let bytes = match archive.store.get(&mp).await {
        Ok(r) => r
            .bytes()
            .await
            .map_err(|e| Error::store(archive.describe(&mp), e))?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(Error::Usage(format!(
                "no replay `{id}` in {} (see `fluxcap replay --list`)",
                archive.location
            )));
        }
        Err(e) => return Err(Error::store(archive.describe(&mp), e)),
    };
    let m: Manifest = parse(archive, &mp, &bytes)?;
    let pp = d.join("progress.json");
    let progress = match archive.store.get(&pp).await {
        Ok(r) => {
            let b = r
                .bytes()
                .await
                .map_err(|e| Error::store(archive.describe(&pp), e))?;
            Some(parse(archive, &pp, &b)?)
        }
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return Err(Error::store(archive.describe(&pp), e)),
    };
    Ok((m, progress))
}

/// Every replay in the store, oldest first.
pub async fn list(archive: &Archive) -> Result<Vec<(Manifest, Option<Progress>)>> {
    let prefix = archive.layout.global_state_dir().join("replays");
    let mut ids: Vec<String> = archive
        .list(&prefix)
        .await?
        .into_iter()
        .filter(|o| o.location.filename() == Some("manifest.json"))
        .filter_map(|o| {
            let parts: Vec<_> = o.location.parts().collect();
            parts
                .len()
                .checked_sub(2)
                .map(|i| parts[i].as_ref().to_string())
        })
        .collect();
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        out.push(load(archive, &id).await?);
    }
    out.sort_by(|a, b| a.0.created_at.cmp(&b.0.created_at));
    Ok(out)
}

/// Whether the process that last saved `p` still runs: on this host by its
/// pid, on another by the heartbeat (progress is saved every few seconds).
pub fn process_alive(p: &Progress) -> bool {
    if p.host != crate::archive::lease::hostname() || p.pid == 0 {
        return chrono::Utc::now().timestamp_millis() - p.updated_ms < 60_000;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    p.pid == std::process::id() || unsafe { libc::kill(p.pid as libc::pid_t, 0) == 0 }
}

/// What `--list` shows for a replay's state: a running replay whose process
/// is gone died.
pub fn describe_phase(p: Option<&Progress>, alive: impl Fn(&Progress) -> bool) -> &'static str {
    match p {
        None => "starting",
        Some(p) => match p.phase {
            Phase::Done => "done",
            Phase::Interrupted => "interrupted",
            Phase::OutputClosed => "stopped (output closed)",
            Phase::Running if !alive(p) => "interrupted (process died)",
            Phase::Running => "running",
        },
    }
}

/// The lease a running replay holds and renews (its heartbeat): a second
/// `--resume` of the same replay, on this host or another, is refused while
/// it is renewed, and takes over once it is not (the holder died).
///
/// ```text
///   acquire  _fluxcap/replays/<id>/lease/<epoch>.json   (conditional create)
///   every ttl/3: renew (conditional update) ── fails ──▶ the run is cancelled
///   end: release (expires now)
/// ```
pub struct Heartbeat {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Option<crate::archive::lease::Lease>>,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Heartbeat {
    /// Take the lease of replay `id` (waiting out a holder on another host
    /// for up to `ttl` and a margin) and renew it until [`Heartbeat::stop`];
    /// if a renewal finds it taken over, `run` is cancelled.
    pub async fn start(
        archive: &Archive,
        id: &str,
        ttl: std::time::Duration,
        run: tokio_util::sync::CancellationToken,
    ) -> Result<Heartbeat> {
        use crate::archive::lease::{Lease, Subject};
        let mut lease = Lease::acquire_on(
            archive,
            Subject::Replay(id.to_string()),
            "fluxcap replay",
            ttl,
            0,
        )
        .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, l, id) = (stop.clone(), lost.clone(), id.to_string());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = s.cancelled() => return Some(lease),
                    _ = tokio::time::sleep(ttl / 3) => {}
                }
                if let Err(e) = lease.renew().await {
                    if matches!(e, Error::ReplayHeld { .. }) {
                        tracing::error!(replay = %id, "{e}");
                        l.store(true, std::sync::atomic::Ordering::SeqCst);
                        run.cancel();
                        return None;
                    }
                    // A store hiccup: the next renewal may work (the lease
                    // lasts ttl, renewals come every ttl/3).
                    tracing::warn!(replay = %id, "renewing the replay's lease: {e}");
                }
            }
        });
        Ok(Heartbeat { stop, task, lost })
    }

    /// Stop renewing and release the lease; `true` when it was lost to
    /// another process meanwhile.
    pub async fn stop(self) -> bool {
        self.stop.cancel();
        if let Ok(Some(lease)) = self.task.await
            && let Err(e) = lease.release().await
        {
            tracing::warn!("releasing the replay's lease: {e}");
        }
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_lines_are_known_by_their_position() {
        let line = r#"{"shard_id":"s-1","sequence_number":"42","subsequence_number":3,"partition_key":"k","size":9}"#;
        assert_eq!(rejected_key(line), Some(("s-1".into(), "42".into(), 3)));
        assert_eq!(rejected_key(r#"{"shard_id":"s-1"}"#), None);
        assert_eq!(rejected_key("not json"), None);
    }

    #[test]
    fn a_closed_output_is_a_stop_of_its_own() {
        let p = Progress {
            phase: Phase::OutputClosed,
            sent: 5,
            total: None,
            bytes: 0,
            file_offset: None,
            rejected: 0,
            shards: Vec::new(),
            error: None,
            updated_ms: 0,
            host: String::new(),
            pid: 0,
            selection_done: false,
            follow: BTreeMap::new(),
            through: None,
            targets: Vec::new(),
        };
        assert_eq!(
            describe_phase(Some(&p), |_| false),
            "stopped (output closed)"
        );
        let v = serde_json::to_value(&p).unwrap_or_default();
        assert_eq!(v["phase"], "output_closed");
    }
}
