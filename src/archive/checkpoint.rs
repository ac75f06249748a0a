//! Checkpoints and the commit protocol — state kept in the archive's own
//! store, never in a database.
//!
//! Each shard has a chain of immutable checkpoint *generations*
//! (`<stream>/_fluxcap/checkpoints/<shard>/<generation>.json`). A new
//! generation is written with a conditional create (`If-None-Match: *` on S3,
//! a no-clobber link on a local disk): two writers can never both write
//! generation N+1. A flush stages its files, commits, then publishes:
//!
//! ```text
//!   gen N     { position: P,  publish: [] }                       committed state
//!      │  (1) put staged files  _fluxcap/staging/<epoch>/dt=…/hr=…/<name>   (fsync locally)
//!      │  (2) create gen N+1 — COMMIT                             conditional create, then a
//!   gen N+1   { position: P', publish: [staged → dt=…/hr=…/<name>] }  LIST: no higher generation
//!      │  (3) publish: copy-if-not-exists staged → final          (hard link locally, fsync)
//!      │  (4) delete the staged files; delete generation N-1
//!
//!   crash before (2): nothing is committed or published; the staged files are
//!                     orphans under _fluxcap/ and are removed by the next holder
//!   crash in (2)-(4): gen N+1 is committed; whoever opens the shard next rolls
//!                     its publish list forward (publishing is idempotent: a
//!                     conditional copy either creates the file or finds it)
//! ```
//!
//! With `archive.publish = "hour"`, step (3) waits until the file's hour is
//! closed for the shard; the commits keep naming the staged files until then.
//! A closed hour's files are merged (a generation then names the merged
//! files instead of their parts) and published as one file, or as files of
//! about `archive.publish_target_size`.
//!
//! So a file appears under `dt=…/hr=…/` only once its flush is committed,
//! whole (a copy or a link, never a partial upload) and once (conditional);
//! nothing ever deletes or rewrites a published file. Readers that use the
//! checkpoints (`fluxcap sql`, replay, `verify`) also read the committed files
//! that are not published yet, from their staged copies.
//!
//! **Take-over and late writes.** Opening a shard writes a *take-over*
//! generation carrying the opener's lease epoch before anything else. A write
//! of an earlier holder still in flight (its process may be dead: the store
//! or the network held the request) either lands before it — then it is the
//! latest state, rolled forward like any commit — or loses the conditional
//! create. A conflict with a generation of an *earlier* epoch is therefore a
//! late write: the opener reads the chain again and carries on
//! ([`Error::StaleCheckpoint`] inside a run). Only a generation of the same
//! or a later epoch fences ([`Error::Fenced`]). Because old generations are
//! deleted, a stale writer may recreate a deleted generation number; the
//! LIST after each create catches that (a higher generation exists), so such
//! a writer never publishes.
//!
//! Each file also carries, in its footer, the positions before and after its
//! flush and the flush's record count, which `fluxcap verify` chains to prove
//! the absence of gaps.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use chrono::Utc;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::archive::footer::{key_values, merged_metadata, segments_of};
use crate::archive::key_index::{self, FileKeys};
use crate::archive::layout::{parse_data_file_name, parse_generation, staged_epoch};
use crate::archive::store::{Archive, put_conditional};
use crate::archive::writer::ParquetSettings;
use crate::error::{Error, Result};
use crate::record::Position;

/// Format version of checkpoint objects written by this version. Version 1
/// (files written at their final paths, `pending` intent lists) is still read.
pub const STATE_VERSION: u32 = 2;

/// One checkpoint generation of one shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Stream name.
    pub stream: String,
    /// Shard id.
    pub shard_id: String,
    /// Generation number (its object name); 0 means "never written".
    pub generation: u64,
    /// Last archived record; `None` when nothing is archived yet.
    pub position: Option<Position>,
    /// Arrival time (epoch ms) of the last archived record.
    pub last_arrival_ms: Option<i64>,
    /// Records archived for this shard so far (all committed files).
    pub records: u64,
    /// Files committed so far.
    pub files: u64,
    /// The shard is closed and was read to its end (or its end was lost, see `gaps`).
    pub finished: bool,
    /// Parent shards (lineage), as listed by Kinesis when the shard was first seen.
    pub parents: Vec<String>,
    /// Version 1 only: files at their final paths of an uncommitted flush.
    /// Version 2 never writes it (files are staged instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// Committed files of the last flush that may not be published yet. A
    /// reader uses the published file when it exists, the staged one otherwise.
    #[serde(default)]
    pub publish: Vec<PublishEntry>,
    /// Lease epoch of the archiver that wrote this generation (0: none, or version 1).
    #[serde(default)]
    pub epoch: u64,
    /// Records known to be lost (expired from the stream before they were
    /// archived), oldest first. Reported by `status` and `verify`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<Gap>,
    /// The archiver that wrote this generation.
    pub owner: String,
    /// When it was written (RFC 3339).
    pub written_at: String,
}

/// A committed data file: where it was staged and where it is published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishEntry {
    /// The staged object (under `_fluxcap/staging/`).
    pub staged: String,
    /// The published path (under `dt=…/hr=…/`).
    pub path: String,
    /// Size in bytes (the same for both).
    pub size: u64,
}

/// Records of a shard that can never be archived: they left the stream's
/// retention before the archiver read them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Gap {
    /// Last archived record before the gap (`None`: the start of the shard).
    pub after: Option<Position>,
    /// First record archived after the gap (`None`: the end of the shard).
    pub until: Option<Position>,
    /// Why the records are missing.
    pub reason: String,
    /// When the gap was found (RFC 3339).
    pub detected_at: String,
}

impl Checkpoint {
    fn initial(stream: &str, shard: &str, parents: Vec<String>, owner: &str) -> Self {
        Checkpoint {
            version: STATE_VERSION,
            stream: stream.into(),
            shard_id: shard.into(),
            generation: 0,
            position: None,
            last_arrival_ms: None,
            records: 0,
            files: 0,
            finished: false,
            parents,
            pending: vec![],
            publish: vec![],
            epoch: 0,
            gaps: vec![],
            owner: owner.into(),
            written_at: Utc::now().to_rfc3339(),
        }
    }

    /// Whether a data file of this shard whose first record is `first`
    /// belongs to a committed flush. Flushes of a shard are sequential, so a
    /// file is committed exactly when it starts at or before the committed
    /// position.
    pub fn covers(&self, first: &Position) -> bool {
        self.position.as_ref().is_some_and(|p| first <= p)
    }
}

/// Parse a path stored in a state object (already encoded; `Path::from`
/// would encode it a second time).
pub fn stored_path(archive: &Archive, s: &str) -> Result<Path> {
    Path::parse(s).map_err(|e| Error::CorruptState {
        object: archive.describe(&Path::default()),
        message: format!("bad stored path {s:?}: {e}"),
    })
}

/// Read the latest generation of a shard's checkpoint, if any.
pub async fn load_latest(
    archive: &Archive,
    stream: &str,
    shard: &str,
) -> Result<Option<Checkpoint>> {
    let dir = archive.layout.checkpoint_dir(stream, shard);
    let mut attempt = 0;
    loop {
        let objects = archive.list(&dir).await?;
        let Some(latest) = objects
            .iter()
            .filter_map(|o| Some((parse_generation(o.location.filename()?)?, &o.location)))
            .max_by_key(|(g, _)| *g)
        else {
            return Ok(None);
        };
        match read_json(archive, latest.1).await {
            // Deleted between the listing and the read: a writer moved on.
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) if attempt < 5 => attempt += 1,
            other => return other.map(Some),
        }
    }
}

pub use crate::archive::manifest::load_all;

pub(crate) async fn read_json<T: for<'de> Deserialize<'de>>(
    archive: &Archive,
    path: &Path,
) -> Result<T> {
    let bytes = archive.get_bytes(path).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::CorruptState {
        object: archive.describe(path),
        message: e.to_string(),
    })
}

/// When committed files are published (`archive.publish`).
#[derive(Debug, Clone)]
pub struct PublishPolicy {
    /// Publish a shard's flushes of an hour merged, once the hour is closed
    /// (`false`: every flush's files right after its commit).
    pub hourly: bool,
    /// Target size of a merged file, bytes.
    pub target_size: u64,
    /// How merged files are encoded.
    pub settings: ParquetSettings,
}

impl Default for PublishPolicy {
    fn default() -> Self {
        PublishPolicy {
            hourly: false,
            target_size: 256 << 20,
            settings: ParquetSettings::default(),
        }
    }
}

impl PublishPolicy {
    /// The policy `archive.publish` and `archive.publish_target_size` set.
    pub fn from_config(a: &crate::config::ArchiveConfig) -> Self {
        PublishPolicy {
            hourly: a.publish == crate::config::PublishMode::Hour,
            target_size: a.publish_target_size.0,
            settings: ParquetSettings::from(a),
        }
    }
}

/// The writable checkpoint chain of one shard, owned by one archiver.
#[derive(Debug)]
pub struct ShardCheckpoint {
    archive: Archive,
    /// Latest generation written or read.
    current: Checkpoint,
    /// Lease epoch of this writer (0 for a writer without a lease).
    epoch: u64,
    /// When committed files are published.
    policy: PublishPolicy,
    /// Published paths still named in `current.publish` (hourly: dropped
    /// from the list by the next generation).
    published: HashSet<String>,
}

impl ShardCheckpoint {
    /// Open a shard's chain as the holder of lease `epoch`: read the latest
    /// generation, recover what it left unfinished (publish its committed
    /// files; remove the files of a version-1 flush that never committed),
    /// write a take-over generation, and remove staged files of earlier
    /// epochs. A late write of an earlier holder that lands meanwhile is
    /// read and recovered in turn. A finished shard is only recovered.
    pub async fn open(
        archive: &Archive,
        stream: &str,
        shard: &str,
        parents: Vec<String>,
        owner: &str,
        epoch: u64,
    ) -> Result<Self> {
        Self::open_with(
            archive,
            stream,
            shard,
            parents,
            owner,
            epoch,
            PublishPolicy::default(),
        )
        .await
    }

    /// [`ShardCheckpoint::open`] with a publication policy. With hourly
    /// publication, committed files of hours that are not closed stay staged
    /// (and named by the take-over generation).
    pub async fn open_with(
        archive: &Archive,
        stream: &str,
        shard: &str,
        parents: Vec<String>,
        owner: &str,
        epoch: u64,
        policy: PublishPolicy,
    ) -> Result<Self> {
        let mut late_writes = 0;
        loop {
            let current = match load_latest(archive, stream, shard).await? {
                Some(c) => c,
                None => Checkpoint::initial(stream, shard, parents.clone(), owner),
            };
            if current.epoch > epoch {
                return Err(Error::Fenced {
                    stream: stream.into(),
                    object: archive.describe(&archive.layout.checkpoint(
                        stream,
                        shard,
                        current.generation,
                    )),
                });
            }
            let mut me = ShardCheckpoint {
                archive: archive.clone(),
                current,
                epoch,
                policy: policy.clone(),
                published: HashSet::new(),
            };
            if !policy.hourly || me.current.finished {
                me.publish_committed().await?;
            }
            if !me.current.pending.is_empty() {
                tracing::info!(
                    stream,
                    shard,
                    files = me.current.pending.len(),
                    "recovering a flush interrupted under the version-1 protocol: removing its uncommitted files"
                );
                for f in me.current.pending.clone() {
                    let p = stored_path(archive, &f)?;
                    archive.delete_with_leftovers(&p).await?;
                }
            }
            if me.current.finished && me.current.pending.is_empty() {
                return Ok(me);
            }
            let mut next = me.current.clone();
            next.pending.clear();
            if !policy.hourly {
                next.publish.clear();
            }
            next.owner = owner.to_string();
            match me.write_next(next).await {
                Ok(()) => {
                    me.remove_orphans().await?;
                    return Ok(me);
                }
                Err(Error::StaleCheckpoint {
                    object, epoch: e, ..
                }) if late_writes < 20 => {
                    late_writes += 1;
                    tracing::warn!(
                        stream,
                        shard,
                        "a write of an earlier archiver (lease epoch {e}) landed late at {object}; reading the shard's state again and recovering it"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The current (committed) state.
    pub fn state(&self) -> &Checkpoint {
        &self.current
    }

    /// How far the shard's records are in published files, by what this
    /// writer did: the last such record, and whether every committed file is
    /// published. Without hourly publication a commit publishes its files
    /// before it returns, so that is the committed position; hourly, it is the
    /// position just before the first record of the earliest file still
    /// staged (files of the take-over generation count as staged: they may be).
    pub fn published_through(&self) -> (Option<Position>, bool) {
        if !self.policy.hourly {
            return (self.current.position.clone(), true);
        }
        let first = self
            .unpublished()
            .iter()
            .filter_map(|e| {
                Path::parse(&e.path)
                    .ok()?
                    .filename()
                    .and_then(parse_data_file_name)
                    .map(|d| d.first)
            })
            .min();
        match first {
            None => (self.current.position.clone(), true),
            Some(f) => (crate::archive::positions::before(&f), false),
        }
    }

    /// The lease epoch this chain is written under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Commit a flush whose files are staged (step 2), then publish them
    /// (steps 3–4). `position` is the last record of the flush.
    pub async fn commit(&mut self, flush: Commit) -> Result<()> {
        let mut next = self.current.clone();
        if flush.position.is_some() {
            next.position = flush.position;
            next.last_arrival_ms = flush.last_arrival_ms;
        }
        next.records += flush.records;
        next.files += flush.files.len() as u64;
        next.finished = flush.finished;
        next.pending.clear();
        if let Some(g) = flush.gap {
            next.gaps.push(g);
        }
        if !self.policy.hourly {
            next.publish = flush.files;
            self.write_next(next).await?;
            return self.publish_committed().await;
        }
        next.publish = self.unpublished();
        next.publish.extend(flush.files);
        self.write_next(next).await?;
        let closed = if flush.finished {
            Some(i64::MAX)
        } else {
            flush.closed_before_ms
        };
        self.publish_closed(closed).await
    }

    /// Entries of the current generation not published yet.
    fn unpublished(&self) -> Vec<PublishEntry> {
        self.current
            .publish
            .iter()
            .filter(|e| !self.published.contains(&e.path))
            .cloned()
            .collect()
    }

    /// Hourly publication: publish the committed files of every hour that
    /// ended at or before `closed_before_ms` (epoch ms), a shard's flushes of
    /// an hour merged into files of about the target size. Merging commits a
    /// generation that names the merged files instead of their parts, so a
    /// crash leaves either the parts or the merged files committed, never both.
    pub async fn publish_closed(&mut self, closed_before_ms: Option<i64>) -> Result<()> {
        let (true, Some(cb)) = (self.policy.hourly, closed_before_ms) else {
            return Ok(());
        };
        let pending = self.unpublished();
        let mut closed: BTreeMap<i64, Vec<(Position, PublishEntry)>> = BTreeMap::new();
        let mut open = Vec::new();
        for e in pending {
            let path = stored_path(&self.archive, &e.path)?;
            let hour = hour_of_path(&path);
            let first = path
                .filename()
                .and_then(parse_data_file_name)
                .map(|d| d.first);
            match (hour, first) {
                (Some(h), Some(first)) if h.saturating_add(3_600_000) <= cb => {
                    closed.entry(h).or_default().push((first, e))
                }
                _ => open.push(e),
            }
        }
        if closed.is_empty() {
            return Ok(());
        }
        let mut ready = Vec::new();
        let mut parts = Vec::new();
        // The merged files' key summaries (see `key_index`).
        let mut keys = Vec::new();
        for (hour, mut entries) in closed {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            // Consecutive runs of parts up to the target size.
            let mut chunk: Vec<PublishEntry> = Vec::new();
            let mut size = 0u64;
            let mut chunks = Vec::new();
            for (_, e) in entries {
                if !chunk.is_empty() && size + e.size > self.policy.target_size {
                    chunks.push(std::mem::take(&mut chunk));
                    size = 0;
                }
                size += e.size;
                chunk.push(e);
            }
            chunks.push(chunk);
            for chunk in chunks {
                if chunk.len() == 1 {
                    ready.extend(chunk);
                } else {
                    let (entry, k) = self.merge(hour, &chunk).await?;
                    ready.push(entry);
                    keys.extend(k);
                    parts.extend(chunk);
                }
            }
        }
        if !parts.is_empty() {
            let mut next = self.current.clone();
            next.publish = open;
            next.publish.extend(ready.iter().cloned());
            self.write_next(next).await?;
        }
        for e in &ready {
            let staged = stored_path(&self.archive, &e.staged)?;
            let path = stored_path(&self.archive, &e.path)?;
            self.archive.publish(&staged, &path, e.size).await?;
            self.published.insert(e.path.clone());
        }
        for p in parts {
            let staged = stored_path(&self.archive, &p.staged)?;
            self.archive.delete_with_leftovers(&staged).await?;
        }
        key_index::write_after_commit(&self.archive, &self.current.stream, keys).await;
        Ok(())
    }

    /// Merge the staged files `parts` (consecutive, of one hour) into one
    /// staged file whose footer keeps each part's flush segments; also
    /// returns its keys for its key summary (when bloom filters are on).
    async fn merge(
        &self,
        hour: i64,
        parts: &[PublishEntry],
    ) -> Result<(PublishEntry, Option<(Path, FileKeys)>)> {
        let mut batches = Vec::new();
        let mut segments = Vec::new();
        let mut first: Option<Position> = None;
        let mut count = 0usize;
        for p in parts {
            let staged = stored_path(&self.archive, &p.staged)?;
            let name = self.archive.describe(&staged);
            let bytes = self.archive.get_bytes(&staged).await?;
            let perr = |source| Error::Parquet {
                object: name.clone(),
                source,
            };
            let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(perr)?;
            let kv = key_values(builder.metadata().file_metadata());
            let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
            segments.extend(segments_of(&kv, rows));
            for b in builder.build().map_err(perr)? {
                let b = b?;
                count += b.num_rows();
                batches.push(b);
            }
            if first.is_none() {
                first = stored_path(&self.archive, &p.path)?
                    .filename()
                    .and_then(parse_data_file_name)
                    .map(|d| d.first);
            }
        }
        let first = first.ok_or_else(|| Error::CorruptState {
            object: self
                .archive
                .describe(&self.archive.layout.staging_root(&self.current.stream)),
            message: "a staged file without a data file name".into(),
        })?;
        let (stream, shard) = (&self.current.stream, &self.current.shard_id);
        let path = self
            .archive
            .layout
            .data_file(stream, hour, shard, &first, count);
        let settings = self.policy.settings.clone();
        let metadata = merged_metadata(&segments, shard);
        let name = self.archive.describe(&path);
        let p = path.clone();
        let (bytes, keys) = tokio::task::spawn_blocking(move || {
            let keys = settings
                .bloom_filters
                .then(|| FileKeys::of_batches(&p, &batches).map(|k| (p, k)))
                .flatten();
            settings
                .encode(&batches, metadata, &name)
                .map(|b| (b, keys))
        })
        .await
        .map_err(|e| Error::Usage(format!("internal error: encoder task failed: {e}")))??;
        let entry = stage(&self.archive, stream, self.epoch, &path, bytes.into()).await?;
        Ok((entry, keys))
    }

    /// Publish the committed files of the current generation and remove
    /// their staged copies (idempotent; anyone may do it).
    async fn publish_committed(&self) -> Result<()> {
        for f in &self.current.publish {
            let staged = stored_path(&self.archive, &f.staged)?;
            let path = stored_path(&self.archive, &f.path)?;
            self.archive.publish(&staged, &path, f.size).await?;
        }
        Ok(())
    }

    /// Remove staged files of this shard that no commit names: their flushes
    /// never committed (committed ones were published above), and no earlier
    /// holder can commit any more (the take-over generation exists).
    async fn remove_orphans(&self) -> Result<()> {
        let root = self.archive.layout.staging_root(&self.current.stream);
        let prefix = format!("{}_", self.current.shard_id);
        for o in self.archive.list(&root).await? {
            let ours = o.location.filename().is_some_and(|n| {
                n.starts_with(&prefix)
                    && parse_data_file_name(n).is_some_and(|d| d.shard_id == self.current.shard_id)
            });
            // Our own epoch's too: they are from a flush of this process
            // that failed to commit (no task of ours writes this shard now).
            let referenced = self
                .current
                .publish
                .iter()
                .any(|p| p.staged == o.location.as_ref());
            if ours && !referenced && staged_epoch(&o.location).is_some_and(|e| e <= self.epoch) {
                tracing::debug!(
                    "removing an uncommitted staged file: {}",
                    self.archive.describe(&o.location)
                );
                self.archive.delete_with_leftovers(&o.location).await?;
            }
        }
        Ok(())
    }

    async fn write_next(&mut self, mut next: Checkpoint) -> Result<()> {
        next.version = STATE_VERSION;
        next.generation = self.current.generation + 1;
        next.epoch = self.epoch;
        next.written_at = Utc::now().to_rfc3339();
        let stream = next.stream.clone();
        let shard = next.shard_id.clone();
        let path = self
            .archive
            .layout
            .checkpoint(&stream, &shard, next.generation);
        let body = serde_json::to_vec_pretty(&next).map_err(|e| Error::CorruptState {
            object: self.archive.describe(&path),
            message: e.to_string(),
        })?;
        match create_object(&self.archive, &path, body).await {
            Ok(()) => {}
            Err(Error::Fenced { .. }) => {
                // Who wrote it? An earlier epoch is a late write, not a rival.
                let theirs: Checkpoint = read_json(&self.archive, &path).await?;
                return Err(if theirs.epoch < self.epoch {
                    Error::StaleCheckpoint {
                        stream,
                        shard,
                        object: self.archive.describe(&path),
                        epoch: theirs.epoch,
                    }
                } else {
                    Error::Fenced {
                        stream,
                        object: self.archive.describe(&path),
                    }
                });
            }
            Err(e) => return Err(e),
        }
        // A stale writer may have recreated a generation number that was
        // garbage-collected: the chain is ours only if nothing is above it.
        let dir = self.archive.layout.checkpoint_dir(&stream, &shard);
        let higher = self
            .archive
            .list(&dir)
            .await?
            .iter()
            .filter_map(|o| parse_generation(o.location.filename()?))
            .any(|g| g > next.generation);
        if higher {
            let _ = self.archive.store.delete(&path).await;
            return Err(Error::Fenced {
                stream,
                object: self.archive.describe(&path),
            });
        }
        let old = self.current.generation;
        self.current = next;
        // Keep the previous generation for inspection; drop older ones.
        if old >= 2 {
            let stale = self.archive.layout.checkpoint(&stream, &shard, old - 1);
            if let Err(e) = self.archive.store.delete(&stale).await
                && !matches!(e, object_store::Error::NotFound { .. })
            {
                tracing::debug!("could not delete old checkpoint {stale}: {e}");
            }
        }
        Ok(())
    }
}

/// What one flush commits.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// Last record of the flush (`None` for an empty flush, e.g. the end of a shard).
    pub position: Option<Position>,
    /// Its arrival time (epoch ms).
    pub last_arrival_ms: Option<i64>,
    /// Records in the flush.
    pub records: u64,
    /// Its staged files.
    pub files: Vec<PublishEntry>,
    /// The shard is read to its end.
    pub finished: bool,
    /// Records found lost before this flush.
    pub gap: Option<Gap>,
    /// Hourly publication: hours that ended at or before this time (epoch
    /// ms) are closed for this shard and get published.
    pub closed_before_ms: Option<i64>,
}

/// Start (epoch ms) of the hour partition a data file path is in.
pub fn hour_of_path(path: &Path) -> Option<i64> {
    let parts: Vec<_> = path.parts().collect();
    let n = parts.len();
    if n < 3 {
        return None;
    }
    let dt = parts[n - 3].as_ref().strip_prefix("dt=")?;
    let hr: u32 = parts[n - 2].as_ref().strip_prefix("hr=")?.parse().ok()?;
    let day = chrono::NaiveDate::parse_from_str(dt, "%Y-%m-%d").ok()?;
    Some(day.and_hms_opt(hr, 0, 0)?.and_utc().timestamp_millis())
}

/// Create `path` only if it does not exist; a lost race is [`Error::Fenced`].
pub(crate) async fn create_object(archive: &Archive, path: &Path, body: Vec<u8>) -> Result<()> {
    let what = archive.describe(path);
    match put_conditional(
        archive.store.as_ref(),
        &what,
        path,
        body.into(),
        PutMode::Create,
    )
    .await
    {
        Ok(_) => archive.sync_local(path).await,
        Err(object_store::Error::AlreadyExists { .. })
        | Err(object_store::Error::Precondition { .. }) => Err(Error::Fenced {
            stream: String::new(),
            object: what,
        }),
        Err(e) => Err(Error::store(what, e)),
    }
}

/// Stage one encoded data file of a flush for `published` (step 1): upload it
/// under `_fluxcap/staging/<epoch>/` and make it durable.
pub async fn stage(
    archive: &Archive,
    stream: &str,
    epoch: u64,
    published: &Path,
    bytes: Bytes,
) -> Result<PublishEntry> {
    let staged = archive
        .layout
        .staged(stream, epoch, published)
        .ok_or_else(|| Error::CorruptState {
            object: archive.describe(published),
            message: "not a data file path of this stream".into(),
        })?;
    let size = bytes.len() as u64;
    archive.put_data(&staged, bytes).await?;
    Ok(PublishEntry {
        staged: staged.to_string(),
        path: published.to_string(),
        size,
    })
}
