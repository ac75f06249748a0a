//! One view of the streams for everything a statement (or a whole replay)
//! reads: one checkpoint [`Snapshot`] per stream, one horizon for live reads,
//! one shard listing, and the live tail read from Kinesis once.
//!
//! Without it every scan of a statement took its own snapshot and read the
//! live tail again: a self-join, a subquery or a compacted replay (up to
//! seven scans) could see two different committed positions and lose or
//! double the records of a flush committed in between, and read Kinesis
//! once per scan.
//!
//! ```text
//!   statement (or replay) starts ─▶ View { as_of, snapshots, listings, objects, tails }
//!      scan 1 of S ──┐                 │ first use loads / reads, then shared
//!      scan 2 of S ──┼──▶ same Snapshot, same horizon, same ListShards answer
//!      scan 3 of S ──┘     live tail: read once when scanned more than once
//!                          (kept in memory, spilled to a temporary Arrow file
//!                          past SPILL_BYTES), streamed directly when scanned once
//! ```
//!
//! The archive's object listings (days of a stream, objects of a day or an
//! hour) are kept too: a replay that reads a stream in many pieces lists it
//! once, not once per piece. Files committed after the snapshot are ignored
//! whatever the listing says, so an older listing gives the same answer.
//!
//! [`crate::query::QuerySession::plan`] gives each statement a new view; a
//! session built with [`crate::query::SessionOptions::pinned`] (a replay)
//! keeps one view for all of its statements.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use object_store::ObjectMeta;

use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::kinesis::shards::{ShardInfo, list_shards};
use crate::query::snapshot::Snapshot;

/// Cached live tails larger than this (all shards of a view together) go to
/// a temporary file instead of memory.
pub const SPILL_BYTES: usize = 64 << 20;

/// Archive listings of a view, by (delimited, prefix).
type Listings = HashMap<(bool, String), Arc<Vec<ObjectMeta>>>;

/// See the module documentation.
#[derive(Debug)]
pub struct View {
    /// Live reads leave out records that arrived after this time (epoch ms).
    pub as_of_ms: i64,
    /// Every statement of the session shares this view (a replay): live
    /// tails are always cached, since later statements read them again.
    pub session_wide: bool,
    snapshots: tokio::sync::Mutex<HashMap<String, Arc<Snapshot>>>,
    listings: tokio::sync::Mutex<HashMap<String, Option<Arc<Vec<ShardInfo>>>>>,
    /// Each stream's ARN and creation time, from DescribeStreamSummary.
    incarnations: tokio::sync::Mutex<HashMap<String, (String, i64)>>,
    /// Archive listings by (kind, prefix): objects below a prefix, or the
    /// prefixes directly below it.
    objects: tokio::sync::Mutex<Listings>,
    tails: Mutex<HashMap<(String, String), Arc<Tail>>>,
    scans: Mutex<HashMap<String, usize>>,
    cached_bytes: Mutex<usize>,
}

impl View {
    /// A view whose live horizon is `as_of_ms` (capped at now).
    pub fn new(as_of_ms: Option<i64>, session_wide: bool) -> Self {
        let now = chrono::Utc::now().timestamp_millis();
        View {
            as_of_ms: as_of_ms.map_or(now, |t| t.min(now)),
            session_wide,
            snapshots: Default::default(),
            listings: Default::default(),
            incarnations: Default::default(),
            objects: Default::default(),
            tails: Default::default(),
            scans: Default::default(),
            cached_bytes: Mutex::new(0),
        }
    }

    /// The checkpoints of `stream`, read on first use.
    pub async fn snapshot(&self, archive: &Archive, stream: &str) -> Result<Arc<Snapshot>> {
        let mut m = self.snapshots.lock().await;
        if let Some(s) = m.get(stream) {
            return Ok(s.clone());
        }
        let s = Arc::new(Snapshot::load(archive, stream).await?);
        m.insert(stream.to_string(), s.clone());
        Ok(s)
    }

    /// The shards of `stream` as ListShards gave them on first use; `None`
    /// when the stream does not exist in Kinesis.
    pub async fn shards(
        &self,
        client: &crate::kinesis::Client,
        stream: &str,
        max_backoff: std::time::Duration,
    ) -> Result<Option<Arc<Vec<ShardInfo>>>> {
        let mut m = self.listings.lock().await;
        if let Some(s) = m.get(stream) {
            return Ok(s.clone());
        }
        let listed = match list_shards(client, stream, max_backoff).await {
            Ok(l) => Some(Arc::new(l)),
            Err(Error::StreamNotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        m.insert(stream.to_string(), listed.clone());
        Ok(listed)
    }

    /// The stream's ARN and creation time in Kinesis, asked on first use.
    pub async fn incarnation(
        &self,
        client: &crate::kinesis::Client,
        stream: &str,
        max_backoff: std::time::Duration,
    ) -> Result<(String, i64)> {
        let mut m = self.incarnations.lock().await;
        if let Some(i) = m.get(stream) {
            return Ok(i.clone());
        }
        let i = crate::archive::identity::describe(client, stream, max_backoff).await?;
        m.insert(stream.to_string(), i.clone());
        Ok(i)
    }

    /// The archive listing of `prefix` (`delimited`: the prefixes directly
    /// below it, as `location`s; else every object below it), made by
    /// `list` on first use.
    pub async fn listing<F, Fut>(
        &self,
        delimited: bool,
        prefix: &object_store::path::Path,
        list: F,
    ) -> Result<Arc<Vec<ObjectMeta>>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<ObjectMeta>>>,
    {
        let key = (delimited, prefix.to_string());
        if let Some(l) = self.objects.lock().await.get(&key) {
            return Ok(l.clone());
        }
        // Not held while listing: concurrent scans list different prefixes.
        let l = Arc::new(list().await?);
        self.objects.lock().await.insert(key, l.clone());
        Ok(l)
    }

    /// Count one more scan of `stream`'s live side (at planning time, before
    /// anything runs).
    pub fn count_scan(&self, stream: &str) {
        let mut m = self.scans.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(stream.to_string()).or_default() += 1;
    }

    /// The shared live tail of one shard, when it is worth sharing: the
    /// view is session-wide or the statement scans the stream more than once.
    /// Asked at execution time, when every scan has been planned.
    pub fn tail(&self, stream: &str, shard: &str) -> Option<Arc<Tail>> {
        let scans = self
            .scans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .copied()
            .unwrap_or(0);
        if !self.session_wide && scans < 2 {
            return None;
        }
        let mut m = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            m.entry((stream.to_string(), shard.to_string()))
                .or_default()
                .clone(),
        )
    }

    /// Keep `batches` (a shard's whole tail) in memory, or in a temporary
    /// file once the view holds more than [`SPILL_BYTES`].
    pub fn keep(&self, batches: Vec<RecordBatch>) -> Result<TailData> {
        let size: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
        let mut held = self.cached_bytes.lock().unwrap_or_else(|p| p.into_inner());
        if *held + size <= SPILL_BYTES {
            *held += size;
            return Ok(TailData::Memory(batches));
        }
        drop(held);
        TailData::spill(&batches)
    }
}

/// A shard's live tail, read once and shared by the scans of a view.
#[derive(Debug, Default)]
pub struct Tail {
    /// Filled by the first scan that runs; the others wait for it.
    pub cell: tokio::sync::OnceCell<Arc<TailData>>,
}

/// Where a cached tail is kept.
#[derive(Debug)]
pub enum TailData {
    /// In memory.
    Memory(Vec<RecordBatch>),
    /// In an Arrow IPC file, removed when dropped.
    File(PathBuf),
}

impl TailData {
    fn spill(batches: &[RecordBatch]) -> Result<TailData> {
        let path = std::env::temp_dir().join(format!(
            "fluxcap-live-{}-{:016x}.arrow",
            std::process::id(),
            rand::random::<u64>()
        ));
        let io = |e: std::io::Error| Error::Io {
            path: path.clone(),
            source: e,
        };
        let schema = crate::record::table_schema();
        let file = std::fs::File::create(&path).map_err(io)?;
        let data = TailData::File(path.clone());
        let mut w =
            arrow::ipc::writer::FileWriter::try_new(std::io::BufWriter::new(file), &schema)?;
        for b in batches {
            w.write(b)?;
        }
        w.finish()?;
        Ok(data)
    }

    /// The batches, read back from the file when spilled.
    pub fn batches(&self) -> Result<Vec<RecordBatch>> {
        match self {
            TailData::Memory(b) => Ok(b.clone()),
            TailData::File(path) => {
                let f = std::fs::File::open(path).map_err(|e| Error::Io {
                    path: path.clone(),
                    source: e,
                })?;
                let r = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(f), None)?;
                Ok(r.collect::<std::result::Result<Vec<_>, _>>()?)
            }
        }
    }
}

impl Drop for TailData {
    fn drop(&mut self) {
        if let TailData::File(p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}
