//! `live.<stream>`: the records in the stream that are not archived yet, read
//! from Kinesis at query time — from each shard's committed position (or the
//! trim horizon when nothing is archived) up to the shard's tip as of the scan.
//!
//! One partition per shard, read with the archiver's own [`ShardReader`] (so
//! KPL aggregates are expanded the same way). A lower arrival-time bound
//! starts the read with `AT_TIMESTAMP` when that skips records; closed shards
//! that are completely archived are not read at all. A shard's read ends at
//! the first response that shows the tip (no records, nothing behind), at the
//! end of a closed shard, or at the first record that arrived after the scan
//! started; records that arrived after the scan started are left out, so a
//! query sees the stream as of its start (by Kinesis arrival time).
//!
//! Reads are paced to `query.live_read_share` of each shard's read limits
//! ([`crate::kinesis::pace`]), so that a query leaves the archiver and the
//! stream's other consumers their share; throttled calls are waited for.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use datafusion::common::Result as DfResult;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;

use crate::kinesis::pace::{ReadLimits, shard_pacer};
use crate::kinesis::reader::{ShardReader, StartAt};
use crate::query::bounds::{ShardRange, TimeRange};
use crate::query::df_err;
use crate::query::snapshot::Snapshot;
use crate::query::view::View;
use crate::record::{self, Position, RecordBatchBuilder};

/// A record arriving this long after the upper time bound ends a shard's read
/// (arrival times within a shard are close to monotonic, not exactly).
const PAST_END_SLACK_MS: i64 = 5 * 60 * 1000;

/// How the live side reads Kinesis.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// Records per GetRecords call.
    pub limit: i32,
    /// Longest backoff between retries.
    pub max_backoff: Duration,
    /// Consecutive failed calls before the query fails (throttled calls
    /// are not counted).
    pub attempts: u32,
    /// Share of each shard's read limits the reads may use
    /// (`query.live_read_share`).
    pub read_share: f64,
}

/// `live.<stream>`.
#[derive(Debug)]
pub struct LiveTable {
    client: crate::kinesis::Client,
    stream: String,
    settings: LiveSettings,
}

impl LiveTable {
    /// The live table of `stream`.
    pub fn new(client: crate::kinesis::Client, stream: &str, settings: LiveSettings) -> Self {
        LiveTable {
            client,
            stream: stream.to_string(),
            settings,
        }
    }

    /// The scan plan, reading each shard after its position in `snapshot`,
    /// up to the horizon of `view` (and sharing its live reads).
    pub async fn scan_at(
        &self,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
        snapshot: &Snapshot,
        view: &Arc<View>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = record::table_schema();
        let empty = || -> DfResult<Arc<dyn ExecutionPlan>> {
            let s = match projection {
                Some(p) => Arc::new(schema.project(p)?),
                None => schema.clone(),
            };
            Ok(Arc::new(EmptyExec::new(s)))
        };
        let range = TimeRange::from_filters(filters);
        let started_ms = view.as_of_ms;
        // Records arriving after the scan starts are past the horizon (and
        // Kinesis refuses AT_TIMESTAMP in the future).
        if range.is_empty() || range.start_ms.is_some_and(|t| t > started_ms) {
            return empty();
        }
        let shards = match view
            .shards(&self.client, &self.stream, self.settings.max_backoff)
            .await
            .map_err(df_err)?
        {
            Some(s) => s,
            None => {
                tracing::warn!(
                    stream = %self.stream,
                    "the stream does not exist in Kinesis: live.{} is empty",
                    self.stream
                );
                return empty();
            }
        };
        // Deleted and re-created since the archiver last ran: the
        // checkpoints are the old stream's, and none of the new one's records
        // is archived (its shards reuse the old shard ids).
        let renewed;
        let snapshot: &Snapshot = match &snapshot.incarnation {
            Some((arn, created)) => {
                // One DescribeStreamSummary per statement; if it fails (its
                // account-wide limit is low), the recorded incarnation is
                // taken as current rather than failing the query.
                let now = view
                    .incarnation(&self.client, &self.stream, self.settings.max_backoff)
                    .await
                    .inspect_err(|e| {
                        tracing::debug!(stream = %self.stream, "DescribeStreamSummary failed, assuming the stream was not re-created: {e}")
                    })
                    .unwrap_or_else(|_| (arn.clone(), *created));
                let (now_arn, now_created) = now;
                if now_arn != *arn || now_created != *created {
                    tracing::warn!(
                        stream = %self.stream,
                        "stream {} was deleted and re-created since it was last archived: live.{} reads the new stream from its start",
                        self.stream,
                        self.stream
                    );
                    renewed = snapshot.of_new_incarnation(now_created);
                    &renewed
                } else {
                    snapshot
                }
            }
            None => snapshot,
        };
        view.count_scan(&self.stream);
        let mut partitions: Vec<Arc<dyn PartitionStream>> = Vec::new();
        let seqs = ShardRange::from_filters(filters);
        for s in shards.iter() {
            if snapshot.finished(&s.shard_id) || !seqs.has_shard(&s.shard_id) {
                continue;
            }
            let after = snapshot.committed(&s.shard_id).cloned();
            // Live records come after the committed position.
            if after
                .as_ref()
                .is_some_and(|p| !seqs.reaches_past(&p.sequence_number))
            {
                continue;
            }
            let archived_until = snapshot
                .checkpoint(&s.shard_id)
                .and_then(|c| c.last_arrival_ms);
            let start = match (range.start_ms, &after) {
                (Some(t), None) => StartAt::AtTimestamp(t),
                (Some(t), Some(_)) if archived_until.is_some_and(|a| a < t) => {
                    StartAt::AtTimestamp(t)
                }
                (_, Some(p)) => StartAt::AfterSequence(p.sequence_number.clone()),
                (None, None) => StartAt::TrimHorizon,
            };
            let from = match &after {
                Some(p) => StartAt::AfterSequence(p.sequence_number.clone()),
                None => StartAt::TrimHorizon,
            };
            partitions.push(Arc::new(LiveShard {
                schema: schema.clone(),
                client: self.client.clone(),
                stream: self.stream.clone(),
                shard: s.shard_id.clone(),
                start,
                from,
                after,
                started_ms,
                range,
                settings: self.settings.clone(),
                view: view.clone(),
            }));
        }
        if partitions.is_empty() {
            return empty();
        }
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            partitions,
            projection,
            vec![],
            false,
            limit,
        )?))
    }
}

/// The live read of one shard.
#[derive(Debug, Clone)]
struct LiveShard {
    schema: SchemaRef,
    client: crate::kinesis::Client,
    stream: String,
    shard: String,
    /// Where this scan's own read starts (may skip ahead with `AT_TIMESTAMP`).
    start: StartAt,
    /// Where a read of the whole tail starts (the shared read of the view).
    from: StartAt,
    /// Records at or before this position are archived.
    after: Option<Position>,
    /// When the scan started: the horizon of the read.
    started_ms: i64,
    range: TimeRange,
    settings: LiveSettings,
    /// The statement's view, which may share this shard's tail between scans.
    view: Arc<View>,
}

impl LiveShard {
    fn reader(&self) -> ShardReader {
        let r = ShardReader::new(
            self.client.clone(),
            &self.stream,
            &self.shard,
            self.start.clone(),
            self.settings.limit,
            self.settings.max_backoff,
            Arc::new(AtomicU64::new(0)),
        )
        .give_up_after(self.settings.attempts)
        .paced(shard_pacer(
            &self.stream,
            &self.shard,
            ReadLimits::share(self.settings.read_share),
        ));
        match (&self.start, &self.after) {
            (StartAt::AfterSequence(_), Some(p)) => r.resume_after(p),
            _ => r,
        }
    }
}

impl PartitionStream for LiveShard {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let Some(tail) = self.view.tail(&self.stream, &self.shard) else {
            return Box::pin(RecordBatchStreamAdapter::new(
                self.schema.clone(),
                self.clone().read(),
            ));
        };
        // Shared: the first scan to run reads the whole tail (no time range),
        // every scan then takes its own range from it.
        let me = self.clone();
        let stream = futures::stream::once(async move {
            let whole = LiveShard {
                start: me.from.clone(),
                range: TimeRange::default(),
                ..me.clone()
            };
            let data = tail
                .cell
                .get_or_try_init(|| async move {
                    let batches: Vec<RecordBatch> = whole.read().try_collect().await?;
                    let kept = me.view.keep(batches).map_err(df_err)?;
                    Ok::<_, DataFusionError>(Arc::new(kept))
                })
                .await?;
            let batches = data.batches().map_err(df_err)?;
            let range = me.range;
            let out: Vec<DfResult<RecordBatch>> = batches
                .into_iter()
                .filter_map(|b| in_range(&b, &range).transpose())
                .collect();
            Ok::<_, DataFusionError>(futures::stream::iter(out))
        })
        .try_flatten();
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// The rows of `b` whose arrival time is in `range` (`None` when none is).
fn in_range(b: &RecordBatch, range: &TimeRange) -> DfResult<Option<RecordBatch>> {
    if *range == TimeRange::default() {
        return Ok((b.num_rows() > 0).then(|| b.clone()));
    }
    let idx = b.schema().index_of(record::col::ARRIVAL)?;
    let arrival = arrow::compute::cast(
        b.column(idx),
        &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
    )?;
    let arrival = arrival.as_primitive::<TimestampMillisecondType>();
    let keep: BooleanArray = arrival
        .iter()
        .map(|a| Some(a.is_some_and(|t| range.contains(t))))
        .collect();
    let out = arrow::compute::filter_record_batch(b, &keep)?;
    Ok((out.num_rows() > 0).then_some(out))
}

impl LiveShard {
    /// Read this shard from `start` up to the horizon, in this scan's range.
    fn read(self) -> impl futures::Stream<Item = DfResult<RecordBatch>> + Send + 'static {
        let reader = self.reader();
        futures::stream::unfold((reader, false, self), |(mut reader, done, me)| async move {
            if done {
                return None;
            }
            let cancel = CancellationToken::new();
            loop {
                let batch = match reader.next(&cancel).await {
                    Err(e) => return Some((Err(df_err(e)), (reader, true, me))),
                    Ok(None) => return None,
                    Ok(Some(b)) => b,
                };
                let last_arrival = batch.records.last().map(|r| r.arrival_ms);
                let finished = batch.end_of_shard
                    || (batch.kinesis_records == 0 && batch.millis_behind.unwrap_or(0) == 0)
                    || last_arrival.is_some_and(|a| a >= me.started_ms)
                    || me
                        .range
                        .end_ms
                        .zip(last_arrival)
                        .is_some_and(|(e, a)| a > e.saturating_add(PAST_END_SLACK_MS));
                let mut b = RecordBatchBuilder::with_capacity(batch.records.len(), batch.bytes);
                for r in &batch.records {
                    let archived = me.after.as_ref().is_some_and(|a| r.position() <= *a);
                    let before_horizon = r.arrival_ms <= me.started_ms;
                    if !archived && before_horizon && me.range.contains(r.arrival_ms) {
                        b.push(r);
                    }
                }
                if b.is_empty() {
                    if finished {
                        return None;
                    }
                    continue;
                }
                let out = record::with_partition_columns(&b.finish())
                    .map_err(datafusion::error::DataFusionError::from);
                return Some((out, (reader, finished, me)));
            }
        })
    }
}
