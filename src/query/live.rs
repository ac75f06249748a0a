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

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use datafusion::common::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::kinesis::reader::{ShardReader, StartAt};
use crate::kinesis::shards::list_shards;
use crate::query::bounds::TimeRange;
use crate::query::df_err;
use crate::query::snapshot::Snapshot;
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
    /// Consecutive failed calls before the query fails.
    pub attempts: u32,
    /// The horizon: records that arrived after this time (epoch ms) are not
    /// read. `None`: each scan's start.
    pub as_of_ms: Option<i64>,
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

    /// The scan plan, reading each shard after its position in `snapshot`.
    pub async fn scan_at(
        &self,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
        snapshot: &Snapshot,
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
        let now = chrono::Utc::now().timestamp_millis();
        let started_ms = self.settings.as_of_ms.map_or(now, |t| t.min(now));
        // Records arriving after the scan starts are past the horizon (and
        // Kinesis refuses AT_TIMESTAMP in the future).
        if range.is_empty() || range.start_ms.is_some_and(|t| t > started_ms) {
            return empty();
        }
        let shards = match list_shards(&self.client, &self.stream, self.settings.max_backoff).await
        {
            Ok(s) => s,
            Err(Error::StreamNotFound { .. }) => {
                tracing::warn!(
                    stream = %self.stream,
                    "the stream does not exist in Kinesis: live.{} is empty",
                    self.stream
                );
                return empty();
            }
            Err(e) => return Err(df_err(e)),
        };
        let mut partitions: Vec<Arc<dyn PartitionStream>> = Vec::new();
        for s in shards {
            if snapshot.finished(&s.shard_id) {
                continue;
            }
            let after = snapshot.committed(&s.shard_id).cloned();
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
            partitions.push(Arc::new(LiveShard {
                schema: schema.clone(),
                client: self.client.clone(),
                stream: self.stream.clone(),
                shard: s.shard_id,
                start,
                after,
                started_ms,
                range,
                settings: self.settings.clone(),
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
    start: StartAt,
    /// Records at or before this position are archived.
    after: Option<Position>,
    /// When the scan started: the horizon of the read.
    started_ms: i64,
    range: TimeRange,
    settings: LiveSettings,
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
        .give_up_after(self.settings.attempts);
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
        let me = self.clone();
        let reader = self.reader();
        let stream =
            futures::stream::unfold((reader, false, me), |(mut reader, done, me)| async move {
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
            });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}
