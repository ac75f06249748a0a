//! Checkpoints and the commit protocol — state kept in the archive's own
//! store, never in a database.
//!
//! Each shard has a chain of immutable checkpoint *generations*
//! (`<stream>/_fluxcap/checkpoints/<shard>/<generation>.json`). A new
//! generation is written with a conditional create (`PutMode::Create`, i.e.
//! `If-None-Match: *` on S3, a no-clobber link on a local disk): two writers
//! can never both write generation N+1, so the loser is *fenced* and stops
//! without committing. Every flush is two generations around the data files:
//!
//! ```text
//!   gen N     { position: P,  pending: [] }            committed state
//!      │  (1) create gen N+1 — intent
//!   gen N+1   { position: P,  pending: [f1, f2] }      files about to be written
//!      │  (2) put f1, f2   (deterministic names: shard + first record + count)
//!      │  (3) create gen N+2 — commit
//!   gen N+2   { position: P', pending: [] }            P' = last record of f1, f2
//!      │  (4) delete generations < N+1 (best effort)
//!
//!   crash before (1): nothing changed; the re-run reads again from P
//!   crash in (1)-(3): recovery finds `pending` in the latest generation,
//!                     deletes those files (and local upload leftovers), writes
//!                     gen+1 { position: P, pending: [] }, and reads from P
//!   crash after (3):  P' is committed; files are complete
//! ```
//!
//! So at any instant after recovery, the files of a shard hold exactly the
//! records up to its committed position: no gap, no duplicate, for any engine
//! reading the raw directory. Each file also carries, in its footer, the
//! positions before and after its flush and the flush's record count, which
//! `fluxcap verify` chains to prove the absence of gaps.
//!
//! A per-stream [`Lease`] (also immutable epochs created conditionally) makes
//! a second archiver fail fast instead of fencing mid-run. A lease left by a
//! process that died on this host is taken over at once; one from another host
//! when it expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::archive::layout::parse_generation;
use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::record::Position;

/// Format version of checkpoint and lease objects.
pub const STATE_VERSION: u32 = 1;

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
    /// The shard is closed and was read to its end.
    pub finished: bool,
    /// Parent shards (lineage), as listed by Kinesis when the shard was first seen.
    pub parents: Vec<String>,
    /// Data files being written by an uncommitted flush (intent); empty when committed.
    pub pending: Vec<String>,
    /// The archiver that wrote this generation.
    pub owner: String,
    /// When it was written (RFC 3339).
    pub written_at: String,
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
            owner: owner.into(),
            written_at: Utc::now().to_rfc3339(),
        }
    }
}

/// Read the latest generation of a shard's checkpoint, if any.
pub async fn load_latest(
    archive: &Archive,
    stream: &str,
    shard: &str,
) -> Result<Option<Checkpoint>> {
    let dir = archive.layout.checkpoint_dir(stream, shard);
    let objects = archive.list(&dir).await?;
    let Some(latest) = objects
        .iter()
        .filter_map(|o| Some((parse_generation(o.location.filename()?)?, &o.location)))
        .max_by_key(|(g, _)| *g)
    else {
        return Ok(None);
    };
    read_json(archive, latest.1).await.map(Some)
}

/// Latest checkpoint of every shard of `stream` that has one.
pub async fn load_all(archive: &Archive, stream: &str) -> Result<Vec<Checkpoint>> {
    let root = archive.layout.checkpoints_root(stream);
    let objects = archive.list(&root).await?;
    let mut latest: std::collections::BTreeMap<String, (u64, Path)> = Default::default();
    for o in objects {
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
    let mut out = Vec::with_capacity(latest.len());
    for (_, (_, p)) in latest {
        out.push(read_json(archive, &p).await?);
    }
    Ok(out)
}

async fn read_json<T: for<'de> Deserialize<'de>>(archive: &Archive, path: &Path) -> Result<T> {
    let bytes = archive.get_bytes(path).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::CorruptState {
        object: archive.describe(path),
        message: e.to_string(),
    })
}

/// The writable checkpoint chain of one shard, owned by one archiver.
#[derive(Debug)]
pub struct ShardCheckpoint {
    archive: Archive,
    /// Latest generation written or read.
    current: Checkpoint,
}

impl ShardCheckpoint {
    /// Open a shard's chain: read the latest generation and recover an
    /// interrupted flush (delete its files, write a clean generation).
    pub async fn open(
        archive: &Archive,
        stream: &str,
        shard: &str,
        parents: Vec<String>,
        owner: &str,
    ) -> Result<Self> {
        let current = match load_latest(archive, stream, shard).await? {
            Some(c) => c,
            None => Checkpoint::initial(stream, shard, parents, owner),
        };
        let mut me = ShardCheckpoint {
            archive: archive.clone(),
            current,
        };
        me.current.owner = owner.to_string();
        if !me.current.pending.is_empty() {
            tracing::info!(
                stream,
                shard,
                files = me.current.pending.len(),
                "recovering an interrupted flush: removing its uncommitted files"
            );
            for f in me.current.pending.clone() {
                archive.delete_with_leftovers(&Path::from(f)).await?;
            }
            let mut next = me.current.clone();
            next.pending.clear();
            me.write_next(next).await?;
        }
        Ok(me)
    }

    /// The current (committed) state.
    pub fn state(&self) -> &Checkpoint {
        &self.current
    }

    /// Step (1): record the files about to be written.
    pub async fn begin(&mut self, files: &[Path]) -> Result<()> {
        let mut next = self.current.clone();
        next.pending = files.iter().map(|p| p.to_string()).collect();
        self.write_next(next).await
    }

    /// Step (3): commit the flush; `position` is the last record written.
    pub async fn commit(
        &mut self,
        position: Option<Position>,
        last_arrival_ms: Option<i64>,
        added_records: u64,
        added_files: u64,
        finished: bool,
    ) -> Result<()> {
        let mut next = self.current.clone();
        if position.is_some() {
            next.position = position;
            next.last_arrival_ms = last_arrival_ms;
        }
        next.records += added_records;
        next.files += added_files;
        next.finished = finished;
        next.pending.clear();
        self.write_next(next).await
    }

    async fn write_next(&mut self, mut next: Checkpoint) -> Result<()> {
        next.generation = self.current.generation + 1;
        next.written_at = Utc::now().to_rfc3339();
        let path = self
            .archive
            .layout
            .checkpoint(&next.stream, &next.shard_id, next.generation);
        let body = serde_json::to_vec_pretty(&next).map_err(|e| Error::CorruptState {
            object: self.archive.describe(&path),
            message: e.to_string(),
        })?;
        create_object(&self.archive, &path, body, &next.stream).await?;
        let old = self.current.generation;
        self.current = next;
        // Keep the previous generation for inspection; drop older ones.
        if old >= 2 {
            let stale = self.archive.layout.checkpoint(
                &self.current.stream,
                &self.current.shard_id,
                old - 1,
            );
            if let Err(e) = self.archive.store.delete(&stale).await
                && !matches!(e, object_store::Error::NotFound { .. })
            {
                tracing::debug!("could not delete old checkpoint {stale}: {e}");
            }
        }
        Ok(())
    }
}

/// Create `path` only if it does not exist; a lost race is [`Error::Fenced`].
async fn create_object(archive: &Archive, path: &Path, body: Vec<u8>, stream: &str) -> Result<()> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let mut attempt = 0u32;
    loop {
        match archive
            .store
            .put_opts(path, PutPayload::from(body.clone()), opts.clone())
            .await
        {
            Ok(_) => return Ok(()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                // A retried request whose first attempt succeeded (the response
                // was lost) also lands here: the object is ours if it holds
                // exactly our bytes (they include our owner id and a timestamp).
                if let Ok(b) = archive.get_bytes(path).await
                    && b.as_ref() == body.as_slice()
                {
                    return Ok(());
                }
                return Err(Error::Fenced {
                    stream: stream.to_string(),
                    object: archive.describe(path),
                });
            }
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::warn!("retrying write of {}: {e}", archive.describe(path));
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => return Err(Error::store(archive.describe(path), e)),
        }
    }
}

/// A lease epoch object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Format version.
    pub version: u32,
    /// Epoch (object name); increases with every new holder.
    pub epoch: u64,
    /// Random id of the holding process.
    pub owner: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the holder started (RFC 3339).
    pub started_at: String,
    /// Lease end, epoch ms; 0 once released.
    pub expires_at_ms: i64,
}

impl LeaseRecord {
    fn describe(&self) -> String {
        format!(
            "host {}, pid {}, since {}",
            self.host, self.pid, self.started_at
        )
    }

    fn abandoned(&self, now_ms: i64) -> bool {
        self.expires_at_ms <= now_ms || (self.host == hostname() && !pid_alive(self.pid))
    }
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown-host".into())
}

fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let p = std::path::Path::new("/proc");
    if !p.exists() {
        return true; // cannot tell: assume alive
    }
    // A zombie still has a /proc entry but will never renew.
    match std::fs::read_to_string(p.join(pid.to_string()).join("stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A held per-stream lease. Renew it at least every `ttl / 3`.
#[derive(Debug)]
pub struct Lease {
    archive: Archive,
    stream: String,
    record: LeaseRecord,
    ttl: Duration,
    /// Lease end (epoch ms) as last written; shard tasks check it before a flush.
    expires: Arc<AtomicI64>,
}

impl Lease {
    /// Acquire the lease of `stream`, or fail with [`Error::LeaseHeld`].
    pub async fn acquire(
        archive: &Archive,
        stream: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Self> {
        let dir = archive.layout.lease_dir(stream);
        let objects = archive.list(&dir).await?;
        let mut epochs: Vec<(u64, Path)> = objects
            .iter()
            .filter_map(|o| {
                Some((
                    parse_generation(o.location.filename()?)?,
                    o.location.clone(),
                ))
            })
            .collect();
        epochs.sort();
        let now = Utc::now().timestamp_millis();
        let next_epoch = match epochs.last() {
            Some((e, p)) => {
                let rec: LeaseRecord = read_json(archive, p).await?;
                if !rec.abandoned(now) {
                    return Err(Error::LeaseHeld {
                        stream: stream.into(),
                        owner: rec.describe(),
                        expires: chrono::DateTime::from_timestamp_millis(rec.expires_at_ms)
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default(),
                    });
                }
                e + 1
            }
            None => 1,
        };
        let record = LeaseRecord {
            version: STATE_VERSION,
            epoch: next_epoch,
            owner: owner.into(),
            host: hostname(),
            pid: std::process::id(),
            started_at: Utc::now().to_rfc3339(),
            expires_at_ms: now + ttl.as_millis() as i64,
        };
        let path = archive.layout.lease(stream, next_epoch);
        let body = serde_json::to_vec_pretty(&record).map_err(|e| Error::CorruptState {
            object: archive.describe(&path),
            message: e.to_string(),
        })?;
        create_object(archive, &path, body, stream)
            .await
            .map_err(|e| match e {
                Error::Fenced { .. } => Error::LeaseHeld {
                    stream: stream.into(),
                    owner: "another archiver that started at the same moment".into(),
                    expires: "(unknown)".into(),
                },
                other => other,
            })?;
        for (_, p) in epochs {
            let _ = archive.store.delete(&p).await;
        }
        Ok(Lease {
            archive: archive.clone(),
            stream: stream.into(),
            expires: Arc::new(AtomicI64::new(record.expires_at_ms)),
            record,
            ttl,
        })
    }

    /// Publish the lease end into `target` from now on (tasks that must not
    /// write after it read it).
    pub fn share_expiry(&mut self, target: Arc<AtomicI64>) {
        target.store(self.expires.load(Ordering::Acquire), Ordering::Release);
        self.expires = target;
    }

    /// True while the lease is valid for at least `margin` more.
    pub fn valid_for(expiry: &AtomicI64, margin: Duration) -> bool {
        expiry.load(Ordering::Acquire) > Utc::now().timestamp_millis() + margin.as_millis() as i64
    }

    /// Extend the lease; fails with [`Error::Fenced`] if a newer epoch exists.
    pub async fn renew(&mut self) -> Result<()> {
        let dir = self.archive.layout.lease_dir(&self.stream);
        let newer = self
            .archive
            .list(&dir)
            .await?
            .iter()
            .filter_map(|o| parse_generation(o.location.filename()?))
            .any(|e| e > self.record.epoch);
        let path = self.archive.layout.lease(&self.stream, self.record.epoch);
        if newer {
            self.expires.store(0, Ordering::Release);
            return Err(Error::Fenced {
                stream: self.stream.clone(),
                object: self.archive.describe(&path),
            });
        }
        self.record.expires_at_ms = Utc::now().timestamp_millis() + self.ttl.as_millis() as i64;
        self.write().await?;
        self.expires
            .store(self.record.expires_at_ms, Ordering::Release);
        Ok(())
    }

    /// Give the lease up so that the next archiver can start at once.
    pub async fn release(mut self) -> Result<()> {
        self.record.expires_at_ms = 0;
        self.expires.store(0, Ordering::Release);
        self.write().await
    }

    async fn write(&self) -> Result<()> {
        let path = self.archive.layout.lease(&self.stream, self.record.epoch);
        let body = serde_json::to_vec_pretty(&self.record).map_err(|e| Error::CorruptState {
            object: self.archive.describe(&path),
            message: e.to_string(),
        })?;
        self.archive.put_bytes(&path, Bytes::from(body)).await
    }
}
