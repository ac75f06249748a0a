//! `fluxcap status`: per shard, whether it is open, closed or finished, its
//! checkpoint, its lag, and how long until the oldest record not yet archived
//! falls off the stream's retention — with a loud warning when that is close.

use std::collections::HashMap;

use aws_sdk_kinesis::types::ShardIteratorType;
use chrono::Utc;
use serde::Serialize;

use crate::archive::checkpoint::{Checkpoint, load_all};
use crate::archive::store::Archive;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kinesis::shards::list_shards;
use crate::kinesis::{self, Client, Failure, classify};

/// Status of every selected stream.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// One entry per stream.
    pub streams: Vec<StreamStatus>,
}

/// Status of one stream.
#[derive(Debug, Serialize)]
pub struct StreamStatus {
    /// Stream name.
    pub stream: String,
    /// Retention period of the stream, hours.
    pub retention_hours: i32,
    /// Per-shard status.
    pub shards: Vec<ShardStatus>,
    /// Warnings (retention risk).
    pub warnings: Vec<String>,
}

/// Status of one shard.
#[derive(Debug, Serialize)]
pub struct ShardStatus {
    /// Shard id.
    pub shard_id: String,
    /// `open`, `closed` (not yet fully archived), `finished`, or `expired` (gone from the stream).
    pub state: String,
    /// Parent shards.
    pub parents: Vec<String>,
    /// Checkpoint sequence number, if any.
    pub checkpoint_sequence: Option<String>,
    /// Checkpoint sub-sequence number, if any.
    pub checkpoint_subsequence: Option<i64>,
    /// Records archived so far.
    pub records_archived: u64,
    /// Arrival time of the last archived record (RFC 3339).
    pub last_archived_arrival: Option<String>,
    /// MillisBehindLatest after the checkpoint (or age of the last archived record).
    pub lag_ms: Option<i64>,
    /// Where `lag_ms` comes from: `MillisBehindLatest` or `checkpoint_age`.
    pub lag_source: Option<String>,
    /// Seconds until the oldest unarchived record leaves the stream (None: nothing unarchived).
    pub expires_in_secs: Option<i64>,
    /// The risk is under the warning threshold.
    pub warning: bool,
}

/// Build the status report.
pub async fn status(cfg: &Config, stream: Option<&str>) -> Result<StatusReport> {
    let archive = Archive::open(cfg).await?;
    let client = kinesis::client(cfg).await;
    let mut streams = Vec::new();
    for s in cfg.selected_streams(stream)? {
        streams.push(stream_status(cfg, &archive, &client, &s.name).await?);
    }
    Ok(StatusReport { streams })
}

async fn stream_status(
    cfg: &Config,
    archive: &Archive,
    client: &Client,
    stream: &str,
) -> Result<StreamStatus> {
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| match classify(&e) {
            Failure::NotFound(detail) => Error::StreamNotFound {
                stream: stream.into(),
                detail,
            },
            Failure::Retry(m) | Failure::Fatal(m) => Error::Kinesis {
                operation: "DescribeStreamSummary",
                stream: stream.into(),
                shard: None,
                message: m,
            },
            Failure::ExpiredIterator => Error::Usage("unexpected expired iterator".into()),
        })?;
    let retention_hours = summary
        .stream_description_summary()
        .map(|d| d.retention_period_hours())
        .unwrap_or(24);
    let listed = list_shards(client, stream, cfg.archiver.max_backoff.0).await?;
    let ckpts: HashMap<String, Checkpoint> = load_all(archive, stream)
        .await?
        .into_iter()
        .map(|c| (c.shard_id.clone(), c))
        .collect();
    let warn_secs = cfg.status.retention_warning.0.as_secs() as i64;
    let now = Utc::now().timestamp_millis();
    let mut shards = Vec::new();
    let mut warnings = Vec::new();
    for info in &listed {
        let ck = ckpts.get(&info.shard_id);
        let finished = ck.is_some_and(|c| c.finished);
        let state = if finished {
            "finished"
        } else if info.closed {
            "closed"
        } else {
            "open"
        };
        let mut st = ShardStatus {
            shard_id: info.shard_id.clone(),
            state: state.into(),
            parents: info.parents.clone(),
            checkpoint_sequence: ck
                .and_then(|c| c.position.as_ref().map(|p| p.sequence_number.clone())),
            checkpoint_subsequence: ck
                .and_then(|c| c.position.as_ref().map(|p| p.subsequence_number)),
            records_archived: ck.map_or(0, |c| c.records),
            last_archived_arrival: ck
                .and_then(|c| c.last_arrival_ms)
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339()),
            lag_ms: None,
            lag_source: None,
            expires_in_secs: None,
            warning: false,
        };
        if !finished {
            // Peek at the first record after the checkpoint.
            let mut req = client
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(&info.shard_id);
            req = match ck.and_then(|c| c.position.as_ref()) {
                Some(p) => req
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(&p.sequence_number),
                None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            };
            let peek = async {
                let it = req.send().await.ok()?.shard_iterator?;
                client
                    .get_records()
                    .shard_iterator(it)
                    .limit(1)
                    .send()
                    .await
                    .ok()
            }
            .await;
            match peek {
                Some(resp) => {
                    st.lag_ms = resp.millis_behind_latest;
                    st.lag_source = Some("MillisBehindLatest".into());
                    if let Some(r) = resp.records.first()
                        && let Some(t) = r
                            .approximate_arrival_timestamp
                            .and_then(|t| t.to_millis().ok())
                    {
                        let expires = (t + i64::from(retention_hours) * 3_600_000 - now) / 1000;
                        st.expires_in_secs = Some(expires);
                        if st.lag_ms == Some(0) {
                            st.lag_ms = Some(now - t);
                            st.lag_source = Some("oldest_unarchived_age".into());
                        }
                        if expires < warn_secs {
                            st.warning = true;
                            warnings.push(format!(
                                "WARNING: stream {stream} shard {}: unarchived records fall off the stream's {retention_hours}h retention in {} — run `fluxcap archive` now",
                                info.shard_id,
                                fmt_secs(expires)
                            ));
                        }
                    }
                }
                None => {
                    st.lag_ms = ck.and_then(|c| c.last_arrival_ms).map(|t| now - t);
                    st.lag_source = Some("checkpoint_age".into());
                }
            }
        }
        shards.push(st);
    }
    for (id, c) in &ckpts {
        if !listed.iter().any(|l| &l.shard_id == id) {
            shards.push(ShardStatus {
                shard_id: id.clone(),
                state: if c.finished {
                    "finished".into()
                } else {
                    "expired".into()
                },
                parents: c.parents.clone(),
                checkpoint_sequence: c.position.as_ref().map(|p| p.sequence_number.clone()),
                checkpoint_subsequence: c.position.as_ref().map(|p| p.subsequence_number),
                records_archived: c.records,
                last_archived_arrival: c
                    .last_arrival_ms
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map(|t| t.to_rfc3339()),
                lag_ms: None,
                lag_source: None,
                expires_in_secs: None,
                warning: false,
            });
        }
    }
    shards.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
    Ok(StreamStatus {
        stream: stream.into(),
        retention_hours,
        shards,
        warnings,
    })
}

fn fmt_secs(s: i64) -> String {
    if s <= 0 {
        return "no time (already falling off)".into();
    }
    let (h, m) = (s / 3600, (s % 3600) / 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else {
        format!("{m}m{:02}s", s % 60)
    }
}

impl StatusReport {
    /// Aligned table, warnings last.
    pub fn to_table(&self) -> String {
        let mut o = String::new();
        for s in &self.streams {
            o.push_str(&format!(
                "stream {} (retention {}h)\n",
                s.stream, s.retention_hours
            ));
            o.push_str(&format!(
                "  {:<24} {:<9} {:<22} {:>10} {:>10} {:>12}\n",
                "SHARD", "STATE", "CHECKPOINT", "RECORDS", "LAG", "EXPIRES IN"
            ));
            for sh in &s.shards {
                let ck = match (&sh.checkpoint_sequence, sh.checkpoint_subsequence) {
                    (Some(seq), Some(sub)) => {
                        let tail = &seq[seq.len().saturating_sub(12)..];
                        format!("…{tail}:{sub}")
                    }
                    _ => "-".into(),
                };
                let lag = sh
                    .lag_ms
                    .map_or("-".into(), |l| format!("{:.1}s", l as f64 / 1000.0));
                let exp = sh.expires_in_secs.map_or("-".into(), fmt_secs);
                o.push_str(&format!(
                    "  {:<24} {:<9} {:<22} {:>10} {:>10} {:>12}{}\n",
                    sh.shard_id,
                    sh.state,
                    ck,
                    sh.records_archived,
                    lag,
                    exp,
                    if sh.warning { "  <-- WARNING" } else { "" }
                ));
            }
            for w in &s.warnings {
                o.push_str(&format!("!!! {w}\n"));
            }
        }
        o
    }
}
