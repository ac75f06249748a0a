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
//!                  │                ▼   and the global --rate bucket
//!                  └── failed ── PutRecords ── ok ─▶ ack(idx)
//! ```
//!
//! A batch holds at most one record of each partition key, and a key's next
//! record is only taken once its previous one is acknowledged: when an entry
//! fails (throttled) and the rest succeed, no later record of the same key
//! can overtake it. Failed entries stay at their place in `pending` and are
//! retried with exponential backoff and jitter.

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
    /// Consecutive failed attempts of one batch before the writer gives up.
    pub max_attempts: u32,
    /// Longest backoff.
    pub max_backoff: Duration,
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
}

/// A target shard's hash key range.
#[derive(Debug, Clone)]
pub struct TargetShard {
    /// Shard id.
    pub shard_id: String,
    start: u128,
    end: u128,
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
        let h = explicit_hash_key
            .and_then(|k| k.parse::<u128>().ok())
            .unwrap_or_else(|| hash_key(partition_key));
        self.shards
            .iter()
            .position(|s| s.start <= h && h <= s.end)
            .unwrap_or(0)
    }
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

impl Sender {
    fn limits(&self) -> (usize, usize) {
        let s = &self.settings;
        let recs = if s.shard_records_per_sec > 0 {
            (s.shard_records_per_sec as usize / 4).clamp(1, MAX_BATCH_RECORDS)
        } else {
            MAX_BATCH_RECORDS
        };
        let bytes = if s.shard_bytes_per_sec > 0 {
            (s.shard_bytes_per_sec as usize / 4).clamp(1024 * 1024 + 256, MAX_BATCH_BYTES)
        } else {
            MAX_BATCH_BYTES
        };
        (recs, bytes)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<OutRecord>) -> Result<ShardStats> {
        let (max_recs, max_bytes) = self.limits();
        let mut rec_bucket = (self.settings.shard_records_per_sec > 0).then(|| {
            let r = f64::from(self.settings.shard_records_per_sec);
            Bucket::new(r, max_recs as f64)
        });
        let mut byte_bucket = (self.settings.shard_bytes_per_sec > 0).then(|| {
            let r = self.settings.shard_bytes_per_sec as f64;
            Bucket::new(r, max_bytes as f64)
        });
        let mut pending: VecDeque<OutRecord> = VecDeque::new();
        let mut closed = false;
        let mut backoff = Backoff::new(self.settings.max_backoff);
        let high_water = 4 * MAX_BATCH_RECORDS;
        loop {
            // Fill: block only when nothing is pending.
            while !closed && pending.len() < high_water {
                if pending.is_empty() {
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(Error::Interrupted),
                        r = rx.recv() => match r {
                            Some(r) => pending.push_back(r),
                            None => closed = true,
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(r) => pending.push_back(r),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                    }
                }
            }
            if pending.is_empty() && closed {
                return Ok(self.stats);
            }
            // One record per key, in order; a key whose earlier record is
            // not taken is blocked for the rest of this batch.
            let mut keys: HashSet<&str> = HashSet::new();
            let mut picked = Vec::new();
            let mut bytes = 0usize;
            for (i, r) in pending.iter().enumerate() {
                if picked.len() >= max_recs {
                    break;
                }
                if !keys.insert(r.partition_key.as_str()) {
                    continue;
                }
                let sz = r.size();
                if !picked.is_empty() && bytes + sz > max_bytes {
                    // Too big for this batch: later records of this key wait too.
                    continue;
                }
                bytes += sz;
                picked.push(i);
            }
            // Pace.
            let mut wait = Duration::ZERO;
            if let Some(b) = rec_bucket.as_mut() {
                wait = wait.max(b.take(picked.len() as f64));
            }
            if let Some(b) = byte_bucket.as_mut() {
                wait = wait.max(b.take(bytes as f64));
            }
            if let Some(g) = &self.global {
                wait = wait.max(g.lock().await.take(picked.len() as f64));
            }
            if !wait.is_zero() {
                tokio::select! {
                    _ = self.cancel.cancelled() => return Err(Error::Interrupted),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let entries: Vec<PutRecordsRequestEntry> = picked
                .iter()
                .filter_map(|&i| {
                    let r = &pending[i];
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
            let failed_entries: Vec<bool> = match resp {
                Ok(out) => {
                    let res = out.records();
                    picked
                        .iter()
                        .enumerate()
                        .map(|(j, _)| {
                            let e = res.get(j);
                            let code = e.and_then(|e| e.error_code());
                            match code {
                                None if e.is_some() => false,
                                None => true,
                                Some(c) => {
                                    if c == "ProvisionedThroughputExceededException" {
                                        self.stats.throttled += 1;
                                    } else {
                                        tracing::debug!(
                                            stream = %self.stream,
                                            "PutRecords entry failed: {c}: {}",
                                            e.and_then(|e| e.error_message()).unwrap_or("")
                                        );
                                    }
                                    true
                                }
                            }
                        })
                        .collect()
                }
                Err(e) => match classify(&e) {
                    Failure::Retry(m) => {
                        tracing::debug!(stream = %self.stream, "PutRecords retry: {m}");
                        vec![true; picked.len()]
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
                    Failure::ExpiredIterator => vec![true; picked.len()],
                },
            };
            let any_failed = failed_entries.iter().any(|f| *f);
            // Remove the acknowledged records, keeping the failed ones in place.
            let mut done = vec![false; pending.len()];
            for (j, &i) in picked.iter().enumerate() {
                if !failed_entries[j] {
                    done[i] = true;
                    let r = &pending[i];
                    self.stats.records += 1;
                    self.stats.bytes += r.size() as u64;
                    let _ = self.acks.send(Ack {
                        idx: r.idx,
                        shard: self.shard,
                        bytes: r.size(),
                    });
                }
            }
            let mut k = 0;
            pending.retain(|_| {
                k += 1;
                !done[k - 1]
            });
            if any_failed {
                if backoff.attempts() >= self.settings.max_attempts {
                    return Err(Error::Kinesis {
                        operation: "PutRecords",
                        stream: self.stream.clone(),
                        shard: Some(self.stats.shard_id.clone()),
                        message: format!(
                            "records still refused after {} attempts (throttled {} entries so far)",
                            backoff.attempts(),
                            self.stats.throttled
                        ),
                    });
                }
                let d = backoff.next_delay();
                tokio::select! {
                    _ = self.cancel.cancelled() => return Err(Error::Interrupted),
                    _ = tokio::time::sleep(d) => {}
                }
            } else {
                backoff.reset();
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
    fn bucket_paces_after_the_burst() {
        let mut b = Bucket::new(100.0, 10.0);
        assert!(b.take(10.0) > Duration::from_millis(90));
        let w = b.take(10.0);
        assert!(w > Duration::from_millis(150), "{w:?}");
    }
}
