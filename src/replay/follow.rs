//! `--follow`: backfill, then follow. Once the selection (everything up to
//! the horizon) is sent, the replay keeps forwarding the records that arrive
//! after the horizon, as they arrive, with the same filter, annotation, order
//! and pacing, until it is stopped — a consumer's "rewind to time T and keep
//! reading" through one command, without making every other consumer of the
//! stream see a replay.
//!
//! ```text
//!   source shard:   r1 … rH │ rH+1 rH+2 …  (arriving)
//!   selection:      ────────┤                 sent first, in position order
//!   follow:                 ├─ GetRecords after H ─▶ --where ─▶ same sink
//!   children (split/merge after the start): read once their parents end
//!
//!   progress.json:  selection_done, follow[shard] = last sequence number whose
//!                   records (and all before them in the output) are acknowledged
//!   --resume:       skips the selection when it is done, reads each shard
//!                   after follow[shard] (or after the horizon)
//! ```
//!
//! The hand-over is exact: the selection holds each shard's records up to
//! the horizon H and the follow reads from just after H, so no record is
//! missing or sent twice (a resume re-sends at most what was acknowledged
//! after the last progress save, as for the selection). Records of one
//! partition key keep their order: the selection's are all sent before the
//! follow starts, a shard's records are forwarded in sequence order, and a
//! child shard only after its parents ended.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::kinesis::reader::{ReadBatch, ShardReader, StartAt};
use crate::kinesis::shards::ShardInfo;
use crate::query::{QuerySession, origin};
use crate::record::{self, RecordBatchBuilder};
use crate::replay::run::{Run, Sink, Stop};
use crate::replay::select::{self, Columns};
use crate::replay::state::Selection;

/// The table a followed batch is registered as.
const TABLE: &str = "__fluxcap_follow";

/// How often the shard list is read again for children.
const RELIST: Duration = Duration::from_secs(10);

/// An idle shard (at its tip) is polled again after this long.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Forward the records after the horizon until `cancel`; `idx` is the next
/// ordinal of the output. Returns when stopped (not an error), or when the
/// reader of the output went away.
pub(super) async fn run(
    run: &mut Run,
    session: &QuerySession,
    sink: &mut Sink,
    mut idx: u64,
    cancel: &CancellationToken,
) -> Result<Stop> {
    let m = run.manifest().clone();
    let stream = m.source.stream_label();
    let selection = Selection {
        predicate: m.selection.predicate.clone(),
        include_replayed: m.selection.include_replayed,
        ..Selection::default()
    };
    let horizon = m.horizon.clone().unwrap_or_default();
    let mut lineage: BTreeMap<String, u32> = m.lineage.clone();
    let stop = cancel.child_token();
    let (tx, mut rx) = mpsc::channel::<(String, Result<ReadBatch>)>(8);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut started: HashSet<String> = HashSet::new();
    let mut ended: HashSet<String> = HashSet::new();
    let limit = run.config().archiver.max_records_per_call;
    let max_backoff = run.config().archiver.max_backoff.0;
    let mut relist = tokio::time::interval(RELIST);
    relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(replay = %m.id, "the selection is sent: following {stream}");
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = relist.tick() => {
                let listed = match crate::kinesis::shards::list_shards(&session.kinesis, &stream, max_backoff).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(%stream, "listing shards to follow: {e}");
                        continue;
                    }
                };
                let new = ready(&listed, &started, &ended);
                for s in new {
                    let depth = s
                        .parents
                        .iter()
                        .filter_map(|p| lineage.get(p))
                        .max()
                        .map_or(0, |d| d + 1);
                    lineage.entry(s.shard_id.clone()).or_insert(depth);
                    let start = start_of(&s.shard_id, run.follow_positions(), &horizon);
                    started.insert(s.shard_id.clone());
                    let reader = ShardReader::new(
                        session.kinesis.clone(),
                        &stream,
                        &s.shard_id,
                        start,
                        limit,
                        max_backoff,
                        Arc::new(AtomicU64::new(0)),
                    );
                    tasks.spawn(read_shard(reader, s.shard_id.clone(), tx.clone(), stop.clone()));
                }
                select::register(&session.ctx, None, &lineage);
            }
            got = rx.recv() => {
                let Some((shard, batch)) = got else { break };
                let batch = batch?;
                if !batch.records.is_empty() {
                    let last = batch.records.last().map(|r| r.sequence_number.to_string());
                    let rows = selected(session, &selection, &batch, run.annotation_field()).await?;
                    run.hold_saves = true;
                    for b in &rows {
                        let cols = Columns::of(b)?;
                        for i in 0..b.num_rows() {
                            match run.emit(sink, &cols.row(i), idx, cancel).await {
                                // Stopped while the writer was full: a clean stop.
                                Err(Error::Interrupted) if cancel.is_cancelled() => {
                                    run.hold_saves = false;
                                    stop.cancel();
                                    tasks.shutdown().await;
                                    return Ok(Stop::Complete);
                                }
                                Ok(true) => {
                                    stop.cancel();
                                    tasks.shutdown().await;
                                    return Ok(Stop::OutputClosed);
                                }
                                r => {
                                    r?;
                                }
                            }
                            idx += 1;
                        }
                    }
                    if let Some(seq) = last {
                        run.followed(idx, &shard, seq);
                    }
                    run.hold_saves = false;
                    run.tick();
                }
                if batch.end_of_shard {
                    ended.insert(shard);
                    relist.reset_immediately();
                }
                if run.after_batch(sink).await {
                    stop.cancel();
                    tasks.shutdown().await;
                    return Ok(Stop::OutputClosed);
                }
            }
        }
    }
    stop.cancel();
    tasks.shutdown().await;
    Ok(Stop::Complete)
}

/// Shards that can be read now: not started, and every parent either ended
/// in this follow or not a shard to follow at all (finished before the
/// horizon, or aged out of the stream).
fn ready(
    listed: &[ShardInfo],
    started: &HashSet<String>,
    ended: &HashSet<String>,
) -> Vec<ShardInfo> {
    let ids: HashSet<&str> = listed.iter().map(|s| s.shard_id.as_str()).collect();
    listed
        .iter()
        .filter(|s| !started.contains(&s.shard_id))
        .filter(|s| {
            s.parents
                .iter()
                .all(|p| ended.contains(p) || (!started.contains(p) && !ids.contains(p.as_str())))
        })
        .cloned()
        .collect()
}

/// Where a shard's follow starts: after what a previous run forwarded, else
/// after the horizon; a shard created after the start from its beginning.
fn start_of(
    shard: &str,
    followed: &BTreeMap<String, String>,
    horizon: &BTreeMap<String, Option<String>>,
) -> StartAt {
    match (followed.get(shard), horizon.get(shard)) {
        (Some(seq), _) | (None, Some(Some(seq))) => StartAt::AfterSequence(seq.clone()),
        (None, Some(None)) | (None, None) => StartAt::TrimHorizon,
    }
}

/// Read one shard until it ends or the follow stops, polling at its tip.
async fn read_shard(
    mut reader: ShardReader,
    shard: String,
    tx: mpsc::Sender<(String, Result<ReadBatch>)>,
    stop: CancellationToken,
) {
    loop {
        let got = reader.next(&stop).await;
        let (caught_up, end) = match &got {
            Ok(Some(b)) => (
                b.kinesis_records == 0 && b.millis_behind.unwrap_or(0) == 0,
                b.end_of_shard,
            ),
            Ok(None) => return,
            Err(Error::Interrupted) => return,
            Err(_) => (false, true),
        };
        let Some(got) = got.transpose() else { return };
        if tx.send((shard.clone(), got)).await.is_err() || end {
            return;
        }
        if caught_up {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}

/// The records of `batch` that the selection keeps, in the columns and
/// order of the selection (the same SQL as the backfill).
async fn selected(
    session: &QuerySession,
    selection: &Selection,
    batch: &ReadBatch,
    field: &str,
) -> Result<Vec<RecordBatch>> {
    let mut b = RecordBatchBuilder::with_capacity(batch.records.len(), batch.bytes);
    for r in &batch.records {
        b.push(r);
    }
    let rb = record::with_partition_columns(&b.finish())?;
    let table = MemTable::try_new(rb.schema(), vec![vec![rb]]).map_err(|e| session.error(e))?;
    let view = origin::view(TABLE, Arc::new(table), field)?;
    let _ = session.ctx.deregister_table(TABLE);
    session
        .ctx
        .register_table(TABLE, view)
        .map_err(|e| session.error(e))?;
    let q = select::sql(TABLE, selection, false, true, 0);
    let df = session.sql(&q).await?;
    let mut out = Vec::new();
    let mut s = df.execute_stream().await.map_err(|e| session.error(e))?;
    while let Some(b) = s.next().await {
        out.push(b.map_err(|e| session.error(e))?);
    }
    Ok(out)
}

/// Per shard, the last sequence number forwarded and acknowledged.
#[derive(Debug, Default)]
pub(super) struct Followed {
    /// The saved positions (progress.json's `follow`).
    pub positions: BTreeMap<String, String>,
    /// (output ordinal the position needs acknowledged, shard, sequence).
    pending: std::collections::VecDeque<(u64, String, String)>,
}

impl Followed {
    /// Positions saved by an earlier run.
    pub fn new(positions: BTreeMap<String, String>) -> Self {
        Followed {
            positions,
            pending: Default::default(),
        }
    }

    /// `shard` was read up to `seq`; its selected records end before `need`.
    pub fn read(&mut self, need: u64, shard: &str, seq: String) {
        self.pending.push_back((need, shard.to_string(), seq));
    }

    /// The output is acknowledged up to (not including) `next`.
    pub fn acknowledged(&mut self, next: u64) {
        while self.pending.front().is_some_and(|(n, _, _)| *n <= next) {
            if let Some((_, shard, seq)) = self.pending.pop_front() {
                self.positions.insert(shard, seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str]) -> ShardInfo {
        ShardInfo {
            shard_id: id.into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            closed: false,
            hash_start: "0".into(),
            hash_end: "1".into(),
        }
    }

    #[test]
    fn children_wait_for_their_parents() {
        let listed = [shard("a", &[]), shard("b", &["a"]), shard("c", &["gone"])];
        let none = HashSet::new();
        let r: Vec<String> = ready(&listed, &none, &none)
            .into_iter()
            .map(|s| s.shard_id)
            .collect();
        assert_eq!(r, ["a", "c"]);
        let started: HashSet<String> = ["a".to_string(), "c".to_string()].into();
        assert!(ready(&listed, &started, &none).is_empty());
        let ended: HashSet<String> = ["a".to_string()].into();
        let r: Vec<String> = ready(&listed, &started, &ended)
            .into_iter()
            .map(|s| s.shard_id)
            .collect();
        assert_eq!(r, ["b"]);
    }

    #[test]
    fn positions_advance_only_over_acknowledged_output() {
        let mut f = Followed::default();
        f.read(5, "a", "10".into());
        f.read(7, "b", "20".into());
        f.acknowledged(4);
        assert!(f.positions.is_empty());
        f.acknowledged(6);
        assert_eq!(f.positions.get("a").map(String::as_str), Some("10"));
        assert!(!f.positions.contains_key("b"));
        f.acknowledged(7);
        assert_eq!(f.positions.get("b").map(String::as_str), Some("20"));
    }
}
