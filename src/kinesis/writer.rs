//! Writes records into a Kinesis stream with PutRecords: the replay's sink.
//!
//! One sender task per target shard (a record goes to the shard whose hash
//! key range holds the MD5 of its partition key, or its explicit hash key),
//! fed through a bounded channel so a slow shard pushes back on the reader.
//! Each sender:
//!
//! ```text
//!   channel ─▶ pending (FIFO) ─▶ batch: ≤ 500 records, ≤ 5 MiB, ≤ one record per key
//!                  ▲                │   paced by the shard's token buckets (records, bytes)
//!                  │                ▼   at its adaptive rate, and the global --rate bucket
//!                  └── failed ── PutRecords ── ok ─▶ ack(idx)
//! ```
//!
//! A batch holds at most one record of each partition key, and a key's next
//! record is only taken once its previous one is acknowledged: when an entry
//! fails (throttled) and the rest succeed, no later record of the same key
//! can overtake it. Failed entries stay at their place in `pending` and are
//! retried. (So a key's records go one per round trip; with
//! [`WriterSettings::unordered`] a batch takes any records, in order but
//! without that guarantee.)
//!
//! Retries count per record: a batch written in part is progress (the
//! backoff starts over) and only its refused entries count an attempt; a
//! call that fails as a whole counts one attempt for each of its records and
//! backs off exponentially with jitter. A record refused
//! `replay.retry_attempts` times in a row stops the writer with
//! [`Error::RecordRefused`], naming it, its shard and the last ErrorCode.
//!
//! Each shard's rate adapts to throttling ([`Aimd`]): it starts at the
//! per-shard limits times the share (less than 1 when the target is the
//! source stream), halves on every throttled batch and climbs back on clean
//! ones, never above the start. Batches hold about a quarter second at the
//! current rate. Without per-shard limits there is no rate to adapt: a
//! throttled batch then waits a backoff that starts over after a clean one.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use md5::{Digest, Md5};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::kinesis::shards::list_shards;
use crate::kinesis::{Backoff, Client, Failure, classify};

/// PutRecords limits (AWS).
pub const MAX_BATCH_RECORDS: usize = 500;
/// PutRecords request payload limit.
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;

/// A record to write.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Ordinal in the replay's output order (acknowledged back to the caller).
    pub idx: u64,
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key, when the original record had one.
    pub explicit_hash_key: Option<String>,
    /// Payload as sent.
    pub data: Bytes,
}

impl OutRecord {
    /// Bytes that count against Kinesis limits (payload + partition key).
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// How the writer paces and retries.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// Per-shard records/s the target accepts (0 = no per-shard pacing).
    pub shard_records_per_sec: u32,
    /// Per-shard bytes/s the target accepts (0 = no per-shard pacing).
    pub shard_bytes_per_sec: u64,
    /// Overall records/s cap (`--rate`), if any.
    pub rate: Option<f64>,
    /// Consecutive failed attempts of one record before the writer gives up.
    pub max_attempts: u32,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Share of the per-shard limits the writer starts at and never goes
    /// above, in (0, 1]: 1 normally, `replay.same_stream_share` when the
    /// target is the source stream.
    pub share: f64,
    /// Send a key's records without waiting for each other (`--unordered`):
    /// a batch may hold several records of one key, so a key's records can
    /// land out of order in the target (consumers that apply the protocol
    /// of [`crate::consistency`] do not mind).
    pub unordered: bool,
}

/// Per target shard counters.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ShardStats {
    /// Target shard id.
    pub shard_id: String,
    /// Records acknowledged.
    pub records: u64,
    /// Bytes acknowledged (payload + key).
    pub bytes: u64,
    /// Entries the target refused with throttling and that were retried.
    pub throttled: u64,
    /// PutRecords calls.
    pub calls: u64,
    /// PutRecords calls the target throttled, in part or in full (each one
    /// lowered the shard's rate).
    #[serde(default)]
    pub throttled_calls: u64,
    /// The shard's adaptive rate when the writer stopped, records/s (absent
    /// without per-shard pacing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// The lowest adaptive rate the shard went down to, records/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowest_rate: Option<f64>,
}

/// Additive increase, multiplicative decrease of one target shard's send
/// rate, as a share of the configured per-shard limits.
///
/// It starts at its ceiling (1, or the same-stream share); every throttled
/// batch halves it (down to a floor of 1/32 of the ceiling), every clean
/// batch adds 1/16 of the ceiling back, up to the ceiling.
#[derive(Debug, Clone)]
pub struct Aimd {
    ceiling: f64,
    current: f64,
}

impl Aimd {
    /// Factor applied on throttling.
    pub const DECREASE: f64 = 0.5;
    /// Share of the ceiling added per clean batch.
    pub const INCREASE: f64 = 1.0 / 16.0;
    /// Share of the ceiling the rate never goes below.
    pub const FLOOR: f64 = 1.0 / 32.0;

    /// A controller that starts at, and never exceeds, `ceiling` (clamped to (0, 1]).
    pub fn new(ceiling: f64) -> Self {
        let ceiling = if ceiling.is_finite() && ceiling > 0.0 {
            ceiling.min(1.0)
        } else {
            1.0
        };
        Aimd {
            ceiling,
            current: ceiling,
        }
    }

    /// The current share of the limits.
    pub fn share(&self) -> f64 {
        self.current
    }

    /// The target throttled: multiplicative decrease.
    pub fn throttled(&mut self) {
        self.current = (self.current * Self::DECREASE).max(self.ceiling * Self::FLOOR);
    }

    /// A batch went through without throttling: additive increase.
    pub fn clean(&mut self) {
        self.current = (self.current + self.ceiling * Self::INCREASE).min(self.ceiling);
    }
}

/// A target shard's hash key range.
#[derive(Debug, Clone)]
pub struct TargetShard {
    /// Shard id.
    pub shard_id: String,
    /// First hash key of its range.
    pub start: u128,
    /// Last hash key of its range (inclusive).
    pub end: u128,
}

/// The open shards of a target stream, for routing and pacing.
#[derive(Debug, Clone)]
pub struct TargetShards {
    /// Open shards ordered by hash key range.
    pub shards: Vec<TargetShard>,
}

impl TargetShards {
    /// The open shards of `stream`.
    pub async fn discover(client: &Client, stream: &str, max_backoff: Duration) -> Result<Self> {
        let mut shards: Vec<TargetShard> = list_shards(client, stream, max_backoff)
            .await?
            .into_iter()
            .filter(|s| !s.closed)
            .filter_map(|s| {
                Some(TargetShard {
                    start: s.hash_start.parse().ok()?,
                    end: s.hash_end.parse().ok()?,
                    shard_id: s.shard_id,
                })
            })
            .collect();
        shards.sort_by_key(|s| s.start);
        if shards.is_empty() {
            return Err(Error::Kinesis {
                operation: "ListShards",
                stream: stream.into(),
                shard: None,
                message: "the stream has no open shard".into(),
            });
        }
        Ok(TargetShards { shards })
    }

    /// Index of the shard a record goes to.
    pub fn route(&self, partition_key: &str, explicit_hash_key: Option<&str>) -> usize {
        let h = record_hash(partition_key, explicit_hash_key);
        self.shards
            .iter()
            .position(|s| s.start <= h && h <= s.end)
            .unwrap_or(0)
    }
}

/// The hash key a record is routed by: its explicit hash key, else the MD5
/// of its partition key.
pub fn record_hash(partition_key: &str, explicit_hash_key: Option<&str>) -> u128 {
    explicit_hash_key
        .and_then(|k| k.parse::<u128>().ok())
        .unwrap_or_else(|| hash_key(partition_key))
}

/// The 128-bit hash key Kinesis derives from a partition key (MD5, big-endian).
pub fn hash_key(partition_key: &str) -> u128 {
    let d = Md5::digest(partition_key.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d);
    u128::from_be_bytes(b)
}

/// A token bucket that may go into debt: `take` returns how long to wait.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// `rate` units per second, holding at most `burst`; starts empty so a
    /// burst never doubles the first second.
    pub fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Take `n` units; the wait until they are covered.
    pub fn take(&mut self, n: f64) -> Duration {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Change the rate (and burst) from now on; tokens gathered so far are kept.
    pub fn set_rate(&mut self, rate: f64, burst: f64) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate)
            .min(self.burst)
            .min(burst);
        self.rate = rate;
        self.burst = burst;
    }
}

/// What a sender reports per acknowledged record.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The record's ordinal.
    pub idx: u64,
    /// Target shard index.
    pub shard: usize,
    /// Size counted (payload + key).
    pub bytes: usize,
}

/// Writes records to a stream, one sender task per target shard.
pub struct Writer {
    senders: Vec<mpsc::Sender<OutRecord>>,
    tasks: JoinSet<Result<ShardStats>>,
    /// The target's shards (routing).
    pub shards: TargetShards,
    cancel: CancellationToken,
}

impl Writer {
    /// Start the senders. Acknowledgements arrive on `acks`.
    pub fn start(
        client: Client,
        stream: &str,
        shards: TargetShards,
        settings: WriterSettings,
        acks: mpsc::UnboundedSender<Ack>,
        cancel: CancellationToken,
    ) -> Self {
        let global = settings
            .rate
            .map(|r| Arc::new(Mutex::new(Bucket::new(r, (r / 4.0).max(1.0)))));
        let mut senders = Vec::new();
        let mut tasks = JoinSet::new();
        for (i, s) in shards.shards.iter().enumerate() {
            let (tx, rx) = mpsc::channel(2 * MAX_BATCH_RECORDS);
            senders.push(tx);
            let sender = Sender {
                client: client.clone(),
                stream: stream.to_string(),
                shard: i,
                stats: ShardStats {
                    shard_id: s.shard_id.clone(),
                    ..Default::default()
                },
                settings: settings.clone(),
                global: global.clone(),
                acks: acks.clone(),
                cancel: cancel.clone(),
            };
            tasks.spawn(sender.run(rx));
        }
        Writer {
            senders,
            tasks,
            shards,
            cancel,
        }
    }

    /// Queue one record (waits while its shard's queue is full).
    pub async fn send(&mut self, r: OutRecord) -> Result<()> {
        let i = self
            .shards
            .route(&r.partition_key, r.explicit_hash_key.as_deref());
        if self.senders[i].send(r).await.is_err() {
            // The sender stopped: its error is what the caller should see.
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn failure(&mut self) -> Error {
        self.cancel.cancel();
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok(Err(e)) => return e,
                Err(e) => {
                    return Error::Query {
                        message: format!("replay sender task failed: {e}"),
                    };
                }
                Ok(Ok(_)) => {}
            }
        }
        Error::Interrupted
    }

    /// Wait until everything queued is acknowledged; per-shard statistics.
    pub async fn finish(mut self) -> Result<Vec<ShardStats>> {
        self.senders.clear();
        let mut stats = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok(Ok(s)) => stats.push(s),
                Ok(Err(e)) => {
                    self.cancel.cancel();
                    return Err(e);
                }
                Err(e) => {
                    return Err(Error::Query {
                        message: format!("replay sender task failed: {e}"),
                    });
                }
            }
        }
        stats.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        Ok(stats)
    }
}

struct Sender {
    client: Client,
    stream: String,
    shard: usize,
    stats: ShardStats,
    settings: WriterSettings,
    global: Option<Arc<Mutex<Bucket>>>,
    acks: mpsc::UnboundedSender<Ack>,
    cancel: CancellationToken,
}

/// A record waiting in a sender, with its consecutive failed attempts.
struct Pending {
    rec: OutRecord,
    attempts: u32,
}

/// Why one entry of a PutRecords call was not written.
struct Refusal {
    code: String,
    message: String,
    throttled: bool,
}

/// Per-entry ErrorCodes that mean the target is over a limit.
fn is_throttling_code(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "KMSThrottlingException"
            | "ThrottlingException"
            | "LimitExceededException"
    )
}

/// The per-shard pacing: token buckets at the adaptive rate.
struct Pacing {
    records_per_sec: f64,
    bytes_per_sec: f64,
    aimd: Aimd,
    rec_bucket: Option<Bucket>,
    byte_bucket: Option<Bucket>,
}

impl Pacing {
    fn new(s: &WriterSettings) -> Self {
        let mut p = Pacing {
            records_per_sec: f64::from(s.shard_records_per_sec),
            bytes_per_sec: s.shard_bytes_per_sec as f64,
            aimd: Aimd::new(s.share),
            rec_bucket: None,
            byte_bucket: None,
        };
        let (recs, bytes) = p.batch_limits();
        let share = p.aimd.share();
        if p.records_per_sec > 0.0 {
            p.rec_bucket = Some(Bucket::new(p.records_per_sec * share, recs as f64));
        }
        if p.bytes_per_sec > 0.0 {
            p.byte_bucket = Some(Bucket::new(p.bytes_per_sec * share, bytes as f64));
        }
        p
    }

    /// Whether any per-shard limit is configured (else the rate is not adapted).
    fn paced(&self) -> bool {
        self.rec_bucket.is_some() || self.byte_bucket.is_some()
    }

    /// Largest batch at the current rate: about a quarter second's worth.
    fn batch_limits(&self) -> (usize, usize) {
        let share = self.aimd.share();
        let recs = if self.records_per_sec > 0.0 {
            ((self.records_per_sec * share / 4.0) as usize).clamp(1, MAX_BATCH_RECORDS)
        } else {
            MAX_BATCH_RECORDS
        };
        let bytes = if self.bytes_per_sec > 0.0 {
            ((self.bytes_per_sec * share / 4.0) as usize).clamp(1024 * 1024 + 256, MAX_BATCH_BYTES)
        } else {
            MAX_BATCH_BYTES
        };
        (recs, bytes)
    }

    /// The current records/s of the shard, when paced by records.
    fn rate(&self) -> Option<f64> {
        (self.records_per_sec > 0.0).then(|| self.records_per_sec * self.aimd.share())
    }

    /// Throttled (`true`) or clean: adapt the rate and the buckets.
    fn adapt(&mut self, throttled: bool) {
        if !self.paced() {
            return;
        }
        if throttled {
            self.aimd.throttled();
        } else {
            self.aimd.clean();
        }
        let share = self.aimd.share();
        let (recs, bytes) = self.batch_limits();
        if let Some(b) = self.rec_bucket.as_mut() {
            b.set_rate(self.records_per_sec * share, recs as f64);
        }
        if let Some(b) = self.byte_bucket.as_mut() {
            b.set_rate(self.bytes_per_sec * share, bytes as f64);
        }
    }
}

impl Sender {
    fn record_rate(&mut self, pacing: &Pacing) {
        if let Some(r) = pacing.rate() {
            self.stats.rate = Some(r);
            self.stats.lowest_rate = Some(self.stats.lowest_rate.map_or(r, |l| l.min(r)));
        }
    }

    async fn sleep(&self, d: Duration) -> Result<()> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Error::Interrupted),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<OutRecord>) -> Result<ShardStats> {
        let mut pacing = Pacing::new(&self.settings);
        self.record_rate(&pacing);
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut closed = false;
        // Calls that made no progress at all (whole-call errors, or every
        // entry refused): exponential backoff, reset by any progress.
        let mut backoff = Backoff::new(self.settings.max_backoff);
        // Without per-shard pacing there is no rate to lower: a throttled
        // batch waits instead, longer while the throttling goes on.
        let mut throttle_wait = Backoff::new(self.settings.max_backoff);
        let high_water = 4 * MAX_BATCH_RECORDS;
        loop {
            // Fill: block only when nothing is pending.
            while !closed && pending.len() < high_water {
                if pending.is_empty() {
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(Error::Interrupted),
                        r = rx.recv() => match r {
                            Some(rec) => pending.push_back(Pending { rec, attempts: 0 }),
                            None => closed = true,
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(rec) => pending.push_back(Pending { rec, attempts: 0 }),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                    }
                }
            }
            if pending.is_empty() && closed {
                self.record_rate(&pacing);
                return Ok(self.stats);
            }
            // One record per key, in order; a key whose earlier record is
            // not taken is blocked for the rest of this batch.
            let (max_recs, max_bytes) = pacing.batch_limits();
            let mut keys: HashSet<&str> = HashSet::new();
            let mut picked = Vec::new();
            let mut bytes = 0usize;
            for (i, p) in pending.iter().enumerate() {
                if picked.len() >= max_recs {
                    break;
                }
                if !self.settings.unordered && !keys.insert(p.rec.partition_key.as_str()) {
                    continue;
                }
                let sz = p.rec.size();
                if !picked.is_empty() && bytes + sz > max_bytes {
                    // Too big for this batch: later records of this key wait too.
                    continue;
                }
                bytes += sz;
                picked.push(i);
            }
            // Pace.
            let mut wait = Duration::ZERO;
            if let Some(b) = pacing.rec_bucket.as_mut() {
                wait = wait.max(b.take(picked.len() as f64));
            }
            if let Some(b) = pacing.byte_bucket.as_mut() {
                wait = wait.max(b.take(bytes as f64));
            }
            if let Some(g) = &self.global {
                wait = wait.max(g.lock().await.take(picked.len() as f64));
            }
            if !wait.is_zero() {
                self.sleep(wait).await?;
            }
            let entries: Vec<PutRecordsRequestEntry> = picked
                .iter()
                .filter_map(|&i| {
                    let r = &pending[i].rec;
                    PutRecordsRequestEntry::builder()
                        .partition_key(&r.partition_key)
                        .set_explicit_hash_key(r.explicit_hash_key.clone())
                        .data(Blob::new(r.data.to_vec()))
                        .build()
                        .ok()
                })
                .collect();
            self.stats.calls += 1;
            let call = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send();
            let resp = tokio::select! {
                _ = self.cancel.cancelled() => return Err(Error::Interrupted),
                r = call => r,
            };
            // Per picked record: None when written, else why not.
            let outcome: Vec<Option<Refusal>> = match resp {
                Ok(out) => {
                    let res = out.records();
                    (0..picked.len())
                        .map(|j| match res.get(j) {
                            Some(e) => e.error_code().map(|c| Refusal {
                                code: c.to_string(),
                                message: e.error_message().unwrap_or("").to_string(),
                                throttled: is_throttling_code(c),
                            }),
                            None => Some(Refusal {
                                code: "MissingResult".into(),
                                message: "the answer has no result for this entry".into(),
                                throttled: false,
                            }),
                        })
                        .collect()
                }
                Err(e) => match classify(&e) {
                    Failure::Retry(m) => {
                        tracing::debug!(stream = %self.stream, "PutRecords retry: {m}");
                        let code = e
                            .as_service_error()
                            .and_then(|s| s.meta().code())
                            .unwrap_or("CallFailed")
                            .to_string();
                        let throttled = is_throttling_code(&code);
                        let message = m;
                        (0..picked.len())
                            .map(|_| {
                                Some(Refusal {
                                    code: code.clone(),
                                    message: message.clone(),
                                    throttled,
                                })
                            })
                            .collect()
                    }
                    Failure::NotFound(m) => {
                        return Err(Error::StreamNotFound {
                            stream: self.stream.clone(),
                            detail: m,
                        });
                    }
                    Failure::Fatal(m) => {
                        return Err(Error::Kinesis {
                            operation: "PutRecords",
                            stream: self.stream.clone(),
                            shard: Some(self.stats.shard_id.clone()),
                            message: m,
                        });
                    }
                    Failure::ExpiredIterator => (0..picked.len())
                        .map(|_| {
                            Some(Refusal {
                                code: "ExpiredIteratorException".into(),
                                message: "unexpected for PutRecords".into(),
                                throttled: false,
                            })
                        })
                        .collect(),
                },
            };
            // Acknowledge what was written, count an attempt for every
            // record that was not; failed records keep their place.
            let mut done = vec![false; pending.len()];
            let mut written = 0usize;
            let mut throttled = false;
            let mut refused: Option<(usize, Refusal)> = None;
            for (&i, o) in picked.iter().zip(outcome) {
                match o {
                    None => {
                        done[i] = true;
                        written += 1;
                        let r = &pending[i].rec;
                        self.stats.records += 1;
                        self.stats.bytes += r.size() as u64;
                        let _ = self.acks.send(Ack {
                            idx: r.idx,
                            shard: self.shard,
                            bytes: r.size(),
                        });
                    }
                    Some(f) => {
                        if f.throttled {
                            self.stats.throttled += 1;
                            throttled = true;
                        } else {
                            tracing::debug!(
                                stream = %self.stream,
                                shard = %self.stats.shard_id,
                                "PutRecords entry failed: {}: {}",
                                f.code,
                                f.message
                            );
                        }
                        let p = &mut pending[i];
                        p.attempts += 1;
                        if p.attempts >= self.settings.max_attempts && refused.is_none() {
                            refused = Some((i, f));
                        }
                    }
                }
            }
            if let Some((i, f)) = refused {
                let p = &pending[i];
                return Err(Error::RecordRefused {
                    stream: self.stream.clone(),
                    shard: self.stats.shard_id.clone(),
                    partition_key: p.rec.partition_key.clone(),
                    record: p.rec.idx,
                    attempts: p.attempts,
                    error: format!("{}: {}", f.code, f.message),
                });
            }
            let mut k = 0;
            pending.retain(|_| {
                k += 1;
                !done[k - 1]
            });
            if throttled {
                self.stats.throttled_calls += 1;
            }
            // Throttling lowers the rate; a batch written without any
            // throttling raises it (a call that failed otherwise does neither).
            if throttled || written > 0 {
                pacing.adapt(throttled);
                self.record_rate(&pacing);
            }
            if written == 0 && !picked.is_empty() {
                // No progress at all: back off.
                let d = backoff.next_delay();
                self.sleep(d).await?;
                continue;
            }
            backoff.reset();
            if !throttled {
                throttle_wait.reset();
            } else if !pacing.paced() {
                let d = throttle_wait.next_delay();
                self.sleep(d).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_is_md5_big_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e_u128);
    }

    #[test]
    fn routes_by_hash_range() {
        let t = TargetShards {
            shards: vec![
                TargetShard {
                    shard_id: "a".into(),
                    start: 0,
                    end: u128::MAX / 2,
                },
                TargetShard {
                    shard_id: "b".into(),
                    start: u128::MAX / 2 + 1,
                    end: u128::MAX,
                },
            ],
        };
        assert_eq!(t.route("", None), 1); // 0xd4… is in the upper half
        assert_eq!(t.route("x", Some("5")), 0);
    }

    #[test]
    fn aimd_halves_on_throttling_down_to_the_floor() {
        let mut a = Aimd::new(1.0);
        assert_eq!(a.share(), 1.0);
        a.throttled();
        assert_eq!(a.share(), 0.5);
        a.throttled();
        assert_eq!(a.share(), 0.25);
        for _ in 0..20 {
            a.throttled();
        }
        assert_eq!(a.share(), Aimd::FLOOR);
    }

    #[test]
    fn aimd_climbs_back_additively_up_to_the_ceiling() {
        let mut a = Aimd::new(1.0);
        a.throttled();
        a.clean();
        assert!((a.share() - (0.5 + Aimd::INCREASE)).abs() < 1e-12);
        // From half the ceiling, 8 clean batches restore it, never beyond.
        for _ in 0..7 {
            a.clean();
        }
        assert!((a.share() - 1.0).abs() < 1e-12, "{}", a.share());
        a.clean();
        assert_eq!(a.share(), 1.0);
    }

    #[test]
    fn aimd_with_a_share_scales_start_ceiling_and_floor() {
        let mut a = Aimd::new(0.5);
        assert_eq!(a.share(), 0.5);
        for _ in 0..40 {
            a.clean();
        }
        assert_eq!(a.share(), 0.5, "never above the share");
        for _ in 0..40 {
            a.throttled();
        }
        assert_eq!(a.share(), 0.5 * Aimd::FLOOR);
        a.clean();
        assert!((a.share() - 0.5 * (Aimd::FLOOR + Aimd::INCREASE)).abs() < 1e-12);
        // Out-of-range shares mean the whole limits.
        assert_eq!(Aimd::new(0.0).share(), 1.0);
        assert_eq!(Aimd::new(f64::NAN).share(), 1.0);
        assert_eq!(Aimd::new(3.0).share(), 1.0);
    }

    #[test]
    fn pacing_follows_the_adaptive_rate() {
        let s = WriterSettings {
            shard_records_per_sec: 1000,
            shard_bytes_per_sec: 1 << 20,
            rate: None,
            max_attempts: 30,
            max_backoff: Duration::from_secs(1),
            share: 0.5,
            unordered: false,
        };
        let mut p = Pacing::new(&s);
        assert_eq!(p.rate(), Some(500.0));
        assert_eq!(p.batch_limits().0, 125);
        p.adapt(true);
        assert_eq!(p.rate(), Some(250.0));
        assert_eq!(p.batch_limits().0, 62);
        p.adapt(false);
        assert_eq!(p.rate(), Some(250.0 + 500.0 / 16.0));
        // Unpaced: nothing to adapt.
        let mut u = Pacing::new(&WriterSettings {
            shard_records_per_sec: 0,
            shard_bytes_per_sec: 0,
            ..s
        });
        assert!(!u.paced());
        u.adapt(true);
        assert_eq!(u.rate(), None);
        assert_eq!(u.batch_limits(), (MAX_BATCH_RECORDS, MAX_BATCH_BYTES));
    }

    #[test]
    fn bucket_rate_change_applies_from_now() {
        let mut b = Bucket::new(100.0, 10.0);
        assert!(b.take(10.0) > Duration::from_millis(90));
        b.set_rate(10.0, 10.0);
        // In debt by about 10 units, now repaid at 10/s.
        let w = b.take(1.0);
        assert!(w > Duration::from_millis(900), "{w:?}");
    }

    #[test]
    fn bucket_paces_after_the_burst() {
        let mut b = Bucket::new(100.0, 10.0);
        assert!(b.take(10.0) > Duration::from_millis(90));
        let w = b.take(10.0);
        assert!(w > Duration::from_millis(150), "{w:?}");
    }
}
