//! Reads one shard with GetRecords, turning Kinesis records into user records
//! (KPL aggregates expanded), and surviving throttling, transient faults and
//! expired iterators without ever skipping or re-reading a record.
//!
//! Query-time readers are *paced* ([`ShardReader::paced`]): each GetRecords
//! call waits for the shard's [`ShardPacer`] (a share of the shard's read
//! limits, shared with every other query-time reader of the shard), and a
//! throttled call backs off with jitter without counting as a failed attempt
//! towards [`ShardReader::give_up_after`]. The archiver's reader is paced too, to
//! its own share (`archiver.max_reads_per_second`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::kinesis::kpl::deaggregate;
use crate::kinesis::pace::ShardPacer;
use crate::kinesis::{Backoff, Client, Failure, classify, is_throttling};
use crate::record::{Position, Record};

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record in the shard.
    TrimHorizon,
    /// Just after the Kinesis record with this sequence number.
    AfterSequence(String),
    /// The first record that arrived at or after this time (epoch ms).
    AtTimestamp(i64),
}

/// One GetRecords response, de-aggregated.
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// User records, in shard order.
    pub records: Vec<Record>,
    /// Kinesis records in the response.
    pub kinesis_records: usize,
    /// Payload bytes of the user records.
    pub bytes: usize,
    /// Bytes of the Kinesis records in the response (data and partition keys).
    pub response_bytes: usize,
    /// Bytes of the largest Kinesis record in the response (data and partition key).
    pub largest_record: usize,
    /// How far the reader is behind the tip of the shard.
    pub millis_behind: Option<i64>,
    /// The shard is closed and this was its last response.
    pub end_of_shard: bool,
    /// Set on the first records after a resume when the resume record itself
    /// was not returned first: records between it and this (the first Kinesis
    /// record returned) left the stream's retention unread.
    pub gap_before: Option<Position>,
}

/// A polling reader of one shard.
#[derive(Debug)]
pub struct ShardReader {
    client: Client,
    stream: String,
    shard: Arc<str>,
    start: StartAt,
    iterator: Option<String>,
    /// Sequence number of the last Kinesis record returned; a new iterator
    /// starts after it.
    last_sequence: Option<String>,
    /// Records at or before this position are dropped (resuming inside a KPL aggregate).
    skip_through: Option<Position>,
    /// Start at (not after) this Kinesis record when there is no `last_sequence`.
    start_at_sequence: Option<String>,
    /// The Kinesis record a resume starts at, until the first records arrive:
    /// it must be the first one returned, or the records after it expired.
    expect_first: Option<String>,
    limit: i32,
    backoff: Backoff,
    retries: Arc<AtomicU64>,
    /// Give up after this many consecutive failed calls (`None`: never, as the
    /// archiver does; a query prefers an error to waiting for ever).
    max_attempts: Option<u32>,
    /// Paces GetRecords to a share of the shard's limits (query-time reads).
    pacer: Option<ShardPacer>,
    /// Backoff of throttled calls of a paced reader (not counted as failures).
    throttle: Backoff,
    done: bool,
}

impl ShardReader {
    /// A reader of `shard` starting at `start`. `retries` counts retried calls.
    pub fn new(
        client: Client,
        stream: &str,
        shard: &str,
        start: StartAt,
        limit: i32,
        max_backoff: Duration,
        retries: Arc<AtomicU64>,
    ) -> Self {
        ShardReader {
            client,
            stream: stream.into(),
            shard: shard.into(),
            start,
            iterator: None,
            last_sequence: None,
            skip_through: None,
            start_at_sequence: None,
            expect_first: None,
            limit,
            backoff: Backoff::new(max_backoff),
            retries,
            max_attempts: None,
            pacer: None,
            throttle: Backoff::new(max_backoff),
            done: false,
        }
    }

    /// Fail instead of retrying once `attempts` consecutive calls have failed.
    pub fn give_up_after(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Pace GetRecords calls with `pacer`, and retry throttled calls (of
    /// GetRecords and GetShardIterator) with backoff without counting them
    /// towards [`Self::give_up_after`]: a busy shard is waited for, not an error.
    pub fn paced(mut self, pacer: ShardPacer) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// Ask for at most `limit` records per call from now on (1..=10000).
    pub fn set_limit(&mut self, limit: i32) {
        self.limit = limit.clamp(1, 10_000);
    }

    /// Resume after `pos`: start at its Kinesis record and drop user records
    /// up to and including `pos` (so a position inside a KPL aggregate works).
    pub fn resume_after(mut self, pos: &Position) -> Self {
        self.start_at_sequence = Some(pos.sequence_number.clone());
        self.expect_first = Some(pos.sequence_number.clone());
        self.skip_through = Some(pos.clone());
        self
    }

    fn kerr(&self, op: &'static str, message: String) -> Error {
        Error::Kinesis {
            operation: op,
            stream: self.stream.clone(),
            shard: Some(self.shard.to_string()),
            message,
        }
    }

    /// Sleep for the next backoff delay; false when cancelled, an error once
    /// the attempts allowed by [`Self::give_up_after`] are used up.
    async fn pause(&mut self, cancel: &CancellationToken, why: &str) -> Result<bool> {
        if let Some(max) = self.max_attempts
            && self.backoff.attempts() >= max
        {
            return Err(self.kerr("GetRecords", format!("gave up after {max} attempts: {why}")));
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        let d = self.backoff.next_delay();
        tracing::debug!(stream = %self.stream, shard = %self.shard, ?d, "retrying: {why}");
        if self.backoff.attempts().is_multiple_of(20) {
            tracing::warn!(stream = %self.stream, shard = %self.shard, attempts = self.backoff.attempts(), "still retrying: {why}");
        }
        Ok(tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        })
    }

    /// The next throttling backoff delay of a paced reader (exponential,
    /// full jitter); throttled calls are retried without limit.
    fn throttle_delay(&mut self, why: &str) -> Duration {
        self.retries.fetch_add(1, Ordering::Relaxed);
        let d = self.throttle.next_delay();
        tracing::debug!(stream = %self.stream, shard = %self.shard, ?d, "throttled, backing off: {why}");
        if self.throttle.attempts().is_multiple_of(20) {
            tracing::warn!(stream = %self.stream, shard = %self.shard, attempts = self.throttle.attempts(), "still throttled: {why}");
        }
        d
    }

    async fn new_iterator(&mut self, cancel: &CancellationToken) -> Result<Option<String>> {
        loop {
            let mut req = self
                .client
                .get_shard_iterator()
                .stream_name(&self.stream)
                .shard_id(self.shard.as_ref());
            req = if let Some(seq) = &self.last_sequence {
                req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(seq)
            } else if let Some(seq) = &self.start_at_sequence {
                req.shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                    .starting_sequence_number(seq)
            } else {
                match &self.start {
                    StartAt::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
                    StartAt::AfterSequence(seq) => req
                        .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                        .starting_sequence_number(seq),
                    StartAt::AtTimestamp(ms) => req
                        .shard_iterator_type(ShardIteratorType::AtTimestamp)
                        .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
                }
            };
            match req.send().await {
                Ok(r) => {
                    self.backoff.reset();
                    self.throttle.reset();
                    return Ok(r.shard_iterator);
                }
                Err(e) if self.pacer.is_some() && is_throttling(&e) => {
                    let d = self.throttle_delay(&format!("GetShardIterator: {:?}", classify(&e)));
                    if !sleep_unless_cancelled(cancel, d).await {
                        return Ok(None);
                    }
                }
                Err(e) => match classify(&e) {
                    Failure::Retry(m) => {
                        if !self.pause(cancel, &m).await? {
                            return Ok(None);
                        }
                    }
                    Failure::NotFound(m)
                        if self.last_sequence.is_some() || self.start_at_sequence.is_some() =>
                    {
                        return Err(self.kerr("GetShardIterator", checkpointed_record_missing(&m)));
                    }
                    Failure::NotFound(m) | Failure::Fatal(m) => {
                        return Err(self.kerr("GetShardIterator", m));
                    }
                    Failure::ExpiredIterator => {
                        return Err(self.kerr("GetShardIterator", "expired".into()));
                    }
                },
            }
        }
    }

    /// The next batch; `Ok(None)` when cancelled or after the end of the shard.
    pub async fn next(&mut self, cancel: &CancellationToken) -> Result<Option<ReadBatch>> {
        if self.done {
            return Ok(None);
        }
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let it = match self.iterator.take() {
                Some(it) => it,
                None => match self.new_iterator(cancel).await? {
                    Some(it) => it,
                    None if cancel.is_cancelled() => return Ok(None),
                    None => {
                        // No iterator: the shard is closed and fully read.
                        self.done = true;
                        return Ok(Some(ReadBatch {
                            end_of_shard: true,
                            ..Default::default()
                        }));
                    }
                },
            };
            let permit = match &self.pacer {
                Some(p) => tokio::select! {
                    _ = cancel.cancelled() => {
                        self.iterator = Some(it);
                        return Ok(None);
                    }
                    permit = p.acquire() => Some(permit),
                },
                None => None,
            };
            let resp = match self
                .client
                .get_records()
                .shard_iterator(&it)
                .limit(self.limit)
                .send()
                .await
            {
                Ok(r) => {
                    if let Some(p) = permit {
                        p.finish(response_bytes(&r.records).0 as u64);
                    }
                    r
                }
                Err(e) if is_throttling(&e) && permit.is_some() => {
                    // The shard is busy: wait (every reader of the shard in
                    // this process too), keep the iterator, and do not count
                    // it as a failure.
                    self.iterator = Some(it);
                    let d = self.throttle_delay(&format!("GetRecords: {:?}", classify(&e)));
                    if let Some(p) = permit {
                        p.throttled(d);
                    }
                    if !sleep_unless_cancelled(cancel, d).await {
                        return Ok(None);
                    }
                    continue;
                }
                Err(e) => {
                    drop(permit);
                    match classify(&e) {
                        Failure::ExpiredIterator => {
                            tracing::info!(stream = %self.stream, shard = %self.shard, "shard iterator expired; getting a new one after the last record");
                            self.iterator = None;
                        }
                        Failure::Retry(m) => {
                            // Keep the same iterator: it is still valid for 5 minutes,
                            // and an expired one is replaced above.
                            self.iterator = Some(it);
                            if !self.pause(cancel, &m).await? {
                                return Ok(None);
                            }
                        }
                        Failure::NotFound(m) | Failure::Fatal(m) => {
                            return Err(self.kerr("GetRecords", m));
                        }
                    }
                    continue;
                }
            };
            self.backoff.reset();
            self.throttle.reset();
            let (response_bytes, largest_record) = response_bytes(&resp.records);
            let mut batch = ReadBatch {
                millis_behind: resp.millis_behind_latest,
                kinesis_records: resp.records.len(),
                response_bytes,
                largest_record,
                ..Default::default()
            };
            note_expired(
                &self.stream,
                &self.shard,
                &mut self.expect_first,
                resp.records.first(),
                &mut batch,
            );
            append_records(
                &self.shard,
                resp.records,
                &mut batch,
                &mut self.last_sequence,
            );
            if let Some(skip) = &self.skip_through {
                batch.records.retain(|r| r.position() > *skip);
                batch.bytes = batch.records.iter().map(|r| r.data.len()).sum();
                if self.last_sequence.is_some() {
                    self.skip_through = None;
                }
            }
            match resp.next_shard_iterator {
                Some(next) => self.iterator = Some(next),
                None => {
                    self.done = true;
                    batch.end_of_shard = true;
                }
            }
            return Ok(Some(batch));
        }
    }
}

/// The archiver's reader of one shard (`archiver.read`): GetRecords polling
/// or enhanced fan-out, behind one interface.
#[derive(Debug)]
pub enum Reader {
    /// GetShardIterator and GetRecords.
    Polling(ShardReader),
    /// A registered consumer and SubscribeToShard.
    Fanout(crate::kinesis::fanout::FanoutReader),
}

impl Reader {
    /// The next batch (a GetRecords response or a pushed event); `Ok(None)`
    /// when cancelled or after the end of the shard.
    pub async fn next(&mut self, cancel: &CancellationToken) -> Result<Option<ReadBatch>> {
        match self {
            Reader::Polling(r) => r.next(cancel).await,
            Reader::Fanout(r) => r.next(cancel).await,
        }
    }

    /// Records asked for per GetRecords call (events have no limit).
    pub fn set_limit(&mut self, limit: i32) {
        if let Reader::Polling(r) = self {
            r.set_limit(limit);
        }
    }

    /// Whether the reader makes GetRecords calls (to be paced); events are pushed.
    pub fn polls(&self) -> bool {
        matches!(self, Reader::Polling(_))
    }
}

/// Turn Kinesis records into user records (KPL aggregates expanded) at the
/// end of `batch`, counting their payload bytes; `last_sequence` becomes the
/// sequence number of the last Kinesis record.
pub(crate) fn append_records(
    shard: &Arc<str>,
    records: Vec<aws_sdk_kinesis::types::Record>,
    batch: &mut ReadBatch,
    last_sequence: &mut Option<String>,
) {
    for r in records {
        let seq: Arc<str> = r.sequence_number.as_str().into();
        let arrival_ms = r
            .approximate_arrival_timestamp
            .and_then(|t| t.to_millis().ok())
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        let data = Bytes::from(r.data.into_inner());
        *last_sequence = Some(r.sequence_number.clone());
        match deaggregate(&data) {
            Some(users) => {
                for (i, u) in users.into_iter().enumerate() {
                    batch.bytes += u.data.len();
                    batch.records.push(Record {
                        shard_id: shard.clone(),
                        sequence_number: seq.clone(),
                        subsequence_number: i as i64,
                        partition_key: u.partition_key,
                        explicit_hash_key: u.explicit_hash_key,
                        arrival_ms,
                        data: u.data,
                    });
                }
            }
            None => {
                batch.bytes += data.len();
                batch.records.push(Record {
                    shard_id: shard.clone(),
                    sequence_number: seq,
                    subsequence_number: 0,
                    partition_key: r.partition_key,
                    explicit_hash_key: None,
                    arrival_ms,
                    data,
                });
            }
        }
    }
}

/// Bytes of Kinesis records (data and partition keys): in all, and of the largest.
pub(crate) fn response_bytes(records: &[aws_sdk_kinesis::types::Record]) -> (usize, usize) {
    records
        .iter()
        .map(|k| k.data.as_ref().len() + k.partition_key.len())
        .fold((0, 0), |(sum, max), n| (sum + n, max.max(n)))
}

/// Sleep `d`; false when cancelled first.
pub(crate) async fn sleep_unless_cancelled(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// When a read resumed at the checkpointed record `expect_first`: if the
/// first record read is another one, the records between expired unread —
/// recorded as a gap before `first` (polling and fan-out alike).
pub(crate) fn note_expired(
    stream: &str,
    shard: &str,
    expect_first: &mut Option<String>,
    first: Option<&aws_sdk_kinesis::types::Record>,
    batch: &mut ReadBatch,
) {
    if let (Some(expected), Some(first)) = (expect_first.as_ref(), first) {
        if first.sequence_number != *expected {
            tracing::warn!(
                %stream,
                %shard,
                "the checkpointed record {expected} is no longer in the stream: records after it up to {} expired unread",
                first.sequence_number
            );
            batch.gap_before = Some(Position::new(first.sequence_number.clone(), 0));
        }
        *expect_first = None;
    }
}

/// The message of a "not found" for a shard whose checkpointed record the
/// reader starts after (polling and enhanced fan-out alike).
pub(crate) fn checkpointed_record_missing(m: &str) -> String {
    format!(
        "{m} — the checkpointed record is not in the stream: was the stream deleted and \
         re-created under the same name? (then archive it to a new location)"
    )
}
