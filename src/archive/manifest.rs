//! Loading every shard's latest checkpoint of a stream — concurrently, while
//! an archiver may be committing, and without reading the checkpoint of each
//! finished shard again.
//!
//! ```text
//!   <stream>/_fluxcap/checkpoints/<shard>/<generation>.json   one LIST for all shards
//!   <stream>/_fluxcap/finished.json                           { version, stream, shards: [final checkpoints] }
//! ```
//!
//! A finished shard's last generation never changes: nothing is written
//! after it, and it is never deleted (only the generation before the
//! previous one is). So its checkpoint is known by its key and generation
//! number, and the *finished manifest* — written by the lease holder, a
//! cache and never the truth — keeps a copy of each. [`load_all`] lists the
//! checkpoint generations once, takes a shard from the manifest when the
//! manifest holds exactly the generation the listing shows, and reads the
//! others concurrently ([`LOAD_CONCURRENCY`] at a time). A generation
//! deleted between the listing and the read (an archiver committed twice
//! meanwhile) makes it list that one shard again.
//!
//! A missing, older-version-less or unreadable manifest only costs reads: an
//! archive written before the manifest existed loads as before; a manifest
//! entry that does not match the listing is ignored.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::archive::checkpoint::{Checkpoint, load_latest, read_json};
use crate::archive::layout::parse_generation;
use crate::archive::store::Archive;
use crate::error::{Error, Result};

/// Format version of the finished manifest written by this version.
pub const FINISHED_VERSION: u32 = 1;

/// Checkpoint objects read at once by [`load_all`].
pub const LOAD_CONCURRENCY: usize = 16;

/// The final checkpoints of a stream's finished shards.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FinishedManifest {
    /// Format version ([`FINISHED_VERSION`]).
    pub version: u32,
    /// Stream name.
    pub stream: String,
    /// When it was written (RFC 3339).
    pub written_at: String,
    /// The last generation of each finished shard (checkpoint key order).
    pub shards: Vec<Checkpoint>,
}

/// Read the finished manifest of `stream`; `None` when there is none or it
/// cannot be used (it is only a cache: the checkpoints are read instead).
pub async fn read_manifest(archive: &Archive, stream: &str) -> Option<FinishedManifest> {
    let path = archive.layout.finished_manifest(stream);
    let m: FinishedManifest = match read_json(archive, &path).await {
        Ok(m) => m,
        Err(Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => return None,
        Err(e) => {
            tracing::warn!(
                "ignoring the finished-shard manifest (reading the checkpoints instead): {e}"
            );
            return None;
        }
    };
    if m.version == 0 || m.version > FINISHED_VERSION || m.stream != stream {
        tracing::warn!(
            "ignoring the finished-shard manifest {} (version {}, stream {:?}): reading the checkpoints instead",
            archive.describe(&path),
            m.version,
            m.stream
        );
        return None;
    }
    Some(m)
}

/// Latest generation (number and object) of every checkpoint key of `stream`.
async fn list_latest(archive: &Archive, stream: &str) -> Result<BTreeMap<String, (u64, Path)>> {
    let root = archive.layout.checkpoints_root(stream);
    let mut latest: BTreeMap<String, (u64, Path)> = BTreeMap::new();
    for o in archive.list(&root).await? {
        let parts: Vec<_> = o.location.parts().collect();
        let n = parts.len();
        if n < 2 {
            continue;
        }
        let Some(g) = parse_generation(parts[n - 1].as_ref()) else {
            continue;
        };
        let shard = parts[n - 2].as_ref().to_string();
        let e = latest.entry(shard).or_insert((g, o.location.clone()));
        if g >= e.0 {
            *e = (g, o.location.clone());
        }
    }
    Ok(latest)
}

/// Latest checkpoint of every shard of `stream` that has one, in checkpoint
/// key order. Finished shards come from the finished manifest when it
/// matches the listing; the others are read concurrently, and a shard whose
/// generation vanished meanwhile is listed and read again.
pub async fn load_all(archive: &Archive, stream: &str) -> Result<Vec<Checkpoint>> {
    let (latest, manifest) =
        tokio::join!(list_latest(archive, stream), read_manifest(archive, stream));
    let latest = latest?;
    let mut known: HashMap<String, Checkpoint> = manifest
        .map(|m| {
            m.shards
                .into_iter()
                .map(|c| (c.shard_id.clone(), c))
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<Checkpoint> = Vec::with_capacity(latest.len());
    let mut to_read = Vec::new();
    for (key, (generation, path)) in latest {
        match known.remove(&key) {
            Some(c) if c.finished && c.generation == generation && c.stream == stream => {
                out.push(c)
            }
            _ => to_read.push((key, path)),
        }
    }
    let read: Vec<Option<Checkpoint>> = futures::stream::iter(to_read)
        .map(|(key, path)| async move {
            match read_json::<Checkpoint>(archive, &path).await {
                Ok(c) => Ok(Some(c)),
                // Deleted after the listing: an archiver moved this shard on.
                Err(Error::Store {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => {
                    tracing::debug!(
                        "{} was deleted after the listing; listing shard {key} again",
                        archive.describe(&path)
                    );
                    load_latest(archive, stream, &key).await
                }
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(LOAD_CONCURRENCY)
        .try_collect()
        .await?;
    out.extend(read.into_iter().flatten());
    out.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
    Ok(out)
}

/// Record the finished shards among `ckpts` (latest checkpoints of
/// `stream`) in its finished manifest, keeping the entries of other
/// finished shards it holds. Writes only when something is new. Only the
/// stream's lease holder calls this; the result is a cache, so a lost
/// update only costs the next reader some reads. Returns whether it wrote.
pub async fn record_finished(
    archive: &Archive,
    stream: &str,
    ckpts: &[Checkpoint],
) -> Result<bool> {
    let current = read_manifest(archive, stream).await.unwrap_or_default();
    let mut shards: BTreeMap<String, Checkpoint> = current
        .shards
        .iter()
        .filter(|c| c.finished && c.stream == stream)
        .map(|c| (c.shard_id.clone(), c.clone()))
        .collect();
    let mut changed = shards.len() != current.shards.len();
    for c in ckpts.iter().filter(|c| c.finished && c.stream == stream) {
        if shards.get(&c.shard_id) != Some(c) {
            shards.insert(c.shard_id.clone(), c.clone());
            changed = true;
        }
    }
    if !changed {
        return Ok(false);
    }
    let manifest = FinishedManifest {
        version: FINISHED_VERSION,
        stream: stream.to_string(),
        written_at: Utc::now().to_rfc3339(),
        shards: shards.into_values().collect(),
    };
    let path = archive.layout.finished_manifest(stream);
    let body = serde_json::to_vec(&manifest).map_err(|e| Error::CorruptState {
        object: archive.describe(&path),
        message: e.to_string(),
    })?;
    archive.put_bytes(&path, body.into()).await?;
    archive.sync_local(&path).await?;
    Ok(true)
}

/// [`record_finished`] for one shard that just finished: reads its latest
/// checkpoint (key `key`) and records it.
pub async fn record_finished_shard(archive: &Archive, stream: &str, key: &str) -> Result<bool> {
    match load_latest(archive, stream, key).await? {
        Some(c) if c.finished => record_finished(archive, stream, &[c]).await,
        _ => Ok(false),
    }
}
