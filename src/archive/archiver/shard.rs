//! One shard's task: read (paced, within the memory budget), buffer per
//! arrival hour, and flush — stage, commit, publish, then the positions
//! table (see `checkpoint` and `positions`) — until the shard ends, the
//! run is cancelled, or `--once` reaches the tip as of the start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use tokio_util::sync::CancellationToken;

use crate::archive::budget::{CallSizer, Reservation, buffered_cost, response_cost};
use crate::archive::checkpoint::{Commit, Gap, PublishPolicy, ShardCheckpoint, stage};
use crate::archive::footer::flush_metadata;
use crate::archive::key_index;
use crate::archive::layout::hour_key;
use crate::config::{PayloadFormat, ReadMode};
use crate::error::{Error, Result};
use crate::kinesis;
use crate::kinesis::fanout::FanoutReader;
use crate::kinesis::reader::{Reader, ShardReader, StartAt};
use crate::kinesis::shards::ShardInfo;
use crate::metrics::ShardStats;
use crate::record::{Position, Record, RecordBatchBuilder};

use super::{ShardOutcome, StreamCtx};

/// Buffered records of one shard, grouped by arrival hour.
struct ShardBuffer {
    groups: BTreeMap<i64, Group>,
    mem: usize,
    /// Payload bytes buffered.
    payload: usize,
    records: usize,
    oldest: Option<Instant>,
    /// Memory of the buffered records and of their flush (see `budget`).
    held: Option<Reservation>,
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
            held: None,
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
                // Small to start with, grown by doubling: with hundreds of
                // shards a large up-front capacity (it was 1 MiB each) is
                // memory outside the budget once written to and reused.
                builder: RecordBatchBuilder::with_capacity(64, 64 << 10),
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

    fn hold(&mut self, r: Reservation) {
        match &mut self.held {
            Some(held) => held.merge(r),
            None => self.held = Some(r),
        }
    }

    fn is_empty(&self) -> bool {
        self.records == 0
    }
}

/// Archive one shard as the holder of lease `epoch` (the stream's lease, or
/// with shared archivers the shard's own claim) until it is finished, caught
/// up (`--once`) or cancelled.
pub(super) async fn archive_shard(
    ctx: Arc<StreamCtx>,
    info: ShardInfo,
    epoch: u64,
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
        epoch,
        PublishPolicy::from_config(&ctx.cfg.archive),
    )
    .await?;
    // Opening may have published what an earlier holder committed.
    ctx.publish_position(&ck).await?;
    if ck.state().finished {
        stats.state.store(2, Ordering::Relaxed);
        return Ok(ShardOutcome::Finished);
    }
    let a = &ctx.cfg.archiver;
    // Its share of the shard's calls (archiver.max_reads_per_second), and
    // the bytes it read waited out at the shard's read limit.
    let pacer = crate::kinesis::pace::shard_pacer(
        &stream,
        &shard,
        crate::kinesis::pace::ReadLimits {
            calls_per_second: a.max_reads_per_second,
            bytes_per_second: crate::kinesis::pace::SHARD_BYTES_PER_SECOND,
        },
    );
    let mut reader = match a.read {
        ReadMode::Polling => {
            let mut r = ShardReader::new(
                ctx.client.clone(),
                &stream,
                &shard,
                StartAt::TrimHorizon,
                a.max_records_per_call,
                a.max_backoff.0,
                ctx.stats.retries.clone(),
            )
            .paced(pacer.clone());
            if let Some(pos) = &ck.state().position {
                r = r.resume_after(pos);
            }
            Reader::Polling(r)
        }
        ReadMode::Fanout => {
            let mut r = FanoutReader::new(
                ctx.client.clone(),
                &stream,
                &shard,
                &a.consumer_name,
                StartAt::TrimHorizon,
                info.closed,
                a.shard_discovery_interval.0,
                a.max_backoff.0,
                ctx.stats.retries.clone(),
            );
            if let Some(pos) = &ck.state().position {
                r = r.resume_after(pos);
            }
            Reader::Fanout(r)
        }
    };
    tracing::debug!(%stream, %shard, position = ?ck.state().position, "shard task started");
    let started_ms = chrono::Utc::now().timestamp_millis();
    let flush_cfg = &ctx.cfg.archive.flush;
    let mut buf = ShardBuffer::new();
    let mut last_call = Instant::now() - Duration::from_secs(1);
    let mut sizer = CallSizer::new(&ctx.budget, a.max_records_per_call);

    loop {
        // Kinesis allows 5 GetRecords per second per shard (events are pushed).
        let since = last_call.elapsed();
        if reader.polls() && since < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(200) - since).await;
        }
        // The shard's read pace first: no memory is held while waiting for it.
        if reader.polls() {
            tokio::select! {
                _ = pacer.ready() => {}
                _ = cancel.cancelled() => {}
            }
        }
        // Then the memory of the response, before the call (see `budget`);
        // with fan-out, before the next event is taken from the stream.
        let (limit, mut bytes) = sizer.next_call();
        if !reader.polls() {
            // An event holds what the shard pushed since the last one (at
            // most 2 MiB/s): reserve that, a larger one is charged as debt.
            bytes = bytes.min(response_cost(kinesis::fanout::EVENT_PAYLOAD));
        }
        let call = call_memory(&ctx, &mut ck, &mut buf, &stats, (limit, bytes), &cancel).await?;
        last_call = Instant::now();
        let batch = match call {
            Some((limit, mut held)) => {
                reader.set_limit(limit);
                // At most so many GetRecords calls in flight in the process:
                // each keeps an HTTP connection, whose buffers grow to the
                // responses it read, outside the budget.
                let _call = if reader.polls() {
                    tokio::select! {
                        p = ctx.calls.clone().acquire_owned() => Some(p.map_err(|_| Error::Interrupted)?),
                        _ = cancel.cancelled() => None,
                    }
                } else {
                    None
                };
                reader.next(&cancel).await?.map(|b| {
                    sizer.observe(limit, b.kinesis_records, b.largest_record as u64);
                    // A response larger than expected is in memory already.
                    held.at_least(response_cost(b.response_bytes as u64));
                    (b, held)
                })
            }
            None => None,
        };
        let Some((mut batch, mut held)) = batch else {
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
        let last_arrival = batch.records.last().map(|r| r.arrival_ms);
        if !batch.records.is_empty() {
            let mem_before = buf.mem;
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
            // The response is freed; its records keep what they and their flush need.
            batch.records = Vec::new();
            held.resize(buffered_cost((buf.mem - mem_before) as u64));
            buf.hold(held);
        } else {
            drop(held);
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
                || last_arrival.is_some_and(|t| t >= started_ms);
            if at_tip || past_start {
                flush(&ctx, &mut ck, &mut buf, &stats, false).await?;
                ck.publish_closed(closed_before(&buf)).await?;
                ctx.publish_position(&ck).await?;
                stats.state.store(3, Ordering::Relaxed);
                return Ok(ShardOutcome::CaughtUp);
            }
        }
        if batch.kinesis_records == 0 {
            if buf.is_empty() {
                // Hourly publication: an idle shard's hours close by the clock.
                ck.publish_closed(closed_before(&buf)).await?;
                ctx.publish_position(&ck).await?;
            }
            // An idle subscription delivers its next event by itself.
            let pause = if reader.polls() {
                a.poll_interval.0
            } else {
                Duration::ZERO
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = ctx.budget.asked_to_flush() => {
                    if !buf.is_empty() {
                        flush(&ctx, &mut ck, &mut buf, &stats, false).await?;
                    }
                }
            }
        }
    }
}

/// Memory (`bytes`) for the shard's next GetRecords call or event, and the
/// call's `Limit` (see `budget`, [`CallSizer`]): taken at once when free;
/// otherwise the shard first flushes what it buffered (it holds nothing
/// while it waits), asks the idle shards to flush theirs, and waits its
/// turn. `None`: cancelled while waiting.
async fn call_memory(
    ctx: &StreamCtx,
    ck: &mut ShardCheckpoint,
    buf: &mut ShardBuffer,
    stats: &ShardStats,
    (limit, bytes): (i32, u64),
    cancel: &CancellationToken,
) -> Result<Option<(i32, Reservation)>> {
    if let Some(r) = ctx.budget.try_take(bytes) {
        return Ok(Some((limit, r)));
    }
    if !buf.is_empty() {
        flush(ctx, ck, buf, stats, false).await?;
    }
    ctx.budget.ask_to_flush();
    let wait = ctx.budget.take(bytes);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            r = &mut wait => return Ok(Some((limit, r?))),
            _ = cancel.cancelled() => return Ok(None),
            // Keep asking: an idle shard may have been between polls when asked.
            _ = tokio::time::sleep(Duration::from_millis(200)) => ctx.budget.ask_to_flush(),
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
            settings
                .encode_owned(vec![batch], metadata, &name)
                .map(|b| (b, k))
        })
        .await
        .map_err(|e| Error::Usage(format!("internal error: encoder task failed: {e}")))??;
        keys.extend(k);
        written += bytes.len() as u64;
        staged.push(stage_with_retry(ctx, ck.epoch(), &path, bytes::Bytes::from(bytes)).await?);
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
    // The positions table names the flush only now that its files are published.
    ctx.publish_position(ck).await?;
    buf.records = 0;
    buf.mem = 0;
    buf.payload = 0;
    buf.oldest = None;
    buf.held = None; // returns the memory to the budget
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
    epoch: u64,
    path: &object_store::path::Path,
    bytes: bytes::Bytes,
) -> Result<crate::archive::checkpoint::PublishEntry> {
    let mut backoff = kinesis::Backoff::new(ctx.cfg.archiver.max_backoff.0);
    let stream = &ctx.stream.name;
    loop {
        match stage(&ctx.archive, stream, epoch, path, bytes.clone()).await {
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
