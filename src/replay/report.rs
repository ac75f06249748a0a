//! What a replay tells a person: `--list`, the progress bar, the dry run's
//! estimate and the summary at the end.

use std::time::Duration;

use crate::archive::store::Archive;
use crate::config::ReplayConfig;
use crate::error::Result;
use crate::replay::state::{self, Source};
use crate::replay::target::Target;
use crate::replay::{ReplayOptions, Summary};

pub(super) async fn list(archive: &Archive, json: bool) -> Result<()> {
    let all = state::list(archive).await?;
    if json {
        let rows: Vec<_> = all
            .iter()
            .map(|(m, p)| {
                serde_json::json!({
                    "id": m.id,
                    "created_at": m.created_at,
                    "source": m.source,
                    "target": m.target,
                    "state": state::describe_phase(p.as_ref(), state::process_alive),
                    "sent": p.as_ref().map(|p| p.sent).unwrap_or(0),
                    "total": p.as_ref().and_then(|p| p.total),
                    "rejected": p.as_ref().map(|p| p.rejected).unwrap_or(0),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if all.is_empty() {
        eprintln!("no replays in {}", archive.location);
        return Ok(());
    }
    println!(
        "{:<26} {:<24} {:<20} {:<28} {:>10} {:>10}  state",
        "id", "created", "source", "target", "sent", "total"
    );
    for (m, p) in &all {
        let source = match &m.source {
            Source::Stream { stream } => stream.clone(),
            Source::Parquet { location, .. } => format!("parquet:{location}"),
        };
        println!(
            "{:<26} {:<24} {:<20} {:<28} {:>10} {:>10}  {}",
            m.id,
            m.created_at,
            source,
            m.target,
            p.as_ref().map(|p| p.sent).unwrap_or(0),
            p.as_ref()
                .and_then(|p| p.total)
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            state::describe_phase(p.as_ref(), state::process_alive)
        );
    }
    Ok(())
}

/// What the estimate assumes one PutRecords round trip takes.
pub(super) const ROUND_TRIP_SECONDS: f64 = 0.03;

/// Seconds the target's limits (times `share`, and `--rate`) need for the
/// counted records, and the round trips of the busiest key when in order.
pub(super) fn estimate(
    r: &ReplayConfig,
    target: &Target,
    rate: Option<f64>,
    share: f64,
    s: &Summary,
) -> f64 {
    if !matches!(target, Target::Kinesis(_)) {
        return 0.0;
    }
    let mut t: f64 = 0.0;
    for sh in &s.shards {
        if r.shard_records_per_second > 0 {
            t = t.max(sh.records as f64 / (f64::from(r.shard_records_per_second) * share));
        }
        if r.shard_bytes_per_second.0 > 0 {
            t = t.max(sh.bytes as f64 / (r.shard_bytes_per_second.0 as f64 * share));
        }
    }
    if let Some(n) = s.busiest_key_records {
        // In order, a key's records go one per round trip.
        t = t.max(n as f64 * ROUND_TRIP_SECONDS);
    }
    if let Some(rate) = rate {
        t = t.max(s.records as f64 / rate);
    }
    t
}

pub(super) fn report(s: &Summary, opts: &ReplayOptions, target: &Target) {
    let to_stdout = opts.json && *target != Target::Stdout;
    if to_stdout {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
        return;
    }
    let mut text = String::new();
    if s.dry_run {
        text.push_str(&format!(
            "dry run of replay to {}: {} records, {} bytes would be sent{}\n",
            s.target,
            s.records,
            s.bytes,
            s.estimated_seconds
                .filter(|t| *t > 0.0)
                .map(|t| format!("; estimated {t:.1} s at the target's limits"))
                .unwrap_or_default()
        ));
        for sh in &s.shards {
            text.push_str(&format!(
                "  {:<28} {:>10} records {:>14} bytes\n",
                sh.shard_id, sh.records, sh.bytes
            ));
        }
        if let Some(n) = s.busiest_key_records.filter(|n| *n > 1) {
            text.push_str(&format!(
                "the busiest partition key has {n} records: in order they take {n} PutRecords round trips \
                 (~{:.1} s at {} ms each); --unordered sends them without waiting\n",
                n as f64 * ROUND_TRIP_SECONDS,
                (ROUND_TRIP_SECONDS * 1000.0) as u64
            ));
        }
    } else {
        text.push_str(&format!(
            "replay {} to {}: sent {} records ({} bytes) in {:.1} s{}{}\n",
            s.id,
            s.target,
            s.records,
            s.bytes,
            s.seconds,
            if s.throttled > 0 {
                format!("; {} entries throttled and retried", s.throttled)
            } else {
                String::new()
            },
            if s.enveloped > 0 {
                format!(
                    "; {} payloads were not JSON objects and were sent in the envelope",
                    s.enveloped
                )
            } else {
                String::new()
            }
        ));
    }
    if s.rejected > 0 {
        text.push_str(&format!(
            "{} records are larger than replay.max_record_size and {}\n",
            s.rejected,
            if s.dry_run {
                "would not be sent"
            } else {
                "were not sent"
            }
        ));
    }
    if opts.dry_run && opts.json {
        print!("{text}");
    } else {
        eprint!("{text}");
    }
}

pub(super) fn progress_bar(total: Option<u64>, start: u64) -> indicatif::ProgressBar {
    let bar = match total {
        Some(t) => {
            let b = indicatif::ProgressBar::new(t);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} replay [{bar:30}] {pos}/{len} records  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        }
        None => {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} replay {pos} records  {per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b
        }
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_position(start);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
