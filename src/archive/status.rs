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
    /// Records known to be lost (expired before they were archived), one
    /// description per gap the archiver recorded.
    pub gaps: Vec<String>,
    /// With shared archivers (`archive --shared`): who holds the shard
    /// ("archiver <id> (host, pid)", "free" or "done").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
}

/// Build the status report.
pub async fn status(cfg: &Config, stream: Option<&str>) -> Result<StatusReport> {
    let archive = Archive::open(cfg).await?;
    let client = kinesis::client(cfg).await;
    status_with(cfg, &archive, &client, stream).await
}

/// [`status`] with an archive handle and a Kinesis client that are already
/// open (the server keeps one of each).
pub async fn status_with(
    cfg: &Config,
    archive: &Archive,
    client: &Client,
    stream: Option<&str>,
) -> Result<StatusReport> {
    let mut streams = Vec::new();
    for s in cfg.selected_streams(stream)? {
        streams.push(stream_status(cfg, archive, client, &s.name).await?);
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
    let holders = crate::archive::archiver::shard_holders(archive, stream).await?;
    let warn_secs = cfg.status.retention_warning.0.as_secs() as i64;
    let now = Utc::now().timestamp_millis();
    let mut shards = Vec::new();
    let mut warnings = Vec::new();
    let id = crate::archive::identity::load(archive, stream).await?;
    let mut suffix = id.current_suffix().to_string();
    let d = summary.stream_description_summary();
    let (arn, created) = (
        d.map(|d| d.stream_arn().to_string()).unwrap_or_default(),
        d.and_then(|d| d.stream_creation_timestamp().to_millis().ok())
            .unwrap_or(0),
    );
    if let Some(cur) = id.incarnations.last()
        && (cur.arn != arn || cur.created_ms != created)
    {
        // Re-created since the archiver last ran: none of the checkpoints is its.
        suffix = format!(".r{created}");
        warnings.push(format!(
            "WARNING: stream {stream} was deleted and re-created since it was last archived: nothing of the new stream is archived yet — run `fluxcap archive`"
        ));
    }
    if id.incarnations.len() > 1
        && let Some(cur) = id.incarnations.last()
    {
        warnings.push(format!(
            "note: stream {stream} was deleted and re-created (the current one was created {}); the archive keeps the records of {} earlier stream(s) of that name, their shards listed as \"previous stream\"",
            chrono::DateTime::from_timestamp_millis(cur.created_ms)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
            id.incarnations.len() - 1
        ));
    }
    for info in &listed {
        let ck = ckpts.get(&crate::archive::identity::shard_key(
            &info.shard_id,
            &suffix,
        ));
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
            gaps: ck.map(describe_gaps).unwrap_or_default(),
            held_by: holders
                .get(&crate::archive::identity::shard_key(
                    &info.shard_id,
                    &suffix,
                ))
                .cloned(),
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
            let peek = peek_unarchived(client, req, cfg.archiver.max_backoff.0).await;
            let mut oldest: Option<i64> = None;
            match peek {
                Peek::Record {
                    arrival_ms,
                    millis_behind,
                } => {
                    st.lag_ms = millis_behind;
                    st.lag_source = Some("MillisBehindLatest".into());
                    oldest = arrival_ms;
                    if st.lag_ms == Some(0)
                        && let Some(t) = arrival_ms
                    {
                        st.lag_ms = Some(now - t);
                        st.lag_source = Some("oldest_unarchived_age".into());
                    }
                }
                Peek::CaughtUp => {
                    st.lag_ms = Some(0);
                    st.lag_source = Some("MillisBehindLatest".into());
                }
                Peek::Unknown => {
                    // No answer: assume the worst — the records right after
                    // the checkpoint are as old as the last archived one.
                    st.lag_ms = ck.and_then(|c| c.last_arrival_ms).map(|t| now - t);
                    st.lag_source = Some("checkpoint_age".into());
                    oldest = ck.and_then(|c| c.last_arrival_ms);
                }
            }
            if let Some(t) = oldest {
                let expires = (t + i64::from(retention_hours) * 3_600_000 - now) / 1000;
                st.expires_in_secs = Some(expires);
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
        shards.push(st);
    }
    for (key, c) in &ckpts {
        let (shard, key_suffix) = crate::archive::identity::split_key(key);
        if key_suffix != suffix || !listed.iter().any(|l| l.shard_id == shard) {
            shards.push(ShardStatus {
                shard_id: key.clone(),
                state: if key_suffix != suffix {
                    "previous stream".into()
                } else if c.finished {
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
                gaps: describe_gaps(c),
                held_by: holders.get(key).cloned(),
            });
        }
    }
    shards.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
    for sh in &shards {
        for g in &sh.gaps {
            warnings.push(format!(
                "WARNING: stream {stream} shard {}: records lost — {g}",
                sh.shard_id
            ));
        }
    }
    Ok(StreamStatus {
        stream: stream.into(),
        retention_hours,
        shards,
        warnings,
    })
}

/// One line per gap recorded in a checkpoint.
fn describe_gaps(c: &Checkpoint) -> Vec<String> {
    let pos = |p: Option<&crate::record::Position>, none: &str| {
        p.map_or(none.to_string(), |p| {
            format!("{}:{}", p.sequence_number, p.subsequence_number)
        })
    };
    c.gaps
        .iter()
        .map(|g| {
            format!(
                "after {} up to {} ({}; recorded {})",
                pos(g.after.as_ref(), "the start of the shard"),
                pos(g.until.as_ref(), "the end of the shard"),
                g.reason,
                g.detected_at
            )
        })
        .collect()
}

/// What a peek at the first record after a shard's checkpoint found.
enum Peek {
    /// A record (its arrival time) and how far behind the tip it is.
    Record {
        arrival_ms: Option<i64>,
        millis_behind: Option<i64>,
    },
    /// Nothing after the checkpoint: the shard is archived up to its tip.
    CaughtUp,
    /// No answer (throttled or failing throughout).
    Unknown,
}

/// Page from `req`'s iterator until a record arrives or the reader is at
/// the tip (`MillisBehindLatest` 0) — an empty page alone proves nothing —
/// retrying throttling with backoff.
async fn peek_unarchived(
    client: &Client,
    req: aws_sdk_kinesis::operation::get_shard_iterator::builders::GetShardIteratorFluentBuilder,
    max_backoff: std::time::Duration,
) -> Peek {
    let mut backoff = kinesis::Backoff::new(max_backoff.min(std::time::Duration::from_secs(2)));
    let mut it = loop {
        match req.clone().send().await {
            Ok(r) => match r.shard_iterator {
                Some(it) => break it,
                None => return Peek::CaughtUp,
            },
            Err(e) if matches!(classify(&e), Failure::Retry(_)) && backoff.attempts() < 5 => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(_) => return Peek::Unknown,
        }
    };
    let mut pages = 0;
    while pages < 50 {
        match client
            .get_records()
            .shard_iterator(&it)
            .limit(1)
            .send()
            .await
        {
            Ok(resp) => {
                pages += 1;
                if let Some(r) = resp.records.first() {
                    return Peek::Record {
                        arrival_ms: r
                            .approximate_arrival_timestamp
                            .and_then(|t| t.to_millis().ok()),
                        millis_behind: resp.millis_behind_latest,
                    };
                }
                if resp.millis_behind_latest == Some(0) {
                    return Peek::CaughtUp;
                }
                match resp.next_shard_iterator {
                    Some(next) => it = next,
                    None => return Peek::CaughtUp,
                }
            }
            Err(e) if matches!(classify(&e), Failure::Retry(_)) && backoff.attempts() < 8 => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(_) => return Peek::Unknown,
        }
    }
    Peek::Unknown
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
            let shared = s.shards.iter().any(|sh| sh.held_by.is_some());
            o.push_str(&format!(
                "  {:<24} {:<9} {:<22} {:>10} {:>10} {:>12}{}\n",
                "SHARD",
                "STATE",
                "CHECKPOINT",
                "RECORDS",
                "LAG",
                "EXPIRES IN",
                if shared { "  HELD BY" } else { "" }
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
                let held = match (&sh.held_by, shared) {
                    (Some(h), _) => format!("  {h}"),
                    (None, true) => "  -".into(),
                    (None, false) => String::new(),
                };
                o.push_str(&format!(
                    "  {:<24} {:<9} {:<22} {:>10} {:>10} {:>12}{}{}\n",
                    sh.shard_id,
                    sh.state,
                    ck,
                    sh.records_archived,
                    lag,
                    exp,
                    held,
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
