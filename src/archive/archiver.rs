//! The archiver loop: one task per shard, lineage-ordered, with bounded memory.
//!
//! ```text
//!  stream supervisor ──ListShards──▶ shards whose parents are finished
//!        │                              │ spawn (JoinSet, one task per shard)
//!        │ lease renewal                ▼
//!        │                 ShardReader ─▶ ShardBuffer (per arrival hour)
//!        │                              │ size / age / memory pressure / end of shard
//!        ▼                              ▼
//!   children become eligible ◀── flush: stage → commit → publish (see `checkpoint`)
//! ```
//!
//! Memory: every buffered byte holds a permit of one global semaphore sized
//! to `archive.flush.memory_budget`. A shard that cannot get permits flushes
//! its own buffer and signals the others to flush theirs, so memory stays
//! bounded whatever the number of shards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::archive::checkpoint::{Commit, Gap, PublishPolicy, ShardCheckpoint, load_all, stage};
use crate::archive::identity;
use crate::archive::key_index;
use crate::archive::layout::hour_key;
use crate::archive::lease::{Lease, LeaseClock};
use crate::archive::manifest;
use crate::archive::store::Archive;
use crate::archive::writer::ParquetSettings;
use crate::config::{Config, PayloadFormat, StreamConfig};
use crate::error::{Error, Result};
use crate::kinesis::reader::{ShardReader, StartAt};
use crate::kinesis::shards::{ShardInfo, list_shards, parents_done};
use crate::kinesis::{self, Client};
use crate::metrics::{ShardStats, Stats};
use crate::record::{Position, Record, RecordBatchBuilder};

pub use crate::archive::footer::{decode_position, encode_position, flush_metadata, meta};

/// What `fluxcap archive` should do.
#[derive(Debug, Clone, Default)]
pub struct ArchiveOptions {
    /// Catch every shard up to its tip as of the start, commit, and return.
    pub once: bool,
    /// Only this stream (default: every configured stream).
    pub stream: Option<String>,
}

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ArchiveSummary {
    /// Records committed.
    pub records: u64,
    /// Payload bytes committed.
    pub bytes: u64,
    /// Data files committed.
    pub files: u64,
    /// Payloads of json streams that are not valid JSON (archived as is).
    pub invalid_json: u64,
    /// Calls retried.
    pub retries: u64,
}

/// Global memory budget for buffered records, in KiB permits.
#[derive(Debug, Clone)]
struct MemoryBudget {
    sem: Arc<Semaphore>,
    total_kib: u32,
    pressure: Arc<Notify>,
}

impl MemoryBudget {
    fn new(bytes: u64) -> Self {
        let kib = (bytes / 1024).clamp(1024, u32::MAX as u64 / 2) as u32;
        MemoryBudget {
            sem: Arc::new(Semaphore::new(kib as usize)),
            total_kib: kib,
            pressure: Arc::new(Notify::new()),
        }
    }

    fn kib(&self, bytes: usize) -> u32 {
        ((bytes / 1024) as u32 + 1).min(self.total_kib)
    }
}

/// Run the archiver until done (`once`) or cancelled.
pub async fn run(
    cfg: &Config,
    opts: ArchiveOptions,
    cancel: CancellationToken,
) -> Result<ArchiveSummary> {
    let streams = cfg.selected_streams(opts.stream.as_deref())?;
    let archive = Archive::open(cfg).await?;
    archive.check_writable().await?;
    let client = kinesis::client(cfg).await;
    let stats = Arc::new(Stats::default());
    let owner = format!("{:016x}", rand::random::<u64>());
    let budget = MemoryBudget::new(cfg.archive.flush.memory_budget.0);
    // Encoding is CPU-bound and copies a buffer: at most one per core at a time.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let encoders = Arc::new(Semaphore::new(cores));

    let work = cancel.child_token();
    let progress = crate::metrics::spawn_progress(
        stats.clone(),
        cfg.archiver.progress_interval.0,
        work.child_token(),
    );
    if !opts.once && !cfg.archiver.metrics_bind.is_empty() {
        let addr = cfg.archiver.metrics_bind.parse().map_err(|_| {
            Error::Usage(format!(
                "bad archiver.metrics_bind {:?}",
                cfg.archiver.metrics_bind
            ))
        })?;
        let bound = crate::metrics::serve(stats.clone(), addr, work.child_token()).await?;
        tracing::info!("metrics on http://{bound}/metrics");
    }

    let mut tasks = JoinSet::new();
    for s in streams {
        let ctx = Arc::new(StreamCtx {
            cfg: cfg.clone(),
            stream: s,
            archive: archive.clone(),
            client: client.clone(),
            stats: stats.clone(),
            owner: owner.clone(),
            budget: budget.clone(),
            encoders: encoders.clone(),
            settings: ParquetSettings::from(&cfg.archive),
            once: opts.once,
            epoch: AtomicU64::new(0),
            lease_clock: OnceLock::new(),
            suffix: OnceLock::new(),
        });
        let token = work.clone();
        tasks.spawn(async move { archive_stream(ctx, token).await });
    }
    let mut first_err = None;
    while let Some(res) = tasks.join_next().await {
        let res = res.unwrap_or_else(|e| {
            Err(Error::Usage(format!(
                "internal error: stream task failed: {e}"
            )))
        });
        if let Err(e) = res {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            if first_err.is_none() {
                // Stop the other streams cleanly (they flush and commit).
                work.cancel();
                first_err = Some(e);
            }
        }
    }
    work.cancel();
    let _ = progress.await;
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(ArchiveSummary {
        records: stats.records_archived.load(Ordering::Relaxed),
        bytes: stats.bytes_archived.load(Ordering::Relaxed),
        files: stats.files.load(Ordering::Relaxed),
        invalid_json: stats.invalid_json.load(Ordering::Relaxed),
        retries: stats.retries.load(Ordering::Relaxed),
    })
}

/// Everything the tasks of one stream share.
struct StreamCtx {
    cfg: Config,
    stream: StreamConfig,
    archive: Archive,
    client: Client,
    stats: Arc<Stats>,
    owner: String,
    budget: MemoryBudget,
    /// Permits to encode (bounds concurrent encoders and their copies).
    encoders: Arc<Semaphore>,
    settings: ParquetSettings,
    once: bool,
    /// Epoch of the stream's lease once held (checkpoints and staged files carry it).
    epoch: AtomicU64,
    /// The lease's validity; no commit starts when its end is too close.
    lease_clock: OnceLock<Arc<LeaseClock>>,
    /// Suffix of the stream's current incarnation (see `identity`).
    suffix: OnceLock<String>,
}

impl StreamCtx {
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The checkpoint key of Kinesis shard `shard` in the current incarnation.
    fn key(&self, shard: &str) -> String {
        identity::shard_key(shard, self.suffix.get().map_or("", String::as_str))
    }
}

/// How a shard task ended.
#[derive(Debug, PartialEq, Eq)]
enum ShardOutcome {
    /// Closed and read to its end; children may start.
    Finished,
    /// `--once`: reached the tip as of the start.
    CaughtUp,
    /// Cancelled; everything read was committed.
    Stopped,
}

async fn archive_stream(ctx: Arc<StreamCtx>, cancel: CancellationToken) -> Result<()> {
    let name = ctx.stream.name.clone();
    let ttl = ctx.cfg.archiver.lease_ttl.0;
    let min_epoch = load_all(&ctx.archive, &name)
        .await?
        .iter()
        .map(|c| c.epoch)
        .max()
        .unwrap_or(0);
    let mut lease = Lease::acquire(&ctx.archive, &name, &ctx.owner, ttl, min_epoch).await?;
    ctx.epoch.store(lease.epoch(), Ordering::Release);
    let _ = ctx.lease_clock.set(lease.clock());
    tracing::info!(stream = %name, epoch = lease.epoch(), "lease acquired; archiving into {}", ctx.archive.describe(&ctx.archive.layout.stream_dir(&name)));
    // Uploads of an earlier holder are never completed (it died, or it is
    // fenced): abort them all before this holder starts any of its own.
    let stream_dir = ctx.archive.layout.stream_dir(&name);
    match crate::archive::store::abort_stale_uploads(&ctx.cfg, &ctx.archive, &stream_dir).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(stream = %name, "aborted {n} incomplete upload(s) of an earlier archiver")
        }
        Err(e) => tracing::warn!(stream = %name, "{e}"),
    }

    // Shard tasks stop on `shards` (cancel or lease loss), the renewer on `renew_stop`.
    let shards = cancel.child_token();
    let renew_stop = CancellationToken::new();
    let renewer = {
        let shards = shards.clone();
        let stop = renew_stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(lease),
                    _ = tokio::time::sleep(ttl / 3) => {
                        if let Err(e) = lease.renew().await {
                            tracing::error!("lease renewal failed: {e}");
                            shards.cancel();
                            return Err(e);
                        }
                    }
                }
            }
        })
    };

    let result = match identify(&ctx).await {
        Ok(ckpts) => supervise(ctx.clone(), ckpts, shards.clone()).await,
        Err(e) => Err(e),
    };
    shards.cancel();
    renew_stop.cancel();
    let lease_res = renewer.await.unwrap_or_else(|e| {
        Err(Error::Usage(format!(
            "internal error: lease task failed: {e}"
        )))
    });
    match (result, lease_res) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(lease)) => {
            lease.release().await?;
            Ok(())
        }
    }
}

/// Find which incarnation of the stream this is (see `identity`), record
/// it, and close what an earlier incarnation left unfinished (its records are
/// gone with it: recorded as gaps). Returns the checkpoints of the current one.
async fn identify(ctx: &StreamCtx) -> Result<Vec<crate::archive::checkpoint::Checkpoint>> {
    let name = &ctx.stream.name;
    let (arn, created) =
        identity::describe(&ctx.client, name, ctx.cfg.archiver.max_backoff.0).await?;
    let ckpts = load_all(&ctx.archive, name).await?;
    // Finished shards go into the stream's manifest (a cache for readers).
    if let Err(e) = manifest::record_finished(&ctx.archive, name, &ckpts).await {
        tracing::warn!(stream = %name, "could not update the finished-shard manifest: {e}");
    }
    let latest_state = ckpts
        .iter()
        .filter_map(|c| chrono::DateTime::parse_from_rfc3339(&c.written_at).ok())
        .map(|t| t.timestamp_millis())
        .max();
    let (id, recreated) =
        identity::record_current(&ctx.archive, name, &arn, created, latest_state).await?;
    let suffix = id.current_suffix().to_string();
    if recreated {
        tracing::warn!(
            stream = %name,
            "stream {name} was deleted and re-created (now {arn}, created {}): archiving the new stream apart from the old one, whose archive is kept as it is",
            chrono::DateTime::from_timestamp_millis(created).map(|t| t.to_rfc3339()).unwrap_or_default()
        );
    }
    let _ = ctx.suffix.set(suffix.clone());
    let mut current = Vec::new();
    for c in ckpts {
        if identity::split_key(&c.shard_id).1 == suffix {
            current.push(c);
        } else if !c.finished {
            record_lost_shard(
                ctx,
                &c.shard_id,
                "the stream was deleted (and re-created) before this shard was archived to its end",
            )
            .await?;
        }
    }
    Ok(current)
}

async fn supervise(
    ctx: Arc<StreamCtx>,
    ckpts: Vec<crate::archive::checkpoint::Checkpoint>,
    cancel: CancellationToken,
) -> Result<()> {
    let name = ctx.stream.name.clone();
    let max_backoff = ctx.cfg.archiver.max_backoff.0;
    // We hold the lease: checkpoints change only through our own tasks, so
    // they are read once; task results keep `finished` current. Sets hold
    // Kinesis shard ids of the current incarnation.
    let kinesis_id =
        |c: &crate::archive::checkpoint::Checkpoint| identity::split_key(&c.shard_id).0.to_string();
    let checkpointed: HashSet<String> = ckpts.iter().map(kinesis_id).collect();
    let mut finished: HashSet<String> = ckpts
        .iter()
        .filter(|c| c.finished)
        .map(kinesis_id)
        .collect();
    let mut initial: Option<HashSet<String>> = None;
    let mut listed: Option<BTreeMap<String, ShardInfo>> = None;
    let mut relist = true;
    // Shard of each running task, by task id (a panicked task still has its id).
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut tasks: JoinSet<Result<ShardOutcome>> = JoinSet::new();
    let mut first_err: Option<Error> = None;
    let mut caught_up: HashSet<String> = HashSet::new();
    let mut restarts: HashMap<String, u32> = HashMap::new();

    loop {
        if !cancel.is_cancelled() && first_err.is_none() && relist {
            match list_shards(&ctx.client, &name, max_backoff).await {
                Ok(l) => {
                    listed = Some(l.into_iter().map(|s| (s.shard_id.clone(), s)).collect());
                    relist = false;
                }
                // Keep working from the previous listing; flushes in
                // progress are never interrupted by a listing failure.
                Err(e) if listed.is_some() => {
                    tracing::warn!(stream = %name, "listing shards failed, keeping the previous listing: {e}");
                    relist = false;
                }
                Err(e) if running.is_empty() => return Err(e),
                Err(e) => {
                    tracing::error!(stream = %name, "{e}");
                    cancel.cancel();
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(listed) = listed
            .as_ref()
            .filter(|_| !cancel.is_cancelled() && first_err.is_none())
        {
            // A checkpointed shard that is not finished and no longer listed
            // was closed longer than the retention ago: the rest of it is
            // lost. Record that as a gap and let its children go on.
            let active: HashSet<&String> = running.values().collect();
            let lost: Vec<String> = checkpointed
                .iter()
                .filter(|id| {
                    !finished.contains(*id) && !listed.contains_key(*id) && !active.contains(id)
                })
                .cloned()
                .collect();
            for id in lost {
                let key = ctx.key(&id);
                match record_lost_shard(&ctx, &key, "the shard left the stream (closed longer than the retention ago) before it was archived to its end").await {
                    Ok(()) => {
                        finished.insert(id);
                    }
                    Err(e) => {
                        tracing::error!(stream = %name, shard = %id, "{e}");
                        cancel.cancel();
                        first_err.get_or_insert(e);
                    }
                }
            }
            let initial = initial.get_or_insert_with(|| listed.keys().cloned().collect());
            let active: HashSet<&String> = running.values().collect();
            let mut start = Vec::new();
            for (id, info) in listed {
                if finished.contains(id) || active.contains(id) || caught_up.contains(id) {
                    continue;
                }
                // `--once` archives what existed at the start; later shards only hold later records.
                if ctx.once && !initial.contains(id) {
                    continue;
                }
                if !parents_done(info, listed, &finished, &checkpointed) {
                    continue;
                }
                start.push(info.clone());
            }
            for info in start {
                let (c, t) = (ctx.clone(), cancel.clone());
                let id = info.shard_id.clone();
                let handle = tasks.spawn(async move { archive_shard(c, info, t).await });
                running.insert(handle.id(), id);
            }
        }
        if running.is_empty() && (ctx.once || cancel.is_cancelled() || first_err.is_some()) {
            break;
        }
        let discovery = ctx.cfg.archiver.shard_discovery_interval.0;
        tokio::select! {
            joined = tasks.join_next_with_id(), if !running.is_empty() => {
                let Some(joined) = joined else { continue };
                let (task, res) = match joined {
                    Ok((task, res)) => (task, res),
                    Err(e) => {
                        let task = e.id();
                        let what = if e.is_panic() { "panicked" } else { "was cancelled" };
                        (task, Err(Error::Usage(format!("internal error: a shard task {what}"))))
                    }
                };
                let id = running.remove(&task).unwrap_or_else(|| "?".into());
                match res {
                    Ok(ShardOutcome::Finished) => {
                        tracing::info!(stream = %name, shard = %id, "shard finished");
                        if let Err(e) = manifest::record_finished_shard(&ctx.archive, &name, &ctx.key(&id)).await {
                            tracing::warn!(stream = %name, shard = %id, "could not update the finished-shard manifest: {e}");
                        }
                        finished.insert(id);
                        // Its children may be listed (or be new) and can start now.
                        relist = true;
                    }
                    Ok(ShardOutcome::CaughtUp) => {
                        caught_up.insert(id);
                    }
                    Ok(ShardOutcome::Stopped) => {}
                    // A late write of an earlier archiver changed the shard's
                    // state: its task starts again from the new state.
                    Err(e @ Error::StaleCheckpoint { .. })
                        if restarts.get(&id).copied().unwrap_or(0) < 20 =>
                    {
                        *restarts.entry(id.clone()).or_default() += 1;
                        tracing::warn!(stream = %name, shard = %id, "{e}; reading the shard again from its committed state");
                    }
                    Err(e) => {
                        tracing::error!(stream = %name, shard = %id, "{e}");
                        cancel.cancel();
                        first_err.get_or_insert(e);
                    }
                }
            }
            _ = cancel.cancelled(), if !cancel.is_cancelled() => {}
            _ = tokio::time::sleep(discovery), if !ctx.once && !cancel.is_cancelled() => {
                relist = true;
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Record that the unarchived end of `shard` left the stream: a gap from
/// its checkpoint to the end of the shard, and the shard finished.
async fn record_lost_shard(ctx: &StreamCtx, shard: &str, reason: &str) -> Result<()> {
    let stream = &ctx.stream.name;
    let mut ck = ShardCheckpoint::open_with(
        &ctx.archive,
        stream,
        shard,
        vec![],
        &ctx.owner,
        ctx.epoch(),
        PublishPolicy::from_config(&ctx.cfg.archive),
    )
    .await?;
    if ck.state().finished {
        return Ok(());
    }
    tracing::warn!(
        %stream,
        %shard,
        "shard {shard} is no longer in the stream ({reason}): its records after {} are lost; recording the gap and going on",
        ck.state()
            .position
            .as_ref()
            .map_or("its start".to_string(), |p| p.sequence_number.clone())
    );
    ck.commit(Commit {
        finished: true,
        gap: Some(Gap {
            after: ck.state().position.clone(),
            until: None,
            reason: reason.into(),
            detected_at: chrono::Utc::now().to_rfc3339(),
        }),
        ..Commit::default()
    })
    .await
}

/// Buffered records of one shard, grouped by arrival hour.
struct ShardBuffer {
    groups: BTreeMap<i64, Group>,
    mem: usize,
    /// Payload bytes buffered.
    payload: usize,
    records: usize,
    oldest: Option<Instant>,
    permits: Option<OwnedSemaphorePermit>,
    /// Last record pushed.
    last: Option<(Position, i64)>,
    /// Records found lost before the buffered ones (recorded by the next commit).
    gap: Option<Gap>,
    /// The last read found the shard at its tip (nothing more to read now).
    at_tip: bool,
    /// Arrival time of the last record read.
    last_read_ms: Option<i64>,
}

struct Group {
    builder: RecordBatchBuilder,
    first: Position,
    count: usize,
}

impl ShardBuffer {
    fn new() -> Self {
        ShardBuffer {
            groups: BTreeMap::new(),
            mem: 0,
            payload: 0,
            records: 0,
            oldest: None,
            permits: None,
            last: None,
            gap: None,
            at_tip: false,
            last_read_ms: None,
        }
    }

    fn push(&mut self, r: &Record) {
        let g = self
            .groups
            .entry(hour_key(r.arrival_ms))
            .or_insert_with(|| Group {
                builder: RecordBatchBuilder::with_capacity(1024, 1 << 20),
                first: r.position(),
                count: 0,
            });
        g.builder.push(r);
        g.count += 1;
        self.mem += r.mem_size();
        self.payload += r.data.len();
        self.records += 1;
        self.oldest.get_or_insert_with(Instant::now);
        self.last = Some((r.position(), r.arrival_ms));
    }

    fn add_permit(&mut self, p: OwnedSemaphorePermit) {
        match &mut self.permits {
            Some(held) => held.merge(p),
            None => self.permits = Some(p),
        }
    }

    fn is_empty(&self) -> bool {
        self.records == 0
    }
}

async fn archive_shard(
    ctx: Arc<StreamCtx>,
    info: ShardInfo,
    cancel: CancellationToken,
) -> Result<ShardOutcome> {
    let stream = ctx.stream.name.clone();
    let shard = info.shard_id.clone();
    let stats = ctx.stats.shard(&stream, &shard);
    let mut ck = ShardCheckpoint::open_with(
        &ctx.archive,
        &stream,
        &ctx.key(&shard),
        info.parents.iter().map(|p| ctx.key(p)).collect(),
        &ctx.owner,
        ctx.epoch(),
        PublishPolicy::from_config(&ctx.cfg.archive),
    )
    .await?;
    if ck.state().finished {
        stats.state.store(2, Ordering::Relaxed);
        return Ok(ShardOutcome::Finished);
    }
    let a = &ctx.cfg.archiver;
    let mut reader = ShardReader::new(
        ctx.client.clone(),
        &stream,
        &shard,
        StartAt::TrimHorizon,
        a.max_records_per_call,
        a.max_backoff.0,
        ctx.stats.retries.clone(),
    );
    // Its share of the shard's calls (archiver.max_reads_per_second), and
    // the bytes it read waited out at the shard's read limit.
    reader = reader.paced(crate::kinesis::pace::shard_pacer(
        &stream,
        &shard,
        crate::kinesis::pace::ReadLimits {
            calls_per_second: a.max_reads_per_second,
            bytes_per_second: crate::kinesis::pace::SHARD_BYTES_PER_SECOND,
        },
    ));
    if let Some(pos) = &ck.state().position {
        reader = reader.resume_after(pos);
    }
    tracing::debug!(%stream, %shard, position = ?ck.state().position, "shard task started");
    let started_ms = chrono::Utc::now().timestamp_millis();
    let flush_cfg = &ctx.cfg.archive.flush;
    let mut buf = ShardBuffer::new();
    let mut last_call = Instant::now() - Duration::from_secs(1);

    loop {
        // Kinesis allows 5 GetRecords per second per shard.
        let since = last_call.elapsed();
        if since < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(200) - since).await;
        }
        last_call = Instant::now();
        let batch = tokio::select! {
            b = reader.next(&cancel) => b?,
            _ = ctx.budget.pressure.notified() => {
                if !buf.is_empty() {
                    flush(&ctx, &mut ck, &mut buf, &stats, false).await?;
                }
                continue;
            }
        };
        let Some(mut batch) = batch else {
            // Cancelled: commit what was read.
            flush(&ctx, &mut ck, &mut buf, &stats, false).await?;
            stats.state.store(3, Ordering::Relaxed);
            return Ok(ShardOutcome::Stopped);
        };
        if let Some(ms) = batch.millis_behind {
            stats.millis_behind.store(ms, Ordering::Relaxed);
        }
        buf.at_tip = batch.kinesis_records == 0 && batch.millis_behind.unwrap_or(0) == 0;
        if let Some(r) = batch.records.last() {
            buf.last_read_ms = Some(r.arrival_ms);
        }
        if let Some(until) = batch.gap_before.take() {
            buf.gap = Some(Gap {
                after: ck.state().position.clone(),
                until: Some(until),
                reason: "the records after the checkpoint left the stream's retention before they were read (was the archiver stopped longer than the retention?)".into(),
                detected_at: chrono::Utc::now().to_rfc3339(),
            });
        }
        if !batch.records.is_empty() {
            reserve(
                &ctx,
                &mut ck,
                &mut buf,
                &stats,
                batch.bytes + batch.records.len() * 64,
                &cancel,
            )
            .await?;
            let mut invalid = 0u64;
            for r in &batch.records {
                if ctx.stream.format == PayloadFormat::Json
                    && serde_json::from_slice::<serde::de::IgnoredAny>(&r.data).is_err()
                {
                    invalid += 1;
                }
                buf.push(r);
            }
            ctx.stats
                .records_read
                .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
            ctx.stats
                .buffered_bytes
                .fetch_add(batch.bytes as i64, Ordering::Relaxed);
            if invalid > 0 {
                ctx.stats.invalid_json.fetch_add(invalid, Ordering::Relaxed);
                tracing::debug!(%stream, %shard, invalid, "payloads that are not valid JSON (archived as is)");
            }
        }
        if batch.end_of_shard {
            flush(&ctx, &mut ck, &mut buf, &stats, true).await?;
            stats.state.store(2, Ordering::Relaxed);
            return Ok(ShardOutcome::Finished);
        }
        let too_big = buf.mem as u64 >= flush_cfg.max_bytes.0;
        let too_old = buf
            .oldest
            .is_some_and(|t| t.elapsed() >= flush_cfg.max_age.0);
        if too_big || too_old {
            flush(&ctx, &mut ck, &mut buf, &stats, false).await?;
        }
        if ctx.once {
            let at_tip = batch.kinesis_records == 0 && batch.millis_behind.unwrap_or(0) == 0;
            let past_start = buf.last.as_ref().is_some_and(|(_, t)| *t >= started_ms)
                || batch
                    .records
                    .last()
                    .is_some_and(|r| r.arrival_ms >= started_ms);
            if at_tip || past_start {
                flush(&ctx, &mut ck, &mut buf, &stats, false).await?;
                ck.publish_closed(closed_before(&buf)).await?;
                stats.state.store(3, Ordering::Relaxed);
                return Ok(ShardOutcome::CaughtUp);
            }
        }
        if batch.kinesis_records == 0 {
            if buf.is_empty() {
                // Hourly publication: an idle shard's hours close by the clock.
                ck.publish_closed(closed_before(&buf)).await?;
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(a.poll_interval.0) => {}
                _ = ctx.budget.pressure.notified() => {
                    if !buf.is_empty() {
                        flush(&ctx, &mut ck, &mut buf, &stats, false).await?;
                    }
                }
            }
        }
    }
}

/// Get memory permits for `bytes` more, flushing first when the budget is full.
async fn reserve(
    ctx: &StreamCtx,
    ck: &mut ShardCheckpoint,
    buf: &mut ShardBuffer,
    stats: &ShardStats,
    bytes: usize,
    cancel: &CancellationToken,
) -> Result<()> {
    let n = ctx.budget.kib(bytes);
    if let Ok(p) = ctx.budget.sem.clone().try_acquire_many_owned(n) {
        buf.add_permit(p);
        return Ok(());
    }
    if !buf.is_empty() {
        flush(ctx, ck, buf, stats, false).await?;
    }
    loop {
        ctx.budget.pressure.notify_waiters();
        tokio::select! {
            p = ctx.budget.sem.clone().acquire_many_owned(n) => {
                let p = p.map_err(|_| Error::Interrupted)?;
                buf.add_permit(p);
                return Ok(());
            }
            // Keep nudging: a shard may have been between polls when we asked.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = cancel.cancelled() => {
                // Still take the records: they are committed by the final flush.
                let p = ctx.budget.sem.clone().acquire_many_owned(n).await.map_err(|_| Error::Interrupted)?;
                buf.add_permit(p);
                return Ok(());
            }
        }
    }
}

/// Write the buffer's files and commit the shard's checkpoint (see `checkpoint`).
async fn flush(
    ctx: &StreamCtx,
    ck: &mut ShardCheckpoint,
    buf: &mut ShardBuffer,
    stats: &ShardStats,
    finished: bool,
) -> Result<()> {
    if buf.is_empty() && !finished {
        return Ok(());
    }
    let stream = &ctx.stream.name;
    let shard = ck.state().shard_id.clone();
    let margin = ctx.cfg.archiver.lease_ttl.0 / 4;
    if !ctx.lease_clock.get().is_some_and(|c| c.valid_for(margin)) {
        return Err(lease_lapsed(ctx));
    }
    let groups = std::mem::take(&mut buf.groups);
    let records = buf.records;
    let payload = buf.payload;
    let last = buf.last.take();
    let prev = ck.state().position.clone();
    let mut files: Vec<(object_store::path::Path, RecordBatch)> = Vec::with_capacity(groups.len());
    for (hour, mut g) in groups {
        let path = ctx
            .archive
            .layout
            .data_file(stream, hour, &shard, &g.first, g.count);
        files.push((path, g.builder.finish()));
    }
    let _encoding = ctx
        .encoders
        .acquire()
        .await
        .map_err(|_| Error::Interrupted)?;
    // (1) stage every file of the flush (nothing is visible to readers yet).
    let mut written = 0u64;
    let mut staged = Vec::with_capacity(files.len());
    let mut keys = Vec::new();
    for (path, batch) in files {
        let metadata = flush_metadata(
            prev.as_ref(),
            last.as_ref().map(|(p, _)| p),
            records as u64,
            &shard,
        );
        let settings = ctx.settings.clone();
        let name = ctx.archive.describe(&path);
        let p = path.clone();
        let (bytes, k) = tokio::task::spawn_blocking(move || {
            // The keys of the file for its summary (see `key_index`).
            let k = if settings.bloom_filters {
                key_index::summarize([(&p, &batch)])
            } else {
                vec![]
            };
            settings.encode(&[batch], metadata, &name).map(|b| (b, k))
        })
        .await
        .map_err(|e| Error::Usage(format!("internal error: encoder task failed: {e}")))??;
        keys.extend(k);
        written += bytes.len() as u64;
        staged.push(stage_with_retry(ctx, &path, bytes::Bytes::from(bytes)).await?);
    }
    drop(_encoding);
    let (pos, arrival) = match last {
        Some((p, t)) => (Some(p), Some(t)),
        None => (None, None),
    };
    let nfiles = staged.len();
    // The upload may have taken long (or this process was paused): commit
    // only while the lease is still valid by our own clock.
    if !ctx.lease_clock.get().is_some_and(|c| c.valid_for(margin)) {
        return Err(lease_lapsed(ctx));
    }
    // (2) commit, (3) publish, (4) clean up — see `checkpoint`.
    ck.commit(Commit {
        position: pos,
        last_arrival_ms: arrival,
        records: records as u64,
        files: staged,
        finished,
        gap: buf.gap.take(),
        closed_before_ms: closed_before(buf),
    })
    .await?;
    buf.records = 0;
    buf.mem = 0;
    buf.payload = 0;
    buf.oldest = None;
    buf.permits = None; // returns the memory to the budget
    let s = &ctx.stats;
    s.buffered_bytes
        .fetch_sub(payload as i64, Ordering::Relaxed);
    s.records_archived
        .fetch_add(records as u64, Ordering::Relaxed);
    s.bytes_archived
        .fetch_add(payload as u64, Ordering::Relaxed);
    s.bytes_written.fetch_add(written, Ordering::Relaxed);
    s.files.fetch_add(nfiles as u64, Ordering::Relaxed);
    s.flushes.fetch_add(1, Ordering::Relaxed);
    stats.records.fetch_add(records as u64, Ordering::Relaxed);
    stats.bytes.fetch_add(payload as u64, Ordering::Relaxed);
    tracing::debug!(%stream, %shard, records, files = nfiles, finished, "flush committed");
    key_index::write_after_commit(&ctx.archive, stream, keys).await;
    Ok(())
}

/// Hourly publication: hours of this shard that can hold no more records.
/// Hours before the one of the last record read are closed (arrival times
/// of one shard do not go back by an hour); at the tip, also every hour that
/// ended more than [`HOUR_CLOSE_MARGIN_MS`] ago.
fn closed_before(buf: &ShardBuffer) -> Option<i64> {
    let by_reading = buf.last_read_ms.map(hour_key);
    let by_clock = buf
        .at_tip
        .then(|| chrono::Utc::now().timestamp_millis() - HOUR_CLOSE_MARGIN_MS);
    by_reading.max(by_clock)
}

/// How long after its end an hour is closed for a shard at its tip.
const HOUR_CLOSE_MARGIN_MS: i64 = 5 * 60 * 1000;

fn lease_lapsed(ctx: &StreamCtx) -> Error {
    let stream = &ctx.stream.name;
    Error::Fenced {
        stream: stream.clone(),
        object: format!(
            "{} (lease not renewed in time)",
            ctx.archive.describe(&ctx.archive.layout.lease_dir(stream))
        ),
    }
}

async fn stage_with_retry(
    ctx: &StreamCtx,
    path: &object_store::path::Path,
    bytes: bytes::Bytes,
) -> Result<crate::archive::checkpoint::PublishEntry> {
    let mut backoff = kinesis::Backoff::new(ctx.cfg.archiver.max_backoff.0);
    let stream = &ctx.stream.name;
    loop {
        match stage(&ctx.archive, stream, ctx.epoch(), path, bytes.clone()).await {
            Ok(e) => return Ok(e),
            Err(e)
                if backoff.attempts() < 8
                    && matches!(
                        ctx.archive.location,
                        crate::config::ArchiveLocation::S3 { .. }
                    ) =>
            {
                ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("retrying upload: {e}");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}
