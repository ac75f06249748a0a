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
//! Memory: every GetRecords call takes memory for its response from the
//! process-wide budget (`archive.flush.memory_budget`) before it is made,
//! and its records keep what they need until their flush is uploaded (see
//! `budget`). A shard that cannot get memory flushes its own buffer, asks
//! the others to flush theirs, and waits its turn, so memory stays bounded
//! whatever the number of shards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::archive::budget::{ENCODER_FIXED, MemoryBudget, PROCESS_FIXED};
use crate::archive::checkpoint::{Commit, Gap, PublishPolicy, ShardCheckpoint, load_all};
use crate::archive::identity;
use crate::archive::lease::{Lease, LeaseClock, Subject};
use crate::archive::manifest;
use crate::archive::positions::{self, PositionsTable, StreamId};
use crate::archive::store::Archive;
use crate::archive::writer::ParquetSettings;
use crate::config::{Config, StreamConfig};
use crate::error::{Error, Result};
use crate::kinesis::shards::{ShardInfo, list_shards, parents_done};
use crate::kinesis::{self, Client};
use crate::metrics::Stats;

mod shard;
mod workers;

use shard::archive_shard;
use workers::Coordinator;
pub use workers::shard_holders;

pub use crate::archive::footer::{decode_position, encode_position, flush_metadata, meta};

/// GetRecords calls in flight at once in one archiver process. Each holds an
/// HTTP connection whose buffers stay as large as the responses it read; at
/// 2 calls/s per shard and tens of milliseconds per call, 32 serve hundreds
/// of shards.
pub const MAX_CALLS_IN_FLIGHT: usize = 32;

/// What `fluxcap archive` should do.
#[derive(Debug, Clone, Default)]
pub struct ArchiveOptions {
    /// Catch every shard up to its tip as of the start, commit, and return.
    pub once: bool,
    /// Only this stream (default: every configured stream).
    pub stream: Option<String>,
    /// Share each stream with other archivers, shard by shard (see `workers`).
    pub shared: bool,
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
    // Encoding is CPU-bound and copies a buffer: at most one per core at a time.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let encoders = Arc::new(Semaphore::new(cores));
    let calls = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    // The process's and the encoders' fixed working memory are set aside;
    // calls and buffers share the rest.
    let budget = MemoryBudget::new(
        cfg.archive.flush.memory_budget.0,
        PROCESS_FIXED + cores as u64 * ENCODER_FIXED,
    );

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
            calls: calls.clone(),
            settings: ParquetSettings::from(&cfg.archive),
            once: opts.once,
            shared: opts.shared,
            epoch: AtomicU64::new(0),
            lease_clock: OnceLock::new(),
            suffix: OnceLock::new(),
            positions: OnceLock::new(),
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
    tracing::debug!(
        "memory budget: at most {} KiB of {} KiB in use at once",
        budget.peak() / 1024,
        budget.total() / 1024
    );
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
    /// Permits for GetRecords calls in flight, process-wide ([`MAX_CALLS_IN_FLIGHT`]).
    calls: Arc<Semaphore>,
    settings: ParquetSettings,
    once: bool,
    /// Shared with other archivers, shard by shard (see `workers`).
    shared: bool,
    /// Epoch of the stream's lease once held (checkpoints and staged files carry it).
    epoch: AtomicU64,
    /// The lease's validity; no commit starts when its end is too close.
    lease_clock: OnceLock<Arc<LeaseClock>>,
    /// Suffix of the stream's current incarnation (see `identity`).
    suffix: OnceLock<String>,
    /// The stream's positions table (see `positions`), once identified.
    positions: OnceLock<Arc<PositionsTable>>,
}

impl StreamCtx {
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The checkpoint key of Kinesis shard `shard` in the current incarnation.
    fn key(&self, shard: &str) -> String {
        identity::shard_key(shard, self.suffix.get().map_or("", String::as_str))
    }

    /// Put what `ck` has published into the positions table, and return once
    /// the table in the store holds it.
    async fn publish_position(&self, ck: &ShardCheckpoint) -> Result<()> {
        match self.positions.get() {
            Some(t) => t.update(positions::row_of(ck)).await,
            None => Ok(()),
        }
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
    let mut lease = if ctx.shared {
        if let Some(rec) = workers::single_archiver(&ctx.archive, &name, ttl).await? {
            return Err(Error::ArchiverModeConflict {
                stream: name,
                running: "a single archiver",
                owner: rec.describe(),
                hint: "stop it first, or run every archiver of the stream with --shared",
            });
        }
        // Our heartbeat: other shared archivers see us alive while it is renewed.
        let lease = Lease::acquire_on(
            &ctx.archive,
            Subject::Worker {
                stream: name.clone(),
                owner: ctx.owner.clone(),
            },
            &ctx.owner,
            ttl,
            0,
        )
        .await?;
        tracing::info!(stream = %name, archiver = %ctx.owner, "archiving shared with other archivers into {}", ctx.archive.describe(&ctx.archive.layout.stream_dir(&name)));
        lease
    } else {
        if let Some(rec) = workers::shared_archiver(&ctx.archive, &name, ttl).await? {
            return Err(Error::ArchiverModeConflict {
                stream: name,
                running: "shared archivers",
                owner: rec.describe(),
                hint: "run this one with --shared too (archiver.shared = true), or stop them first",
            });
        }
        let lease = Lease::acquire(&ctx.archive, &name, &ctx.owner, ttl, min_epoch).await?;
        ctx.epoch.store(lease.epoch(), Ordering::Release);
        tracing::info!(stream = %name, epoch = lease.epoch(), "lease acquired; archiving into {}", ctx.archive.describe(&ctx.archive.layout.stream_dir(&name)));
        // Uploads of an earlier holder are never completed (it died, or it is
        // fenced): abort them all before this holder starts any of its own.
        // (Shared archivers abort those of a shard they take over.)
        let stream_dir = ctx.archive.layout.stream_dir(&name);
        match crate::archive::store::abort_stale_uploads(&ctx.cfg, &ctx.archive, &stream_dir, None)
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(stream = %name, "aborted {n} incomplete upload(s) of an earlier archiver")
            }
            Err(e) => tracing::warn!(stream = %name, "{e}"),
        }
        lease
    };
    let _ = ctx.lease_clock.set(lease.clock());

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

    let coord = ctx
        .shared
        .then(|| Coordinator::new(&ctx.archive, &name, &ctx.owner, ttl, min_epoch));
    let result = match identify(&ctx, coord).await {
        Ok((ckpts, coord)) => supervise(ctx.clone(), ckpts, coord, shards.clone()).await,
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
        // The others take our shards at once, rather than after the ttl.
        (Err(e), Ok(lease)) if ctx.shared => {
            let _ = lease.remove().await;
            Err(e)
        }
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(lease)) if ctx.shared => lease.remove().await,
        (Ok(()), Ok(lease)) => {
            lease.release().await?;
            Ok(())
        }
    }
}

/// Find which incarnation of the stream this is (see `identity`), record
/// it, and close what an earlier incarnation left unfinished (its records are
/// gone with it: recorded as gaps). Returns the checkpoints of the current one.
async fn identify(
    ctx: &StreamCtx,
    mut coord: Option<Coordinator>,
) -> Result<(
    Vec<crate::archive::checkpoint::Checkpoint>,
    Option<Coordinator>,
)> {
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
    if let Some(coord) = coord.as_mut() {
        coord.refresh().await?;
    }
    let mut current = Vec::new();
    for c in ckpts {
        if identity::split_key(&c.shard_id).1 == suffix {
            current.push(c);
        } else if !c.finished {
            let why =
                "the stream was deleted (and re-created) before this shard was archived to its end";
            match coord.as_mut() {
                None => record_lost_shard(ctx, &c.shard_id, ctx.epoch(), why).await?,
                // Shared: whoever claims it records it.
                Some(coord) => {
                    if let Some((epoch, _)) = coord.claim(&c.shard_id, c.epoch).await? {
                        record_lost_shard(ctx, &c.shard_id, epoch, why).await?;
                        coord.release(&c.shard_id, epoch, true).await?;
                    }
                }
            }
        }
    }
    let table = PositionsTable::start(
        &ctx.archive,
        StreamId {
            stream: name.clone(),
            arn,
            created_ms: created,
        },
        &suffix,
        &current,
        ctx.cfg.archive.publish == crate::config::PublishMode::Hour,
        ctx.shared,
    )
    .await?;
    let _ = ctx.positions.set(Arc::new(table));
    Ok((current, coord))
}

async fn supervise(
    ctx: Arc<StreamCtx>,
    ckpts: Vec<crate::archive::checkpoint::Checkpoint>,
    mut coord: Option<Coordinator>,
    cancel: CancellationToken,
) -> Result<()> {
    let name = ctx.stream.name.clone();
    let max_backoff = ctx.cfg.archiver.max_backoff.0;
    let suffix = ctx.suffix.get().cloned().unwrap_or_default();
    // We hold the lease: checkpoints change only through our own tasks, so
    // they are read once; task results keep `finished` current. (Shared:
    // other archivers' `done` claims add to it.) Sets hold Kinesis shard
    // ids of the current incarnation.
    let kinesis_id =
        |c: &crate::archive::checkpoint::Checkpoint| identity::split_key(&c.shard_id).0.to_string();
    let checkpointed: HashSet<String> = ckpts.iter().map(kinesis_id).collect();
    // Epoch of each shard's chain at start: a claim goes above it.
    let chain_epoch: HashMap<String, u64> =
        ckpts.iter().map(|c| (kinesis_id(c), c.epoch)).collect();
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
    // Shared: each running shard's claim epoch and stop token, and the
    // shards being given up to other archivers.
    let mut held: HashMap<String, (u64, CancellationToken)> = HashMap::new();
    let mut shedding: HashSet<String> = HashSet::new();
    // Shards given up lately, left to the others for a few rounds.
    let mut given: HashMap<String, Instant> = HashMap::new();
    let mut tasks: JoinSet<Result<ShardOutcome>> = JoinSet::new();
    let mut first_err: Option<Error> = None;
    let mut caught_up: HashSet<String> = HashSet::new();
    let mut restarts: HashMap<String, u32> = HashMap::new();
    let round = ctx.cfg.archiver.lease_ttl.0 / 4;

    loop {
        let working = !cancel.is_cancelled() && first_err.is_none();
        if working && relist {
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
        if let Some(coord) = coord.as_mut().filter(|_| working) {
            match coord.refresh().await {
                Ok(()) => {
                    for key in coord.done() {
                        let (id, sfx) = identity::split_key(key);
                        if sfx == suffix {
                            finished.insert(id.to_string());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(stream = %name, "reading the other archivers' claims failed, keeping the previous view: {e}")
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
                let why = "the shard left the stream (closed longer than the retention ago) before it was archived to its end";
                let res = match coord.as_mut() {
                    None => record_lost_shard(&ctx, &key, ctx.epoch(), why)
                        .await
                        .map(|()| true),
                    Some(coord) => {
                        let min = chain_epoch.get(&id).copied().unwrap_or(0);
                        match coord.claim(&key, min).await {
                            Ok(Some((epoch, _))) => {
                                async {
                                    record_lost_shard(&ctx, &key, epoch, why).await?;
                                    coord.release(&key, epoch, true).await?;
                                    Ok(true)
                                }
                                .await
                            }
                            // Another archiver holds it: its business.
                            Ok(None) => Ok(false),
                            Err(e) => Err(e),
                        }
                    }
                };
                match res {
                    Ok(true) => {
                        finished.insert(id);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(stream = %name, shard = %id, "{e}");
                        cancel.cancel();
                        first_err.get_or_insert(e);
                    }
                }
            }
            let initial = initial.get_or_insert_with(|| listed.keys().cloned().collect());
            let active: HashSet<&String> = running.values().collect();
            let mut candidates = Vec::new();
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
                candidates.push(info.clone());
            }
            let start: Vec<(ShardInfo, u64)> = match coord.as_mut() {
                None => candidates.into_iter().map(|i| (i, ctx.epoch())).collect(),
                Some(coord) => {
                    // Ours no more: another archiver took it while we did not
                    // renew in time. Its task stops (its commits are fenced).
                    for (id, (epoch, token)) in &held {
                        if coord
                            .claim_of(&ctx.key(id))
                            .is_some_and(|c| c.epoch > *epoch)
                            && !token.is_cancelled()
                        {
                            tracing::warn!(stream = %name, shard = %id, "another archiver took this shard over: stopping its task");
                            token.cancel();
                        }
                    }
                    // Every shard that can be archived now, whoever holds it.
                    let mine = held.len() - shedding.len().min(held.len());
                    let target = workers::target(candidates.len() + mine, coord.live().len());
                    candidates.retain(|i| !coord.held_by_other(&ctx.key(&i.shard_id)));
                    // Too many, or two more than another archiver: give
                    // shards up (their tasks flush and commit, then the
                    // claims are freed) and leave them to the others a while.
                    let excess = if mine > target {
                        mine - target
                    } else {
                        usize::from(coord.fewest_held_by_others().is_some_and(|n| mine >= n + 2))
                    };
                    let give: Vec<String> = held
                        .keys()
                        .filter(|id| !shedding.contains(*id))
                        .take(excess)
                        .cloned()
                        .collect();
                    for id in give {
                        tracing::info!(stream = %name, shard = %id, "handing the shard over to another archiver (balancing)");
                        if let Some((_, token)) = held.get(&id) {
                            token.cancel();
                        }
                        given.insert(id.clone(), Instant::now());
                        shedding.insert(id);
                    }
                    let mine = mine - excess.min(mine);
                    given.retain(|_, t| t.elapsed() < 3 * round);
                    candidates.retain(|i| !given.contains_key(&i.shard_id));
                    let mut room = target.saturating_sub(mine);
                    let mut start = Vec::new();
                    // Archivers starting together try different shards first.
                    use rand::seq::SliceRandom;
                    candidates.shuffle(&mut rand::rng());
                    for info in candidates {
                        if room == 0 {
                            break;
                        }
                        let id = info.shard_id.clone();
                        let key = ctx.key(&id);
                        let min = chain_epoch.get(&id).copied().unwrap_or(0);
                        match coord.claim(&key, min).await {
                            Ok(Some((epoch, from))) => {
                                if let Some(from) = from {
                                    tracing::info!(stream = %name, shard = %id, "taking the shard over from archiver {from}, which stopped renewing its heartbeat");
                                    let dir = ctx.archive.layout.stream_dir(&name);
                                    if let Err(e) = crate::archive::store::abort_stale_uploads(
                                        &ctx.cfg,
                                        &ctx.archive,
                                        &dir,
                                        Some(&key),
                                    )
                                    .await
                                    {
                                        tracing::warn!(stream = %name, shard = %id, "{e}");
                                    }
                                }
                                start.push((info, epoch));
                                room -= 1;
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(stream = %name, shard = %id, "claiming the shard failed (trying again later): {e}");
                                break;
                            }
                        }
                    }
                    start
                }
            };
            for (info, epoch) in start {
                let token = cancel.child_token();
                let (c, t) = (ctx.clone(), token.clone());
                let id = info.shard_id.clone();
                let handle = tasks.spawn(async move { archive_shard(c, info, epoch, t).await });
                running.insert(handle.id(), id.clone());
                if coord.is_some() {
                    held.insert(id, (epoch, token));
                }
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
                let claim = held.remove(&id).map(|(epoch, _)| epoch);
                shedding.remove(&id);
                // Shared: what becomes of the shard's claim.
                let mut release: Option<bool> = None;
                match res {
                    Ok(ShardOutcome::Finished) => {
                        tracing::info!(stream = %name, shard = %id, "shard finished");
                        if let Err(e) = manifest::record_finished_shard(&ctx.archive, &name, &ctx.key(&id)).await {
                            tracing::warn!(stream = %name, shard = %id, "could not update the finished-shard manifest: {e}");
                        }
                        finished.insert(id.clone());
                        release = Some(true);
                        // Its children may be listed (or be new) and can start now.
                        relist = true;
                    }
                    Ok(ShardOutcome::CaughtUp) => {
                        caught_up.insert(id.clone());
                        release = Some(false);
                    }
                    Ok(ShardOutcome::Stopped) => release = Some(false),
                    // A late write of an earlier archiver changed the shard's
                    // state: its task starts again from the new state (the
                    // claim, if any, stays ours).
                    Err(e @ Error::StaleCheckpoint { .. })
                        if restarts.get(&id).copied().unwrap_or(0) < 20 =>
                    {
                        *restarts.entry(id.clone()).or_default() += 1;
                        tracing::warn!(stream = %name, shard = %id, "{e}; reading the shard again from its committed state");
                    }
                    // Shared: another archiver took the shard over (we were
                    // taken for dead); the claim is theirs.
                    Err(e @ Error::Fenced { .. }) if claim.is_some() => {
                        tracing::warn!(stream = %name, shard = %id, "{e}: another archiver holds the shard now");
                    }
                    Err(e) => {
                        tracing::error!(stream = %name, shard = %id, "{e}");
                        cancel.cancel();
                        first_err.get_or_insert(e);
                        release = Some(false);
                    }
                }
                if let (Some(coord), Some(epoch), Some(done)) = (coord.as_mut(), claim, release)
                    && let Err(e) = coord.release(&ctx.key(&id), epoch, done).await
                {
                    tracing::warn!(stream = %name, shard = %id, "could not release the shard's claim (others take it over after the lease ttl): {e}");
                }
            }
            _ = cancel.cancelled(), if !cancel.is_cancelled() => {}
            _ = tokio::time::sleep(discovery), if !ctx.once && !cancel.is_cancelled() => {
                relist = true;
            }
            _ = tokio::time::sleep(round), if coord.is_some() && !cancel.is_cancelled() => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Record that the unarchived end of `shard` left the stream: a gap from
/// its checkpoint to the end of the shard, and the shard finished.
async fn record_lost_shard(ctx: &StreamCtx, shard: &str, epoch: u64, reason: &str) -> Result<()> {
    let stream = &ctx.stream.name;
    let mut ck = ShardCheckpoint::open_with(
        &ctx.archive,
        stream,
        shard,
        vec![],
        &ctx.owner,
        epoch,
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
    .await?;
    ctx.publish_position(&ck).await
}
