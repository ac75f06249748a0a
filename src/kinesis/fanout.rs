//! Enhanced fan-out (`archiver.read = "fanout"`): the archiver's shard
//! reader built on a registered stream consumer and `SubscribeToShard`,
//! behind the same interface as the polling [`ShardReader`](super::reader::ShardReader)
//! (one [`ReadBatch`] per pushed event), so that the shard task buffers,
//! flushes and commits exactly as it does when polling.
//!
//! ```text
//!   consumer (once per stream and process, shared by the shard tasks):
//!     DescribeStreamSummary ─▶ DescribeStreamConsumer ──found──▶ ACTIVE? ─yes─▶ ARN
//!                                   │ not found                   │ CREATING / DELETING
//!                                   ▼                             ▼
//!                            RegisterStreamConsumer ──────▶ poll every second
//!
//!   one shard:
//!     ┌─▶ SubscribeToShard(position) ── error ──▶ backoff (full jitter) ─┐
//!     │        │ event stream (HTTP/2 on AWS; up to 5 minutes)           │
//!     │        ▼                                                         │
//!     │   event ─▶ ReadBatch ─▶ shard task (budget, buffer, flush)        │
//!     │        │ records: position := AFTER_SEQUENCE_NUMBER of the last   │
//!     │        │ ContinuationSequenceNumber absent + ChildShards: end     │
//!     │        ▼                                                         │
//!     └── stream ends (5 minutes), breaks, or is silent too long ◀───────┘
//! ```
//!
//! The starting position is the one polling would use: AT_SEQUENCE_NUMBER of
//! the checkpointed Kinesis record (user records up to the checkpoint, inside
//! a KPL aggregate, are dropped, and a missing first record is reported as a
//! gap), AFTER_SEQUENCE_NUMBER of the last record read on every
//! re-subscription, else TRIM_HORIZON or AT_TIMESTAMP.
//!
//! The end of a closed shard is the event without a continuation sequence
//! number that names the child shards. Local emulators do not send it
//! (kinesis-mock names no children; ferrokinesis names them but keeps a
//! continuation number, then ends the subscription): a shard that
//! ListShards shows closed and whose subscription delivers an empty event
//! at the tip (`MillisBehindLatest` 0) is finished too — a closed shard
//! takes no more records, so nothing is left to read. An open shard idle at
//! its tip is looked up again at most every `archiver.shard_discovery_interval`,
//! with one ListShards listing shared by the stream's shards.
//!
//! Memory: events are pushed, but an event is only taken from the stream
//! when the shard task asks for the next batch, which it does once it holds
//! the memory for it (`archive::budget`); a larger event is charged as debt.
//! While the budget is exhausted nothing is read from the stream, and HTTP/2
//! flow control holds the server back (at most the connection's receive
//! window is buffered meanwhile).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::{
    ConsumerStatus, ShardIteratorType, StartingPosition, SubscribeToShardEvent,
    SubscribeToShardEventStream,
};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::kinesis::reader::{
    ReadBatch, StartAt, append_records, response_bytes, sleep_unless_cancelled,
};
use crate::kinesis::{Backoff, Client, Failure, classify};
use crate::record::{Position, cmp_sequence};

/// A subscription that has delivered nothing for this long is replaced
/// (Kinesis sends an event at least every few seconds, records or not).
const SILENCE: Duration = Duration::from_secs(60);
/// Kinesis ends a subscription after 5 minutes; one still open well after
/// that is replaced.
const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(5 * 60 + 30);
/// Pause between DescribeStreamConsumer calls while a consumer is created
/// or deleted (the call allows 20 per second and stream).
const CONSUMER_POLL: Duration = Duration::from_secs(1);
/// Payload bytes the shard task reserves memory for before taking the next
/// event: one second of a shard's push rate (2 MiB/s). A larger event is
/// charged as debt when it arrives.
pub const EVENT_PAYLOAD: u64 = 2 * 1024 * 1024;
/// Consecutive failed subscriptions, each ended by an error event that is
/// not transient (access denied, stream gone, …), before the error is final.
const STREAM_ERROR_ATTEMPTS: u32 = 5;
/// Give up registering after this many consecutive failures (e.g. the
/// stream already has its 20 consumers).
const REGISTER_ATTEMPTS: u32 = 30;

type ConsumerCell = Arc<OnceCell<String>>;

/// The closed shards of a stream as last listed, and when.
type ClosedListing = Arc<tokio::sync::Mutex<Option<(Instant, HashSet<String>)>>>;

/// Per stream: the last listing of its closed shards (see
/// [`FanoutReader::shard_closed`]), shared by its shard readers.
static CLOSED: LazyLock<Mutex<HashMap<String, ClosedListing>>> = LazyLock::new(Default::default);

fn closed_listing(stream: &str) -> ClosedListing {
    let mut all = CLOSED.lock().unwrap_or_else(|p| p.into_inner());
    all.entry(stream.to_string()).or_default().clone()
}

/// Consumers found or registered by this process: (stream, name) → ARN.
static CONSUMERS: LazyLock<Mutex<HashMap<(String, String), ConsumerCell>>> =
    LazyLock::new(Default::default);

fn consumer_cell(stream: &str, name: &str) -> ConsumerCell {
    let mut all = CONSUMERS.lock().unwrap_or_else(|p| p.into_inner());
    all.entry((stream.to_string(), name.to_string()))
        .or_default()
        .clone()
}

/// Forget the ARN of a consumer that is gone (deregistered meanwhile).
fn forget_consumer(stream: &str, name: &str) {
    let mut all = CONSUMERS.lock().unwrap_or_else(|p| p.into_inner());
    all.remove(&(stream.to_string(), name.to_string()));
}

/// The ARN of the ACTIVE consumer `name` of `stream`: found if registered
/// already (by an earlier run or another archiver), registered otherwise,
/// and waited for until ACTIVE. Once per stream and process; `Ok(None)` when
/// cancelled.
pub async fn consumer_arn(
    client: &Client,
    stream: &str,
    name: &str,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> Result<Option<String>> {
    let cell = consumer_cell(stream, name);
    let found = tokio::select! {
        r = cell.get_or_try_init(|| ensure_consumer(client, stream, name, max_backoff, cancel)) => r,
        _ = cancel.cancelled() => return Ok(None),
    };
    match found {
        Ok(arn) => Ok(Some(arn.clone())),
        Err(Error::Interrupted) => Ok(None),
        Err(e) => Err(e),
    }
}

fn consumer_error(operation: &'static str, stream: &str, name: &str, m: String) -> Error {
    Error::Kinesis {
        operation,
        stream: stream.into(),
        shard: None,
        message: format!("enhanced fan-out consumer {name:?}: {m}"),
    }
}

/// Back off after a failed consumer call: an error once
/// [`REGISTER_ATTEMPTS`] failed in a row, [`Error::Interrupted`] when cancelled.
async fn consumer_pause(
    backoff: &mut Backoff,
    cancel: &CancellationToken,
    (op, stream, name): (&'static str, &str, &str),
    m: String,
) -> Result<()> {
    if backoff.attempts() >= REGISTER_ATTEMPTS {
        return Err(consumer_error(
            op,
            stream,
            name,
            format!("gave up after {REGISTER_ATTEMPTS} attempts: {m}"),
        ));
    }
    tracing::debug!(stream, consumer = name, "{op}: retrying: {m}");
    if sleep_unless_cancelled(cancel, backoff.next_delay()).await {
        Ok(())
    } else {
        Err(Error::Interrupted)
    }
}

async fn ensure_consumer(
    client: &Client,
    stream: &str,
    name: &str,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> Result<String> {
    let mut backoff = Backoff::new(max_backoff);
    let stream_arn = loop {
        match client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
        {
            Ok(r) => match r.stream_description_summary {
                Some(s) => break s.stream_arn,
                None => {
                    return Err(consumer_error(
                        "DescribeStreamSummary",
                        stream,
                        name,
                        "the answer has no stream description".into(),
                    ));
                }
            },
            Err(e) => match classify(&e) {
                Failure::Retry(m) => {
                    consumer_pause(
                        &mut backoff,
                        cancel,
                        ("DescribeStreamSummary", stream, name),
                        m,
                    )
                    .await?
                }
                other => {
                    return Err(super::stream_error("DescribeStreamSummary", stream, other));
                }
            },
        }
    };
    backoff.reset();
    let mut registered = false;
    let started = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let described = client
            .describe_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await;
        match described {
            Ok(r) => {
                backoff.reset();
                let Some(d) = r.consumer_description else {
                    return Err(consumer_error(
                        "DescribeStreamConsumer",
                        stream,
                        name,
                        "the answer has no consumer description".into(),
                    ));
                };
                match d.consumer_status {
                    ConsumerStatus::Active => {
                        if registered {
                            tracing::info!(stream, consumer = name, arn = %d.consumer_arn, "registered the enhanced fan-out consumer");
                        } else {
                            tracing::debug!(stream, consumer = name, arn = %d.consumer_arn, "using the registered enhanced fan-out consumer");
                        }
                        return Ok(d.consumer_arn);
                    }
                    status => {
                        if started.elapsed() > Duration::from_secs(60)
                            && started.elapsed().as_secs().is_multiple_of(30)
                        {
                            tracing::warn!(
                                stream,
                                consumer = name,
                                ?status,
                                "still waiting for the consumer to be ACTIVE"
                            );
                        }
                        if !sleep_unless_cancelled(cancel, CONSUMER_POLL).await {
                            return Err(Error::Interrupted);
                        }
                    }
                }
            }
            Err(e) if is_code(&e, "ResourceNotFoundException") => {
                let reg = client
                    .register_stream_consumer()
                    .stream_arn(&stream_arn)
                    .consumer_name(name)
                    .send()
                    .await;
                match reg {
                    Ok(_) => registered = true,
                    // Registered meanwhile (another archiver): describe it again.
                    Err(e) if is_code(&e, "ResourceInUseException") => {}
                    Err(e) => match classify(&e) {
                        Failure::Retry(m) => {
                            consumer_pause(
                                &mut backoff,
                                cancel,
                                ("RegisterStreamConsumer", stream, name),
                                m,
                            )
                            .await?
                        }
                        Failure::NotFound(m) | Failure::Fatal(m) => {
                            return Err(consumer_error("RegisterStreamConsumer", stream, name, m));
                        }
                        Failure::ExpiredIterator => {
                            return Err(consumer_error(
                                "RegisterStreamConsumer",
                                stream,
                                name,
                                "unexpected expired iterator".into(),
                            ));
                        }
                    },
                }
            }
            Err(e) => match classify(&e) {
                Failure::Retry(m) => {
                    consumer_pause(
                        &mut backoff,
                        cancel,
                        ("DescribeStreamConsumer", stream, name),
                        m,
                    )
                    .await?
                }
                other => {
                    let m = match other {
                        Failure::NotFound(m) | Failure::Fatal(m) | Failure::Retry(m) => m,
                        Failure::ExpiredIterator => "unexpected expired iterator".into(),
                    };
                    return Err(consumer_error("DescribeStreamConsumer", stream, name, m));
                }
            },
        }
    }
}

/// Whether `err` is the service error `code`.
fn is_code<E, R>(err: &SdkError<E, R>, code: &str) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(err, SdkError::ServiceError(se) if se.err().code() == Some(code))
}

#[derive(Debug)]
struct Subscription {
    /// Its `event_stream` is the open subscription.
    events: aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardOutput,
    since: Instant,
    events_seen: u64,
}

/// What one event means for the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventEnd {
    /// More events follow.
    More,
    /// The shard is closed and fully read (the event names its children).
    EndOfShard,
}

/// The end marker of an event: no continuation sequence number (the SDK
/// reads an absent one as empty) and child shards named.
pub(crate) fn event_end(continuation: &str, children: Option<usize>) -> EventEnd {
    if continuation.is_empty() && children.is_some_and(|n| n > 0) {
        EventEnd::EndOfShard
    } else {
        EventEnd::More
    }
}

/// Whether a pushed Kinesis record with sequence number `seq` is new: after
/// the last record read, and not before the checkpointed record a resume
/// starts at.
pub(crate) fn after_start(seq: &str, last_read: Option<&str>, resume_at: Option<&str>) -> bool {
    use std::cmp::Ordering::{Greater, Less};
    match (last_read, resume_at) {
        (Some(last), _) => cmp_sequence(seq, last) == Greater,
        (None, Some(at)) => cmp_sequence(seq, at) != Less,
        (None, None) => true,
    }
}

/// The starting position of a (re-)subscription, as polling would choose
/// its iterator: after the last record read, at the checkpointed record,
/// or the reader's start.
pub(crate) fn starting_position(
    last_sequence: Option<&str>,
    start_at_sequence: Option<&str>,
    start: &StartAt,
) -> std::result::Result<StartingPosition, String> {
    let b = StartingPosition::builder();
    let b = if let Some(seq) = last_sequence {
        b.r#type(ShardIteratorType::AfterSequenceNumber)
            .sequence_number(seq)
    } else if let Some(seq) = start_at_sequence {
        b.r#type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(seq)
    } else {
        match start {
            StartAt::TrimHorizon => b.r#type(ShardIteratorType::TrimHorizon),
            StartAt::AfterSequence(seq) => b
                .r#type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
            StartAt::AtTimestamp(ms) => b
                .r#type(ShardIteratorType::AtTimestamp)
                .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
        }
    };
    b.build().map_err(|e| e.to_string())
}

/// An enhanced fan-out reader of one shard.
#[derive(Debug)]
pub struct FanoutReader {
    client: Client,
    stream: String,
    shard: Arc<str>,
    consumer_name: String,
    start: StartAt,
    last_sequence: Option<String>,
    skip_through: Option<Position>,
    start_at_sequence: Option<String>,
    expect_first: Option<String>,
    /// ListShards showed the shard closed (see the module doc).
    closed: bool,
    /// When ListShards was last asked whether the shard is closed.
    closed_checked: Option<Instant>,
    closed_check_interval: Duration,
    max_backoff: Duration,
    backoff: Backoff,
    retries: Arc<AtomicU64>,
    subscriptions: Arc<AtomicU64>,
    sub: Option<Box<Subscription>>,
    done: bool,
}

impl FanoutReader {
    /// A reader of `shard` through the consumer `consumer_name` starting at
    /// `start`. `closed`: ListShards shows the shard closed already; an
    /// open one is looked up again at most every `closed_check_interval`
    /// while its subscription is idle at the tip. `retries` counts retried calls.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        stream: &str,
        shard: &str,
        consumer_name: &str,
        start: StartAt,
        closed: bool,
        closed_check_interval: Duration,
        max_backoff: Duration,
        retries: Arc<AtomicU64>,
    ) -> Self {
        FanoutReader {
            client,
            stream: stream.into(),
            shard: shard.into(),
            consumer_name: consumer_name.into(),
            start,
            last_sequence: None,
            skip_through: None,
            start_at_sequence: None,
            expect_first: None,
            closed,
            closed_checked: None,
            closed_check_interval,
            max_backoff,
            backoff: Backoff::new(max_backoff),
            retries,
            subscriptions: Arc::new(AtomicU64::new(0)),
            sub: None,
            done: false,
        }
    }

    /// Resume after `pos` (see [`ShardReader::resume_after`](super::reader::ShardReader::resume_after)).
    pub fn resume_after(mut self, pos: &Position) -> Self {
        self.start_at_sequence = Some(pos.sequence_number.clone());
        self.expect_first = Some(pos.sequence_number.clone());
        self.skip_through = Some(pos.clone());
        self
    }

    /// SubscribeToShard calls made so far.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    fn kerr(&self, op: &'static str, message: String) -> Error {
        Error::Kinesis {
            operation: op,
            stream: self.stream.clone(),
            shard: Some(self.shard.to_string()),
            message,
        }
    }

    /// Back off before the next subscription; false when cancelled.
    async fn pause(&mut self, cancel: &CancellationToken, why: &str) -> bool {
        self.retries.fetch_add(1, Ordering::Relaxed);
        let d = self.backoff.next_delay();
        tracing::debug!(stream = %self.stream, shard = %self.shard, ?d, "re-subscribing after: {why}");
        if self.backoff.attempts().is_multiple_of(20) {
            tracing::warn!(stream = %self.stream, shard = %self.shard, attempts = self.backoff.attempts(), "still failing to subscribe: {why}");
        }
        sleep_unless_cancelled(cancel, d).await
    }

    /// Subscribe from the current position; `Ok(false)` when cancelled.
    async fn subscribe(&mut self, cancel: &CancellationToken) -> Result<bool> {
        loop {
            let Some(arn) = consumer_arn(
                &self.client,
                &self.stream,
                &self.consumer_name,
                self.max_backoff,
                cancel,
            )
            .await?
            else {
                return Ok(false);
            };
            let position = starting_position(
                self.last_sequence.as_deref(),
                self.start_at_sequence.as_deref(),
                &self.start,
            )
            .map_err(|m| self.kerr("SubscribeToShard", m))?;
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
            let sent = tokio::select! {
                r = self
                    .client
                    .subscribe_to_shard()
                    .consumer_arn(&arn)
                    .shard_id(self.shard.as_ref())
                    .starting_position(position)
                    .send() => r,
                _ = cancel.cancelled() => return Ok(false),
            };
            match sent {
                Ok(out) => {
                    tracing::debug!(stream = %self.stream, shard = %self.shard, position = ?self.last_sequence.as_ref().or(self.start_at_sequence.as_ref()), "subscribed");
                    self.sub = Some(Box::new(Subscription {
                        events: out,
                        since: Instant::now(),
                        events_seen: 0,
                    }));
                    return Ok(true);
                }
                // The previous subscription of this consumer to the shard is
                // still active (Kinesis allows one, and a new one 5 s later).
                Err(e) if is_code(&e, "ResourceInUseException") => {
                    if !self.pause(cancel, "ResourceInUseException").await {
                        return Ok(false);
                    }
                }
                Err(e) => match classify(&e) {
                    Failure::Retry(m) => {
                        if !self.pause(cancel, &m).await {
                            return Ok(false);
                        }
                    }
                    Failure::NotFound(m) if m.contains("consumer") || m.contains("Consumer") => {
                        // Deregistered meanwhile: find or register it again.
                        tracing::warn!(stream = %self.stream, shard = %self.shard, "the enhanced fan-out consumer is gone ({m}); registering it again");
                        forget_consumer(&self.stream, &self.consumer_name);
                        if !self.pause(cancel, &m).await {
                            return Ok(false);
                        }
                    }
                    Failure::NotFound(m) if self.start_at_sequence.is_some() => {
                        return Err(self.kerr(
                            "SubscribeToShard",
                            super::reader::checkpointed_record_missing(&m),
                        ));
                    }
                    Failure::NotFound(m) | Failure::Fatal(m) => {
                        return Err(self.kerr("SubscribeToShard", m));
                    }
                    Failure::ExpiredIterator => {
                        return Err(
                            self.kerr("SubscribeToShard", "unexpected expired iterator".into())
                        );
                    }
                },
            }
        }
    }

    /// Whether ListShards shows the shard closed (looked up at most every
    /// `closed_check_interval`, one listing shared by the stream's shards;
    /// a failed lookup says "not yet").
    async fn shard_closed(&mut self) -> bool {
        if self.closed {
            return true;
        }
        if self
            .closed_checked
            .is_some_and(|t| t.elapsed() < self.closed_check_interval)
        {
            return false;
        }
        self.closed_checked = Some(Instant::now());
        let cell = closed_listing(&self.stream);
        let mut listing = cell.lock().await;
        let fresh = listing
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.closed_check_interval);
        if !fresh {
            match super::shards::list_shards(&self.client, &self.stream, self.max_backoff).await {
                Ok(shards) => {
                    let closed = shards
                        .into_iter()
                        .filter(|s| s.closed)
                        .map(|s| s.shard_id)
                        .collect();
                    *listing = Some((Instant::now(), closed));
                }
                Err(e) => {
                    tracing::debug!(stream = %self.stream, shard = %self.shard, "ListShards failed: {e}");
                }
            }
        }
        self.closed = listing
            .as_ref()
            .is_some_and(|(_, closed)| closed.contains(self.shard.as_ref()));
        self.closed
    }

    /// The next event as a batch; `Ok(None)` when cancelled or after the
    /// end of the shard.
    pub async fn next(&mut self, cancel: &CancellationToken) -> Result<Option<ReadBatch>> {
        loop {
            if self.done || cancel.is_cancelled() {
                return Ok(None);
            }
            if self
                .sub
                .as_ref()
                .is_some_and(|s| s.since.elapsed() >= SUBSCRIPTION_LIFETIME)
            {
                tracing::debug!(stream = %self.stream, shard = %self.shard, "subscription older than 5 minutes: replacing it");
                self.sub = None;
            }
            if self.sub.is_none() && !self.subscribe(cancel).await? {
                return Ok(None);
            }
            let Some(sub) = self.sub.as_mut() else {
                continue;
            };
            let got = tokio::select! {
                r = tokio::time::timeout(SILENCE, sub.events.event_stream.recv()) => r,
                _ = cancel.cancelled() => return Ok(None),
            };
            match got {
                Err(_) => {
                    let why = format!("no event for {}s", SILENCE.as_secs());
                    self.sub = None;
                    if !self.pause(cancel, &why).await {
                        return Ok(None);
                    }
                }
                Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(ev)))) => {
                    sub.events_seen += 1;
                    self.backoff.reset();
                    return self.batch(ev).await.map(Some);
                }
                Ok(Ok(Some(other))) => {
                    tracing::debug!(stream = %self.stream, shard = %self.shard, "ignoring an unknown event: {other:?}");
                }
                Ok(Ok(None)) => {
                    // The subscription ended (after 5 minutes): subscribe
                    // again at once from the last record; one that ended
                    // before its first event counts as a failure.
                    let empty = sub.events_seen == 0;
                    self.sub = None;
                    if empty
                        && !self
                            .pause(cancel, "the subscription ended without an event")
                            .await
                    {
                        return Ok(None);
                    }
                }
                Ok(Err(e)) => {
                    // An error event or a broken stream: subscribe again; an
                    // error that retrying does not cure ends the shard's task
                    // after a few attempts.
                    let why = match classify(&e) {
                        Failure::Retry(m) => m,
                        Failure::Fatal(m) if is_code(&e, "ResourceInUseException") => m,
                        Failure::Fatal(m) | Failure::NotFound(m) => {
                            if self.backoff.attempts() >= STREAM_ERROR_ATTEMPTS {
                                return Err(self.kerr("SubscribeToShard", m));
                            }
                            m
                        }
                        Failure::ExpiredIterator => "expired".into(),
                    };
                    self.sub = None;
                    if !self.pause(cancel, &why).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// One event as a batch, exactly as polling builds one from a response.
    async fn batch(&mut self, mut ev: SubscribeToShardEvent) -> Result<ReadBatch> {
        let (response_bytes, largest_record) = response_bytes(&ev.records);
        let end = event_end(
            &ev.continuation_sequence_number,
            ev.child_shards.as_ref().map(Vec::len),
        );
        // Records before the starting position are never taken (a server
        // that ignores the position re-sends them: ferrokinesis does).
        let before = ev.records.len();
        ev.records.retain(|r| {
            after_start(
                &r.sequence_number,
                self.last_sequence.as_deref(),
                self.expect_first.as_deref(),
            )
        });
        if ev.records.len() < before {
            tracing::debug!(stream = %self.stream, shard = %self.shard, dropped = before - ev.records.len(), "dropped records before the subscription's starting position");
        }
        let mut batch = ReadBatch {
            millis_behind: Some(ev.millis_behind_latest),
            kinesis_records: ev.records.len(),
            response_bytes,
            largest_record,
            ..Default::default()
        };
        crate::kinesis::reader::note_expired(
            &self.stream,
            &self.shard,
            &mut self.expect_first,
            ev.records.first(),
            &mut batch,
        );
        append_records(&self.shard, ev.records, &mut batch, &mut self.last_sequence);
        if let Some(skip) = &self.skip_through {
            batch.records.retain(|r| r.position() > *skip);
            batch.bytes = batch.records.iter().map(|r| r.data.len()).sum();
            if self.last_sequence.is_some() {
                self.skip_through = None;
            }
        }
        let at_tip = batch.kinesis_records == 0 && ev.millis_behind_latest == 0;
        if end == EventEnd::EndOfShard || (at_tip && self.shard_closed().await) {
            tracing::debug!(stream = %self.stream, shard = %self.shard, children = ?ev.child_shards.as_ref().map(|c| c.iter().map(|c| c.shard_id.clone()).collect::<Vec<_>>()), "end of the shard");
            self.done = true;
            self.sub = None;
            batch.end_of_shard = true;
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_needs_no_continuation_and_children() {
        assert_eq!(event_end("", Some(2)), EventEnd::EndOfShard);
        assert_eq!(event_end("", Some(1)), EventEnd::EndOfShard);
        // ferrokinesis names an empty list of children on every event.
        assert_eq!(event_end("4960", Some(0)), EventEnd::More);
        assert_eq!(event_end("4960", None), EventEnd::More);
        assert_eq!(event_end("4960", Some(2)), EventEnd::More);
        // ferrokinesis on a closed shard: children, but a continuation
        // (its end comes from the ListShards fallback).
        assert_eq!(event_end("4960", Some(1)), EventEnd::More);
        // No continuation but no children either: not an end we trust.
        assert_eq!(event_end("", None), EventEnd::More);
        assert_eq!(event_end("", Some(0)), EventEnd::More);
    }

    #[test]
    fn records_before_the_start_are_not_new() {
        // Re-subscribed after "20": only later records.
        assert!(!after_start("19", Some("20"), None));
        assert!(!after_start("20", Some("20"), None));
        assert!(after_start("21", Some("20"), None));
        assert!(after_start("100", Some("99"), Some("5")));
        // Resuming at the checkpointed "20": it and later ones.
        assert!(!after_start("19", None, Some("20")));
        assert!(after_start("20", None, Some("20")));
        assert!(after_start("0021", None, Some("20")));
        assert!(after_start("1", None, None));
    }

    #[test]
    fn positions_follow_polling() {
        let p = starting_position(Some("9"), Some("5"), &StartAt::TrimHorizon).unwrap();
        assert_eq!(p.r#type, ShardIteratorType::AfterSequenceNumber);
        assert_eq!(p.sequence_number.as_deref(), Some("9"));
        let p = starting_position(None, Some("5"), &StartAt::TrimHorizon).unwrap();
        assert_eq!(p.r#type, ShardIteratorType::AtSequenceNumber);
        assert_eq!(p.sequence_number.as_deref(), Some("5"));
        let p = starting_position(None, None, &StartAt::TrimHorizon).unwrap();
        assert_eq!(p.r#type, ShardIteratorType::TrimHorizon);
        assert_eq!(p.sequence_number, None);
        let p = starting_position(None, None, &StartAt::AtTimestamp(1_700_000_000_000)).unwrap();
        assert_eq!(p.r#type, ShardIteratorType::AtTimestamp);
        assert_eq!(
            p.timestamp.and_then(|t| t.to_millis().ok()),
            Some(1_700_000_000_000)
        );
        let p = starting_position(None, None, &StartAt::AfterSequence("7".into())).unwrap();
        assert_eq!(p.r#type, ShardIteratorType::AfterSequenceNumber);
        assert_eq!(p.sequence_number.as_deref(), Some("7"));
    }
}
