//! A consumer that follows the replay consistency protocol
//! (`docs/replay-consistency.md`): it reads a stream that receives both live
//! records and replayed copies, and keeps per partition key the value of the
//! newest record — the same state it would have from reading the source once.
//!
//! ```text
//! cargo run --example consistent_consumer -- --stream orders [--field _fluxcap] [--idle-ms 2000] [--json]
//!     [--delete-when op=delete]
//! ```
//!
//! With `--delete-when MEMBER=VALUE`, a record whose (original) payload is a
//! JSON object with that top-level string member deletes its key: the
//! consumer keeps a delete marker at the record's position, so a replayed
//! copy of an older write cannot bring the key back.
//!
//! Every shard is read from TRIM_HORIZON, parents before children (level by
//! level of lineage depth, so each key's records come in order), until it
//! ends or has shown no new record for `--idle-ms`. Each record is decoded
//! with [`fluxcap::consistency::decode`]: a replayed copy competes with its
//! original position, a live record with its own. The final state goes to
//! stdout (`key<TAB>value` lines, or with `--json` one JSON object with sorted
//! keys) and `applied N, stale M` to stderr. The endpoint, region and
//! profile come from the fluxcap configuration (`--config`, `FLUXCAP_*`) and
//! the AWS environment (e.g. `AWS_ENDPOINT_URL_KINESIS`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use clap::Parser;
use fluxcap::consistency::{Applier, DEFAULT_FIELD, Decoded, Position, decode, lineage_depths};
use fluxcap::kinesis::reader::{ShardReader, StartAt};
use fluxcap::kinesis::shards::list_shards;
use fluxcap::record::Record;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Read a Kinesis stream applying the replay consistency rule per partition key")]
struct Args {
    /// The stream to read.
    #[arg(long)]
    stream: String,
    /// Name of the member that carries a replayed record's annotation.
    #[arg(long, default_value = DEFAULT_FIELD)]
    field: String,
    /// Stop reading an open shard after this long without new records.
    #[arg(long, default_value_t = 2000)]
    idle_ms: u64,
    /// Print the final state as one JSON object.
    #[arg(long)]
    json: bool,
    /// A payload with this top-level JSON member and string value is a delete (`op=delete`).
    #[arg(long, value_name = "MEMBER=VALUE")]
    delete_when: Option<String>,
    /// fluxcap configuration file (region, endpoint, profile).
    #[arg(long, env = "FLUXCAP_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cfg = fluxcap::config::load(&fluxcap::config::Sources::from_env(args.config.clone()))?;
    let client = fluxcap::kinesis::client(&cfg).await;
    let max_backoff = cfg.archiver.max_backoff.0;
    let limit = cfg.archiver.max_records_per_call;

    // Lineage depth per shard: it orders live records across resharding and
    // schedules the reads (a child is always deeper than its parents).
    let shards = list_shards(&client, &args.stream, max_backoff).await?;
    let lineage: Vec<_> = shards
        .iter()
        .map(|s| {
            (
                s.shard_id.clone(),
                s.parents.first().cloned(),
                s.parents.get(1).cloned(),
            )
        })
        .collect();
    let depths: HashMap<String, u32> = lineage_depths(&lineage);
    let max_depth = depths.values().copied().max().unwrap_or(0);
    let delete_when = match &args.delete_when {
        Some(d) => {
            let (m, v) = d
                .split_once('=')
                .ok_or("--delete-when expects MEMBER=VALUE")?;
            Some((m.to_string(), v.to_string()))
        }
        None => None,
    };

    let mut state: Applier<String> = Applier::new();
    for level in 0..=max_depth {
        // The shards of one level are independent: read them concurrently.
        let mut reads = tokio::task::JoinSet::new();
        for shard in shards
            .iter()
            .filter(|s| depths.get(&s.shard_id) == Some(&level))
        {
            let reader = ShardReader::new(
                client.clone(),
                &args.stream,
                &shard.shard_id,
                StartAt::TrimHorizon,
                limit,
                max_backoff,
                Arc::new(AtomicU64::new(0)),
            )
            .give_up_after(20);
            let idle = (!shard.closed).then(|| Duration::from_millis(args.idle_ms));
            reads.spawn(read_shard(reader, idle));
        }
        while let Some(done) = reads.join_next().await {
            for record in done?? {
                let depth = depths.get(record.shard_id.as_ref()).copied().unwrap_or(0);
                apply(
                    &mut state,
                    &record,
                    depth,
                    &args.field,
                    delete_when.as_ref(),
                );
            }
        }
    }

    let sorted: BTreeMap<&str, &String> = state.iter().map(|(k, _, v)| (k, v)).collect();
    if args.json {
        println!("{}", serde_json::to_string(&sorted)?);
    } else {
        for (k, v) in &sorted {
            println!("{k}\t{v}");
        }
    }
    eprintln!("applied {}, stale {}", state.applied(), state.stale());
    Ok(())
}

/// The consumer rule for one record: decode it, then offer it at its
/// original position (replayed copy) or its own (live record).
fn apply(
    state: &mut Applier<String>,
    record: &Record,
    depth: u32,
    field: &str,
    delete_when: Option<&(String, String)>,
) {
    let (position, replayed, force, payload) = match decode(&record.data, field) {
        Decoded::Original(data) => (
            Position::of_record(record, depth),
            false,
            false,
            data.to_vec(),
        ),
        Decoded::Replayed {
            annotation,
            payload,
        } => (
            annotation.position(),
            true,
            annotation.force_overwrite,
            payload,
        ),
    };
    let deletes = delete_when.is_some_and(|(member, value)| {
        serde_json::from_slice::<serde_json::Value>(&payload)
            .is_ok_and(|v| v.get(member).and_then(|m| m.as_str()) == Some(value.as_str()))
    });
    if deletes {
        state.offer_delete(&record.partition_key, position, replayed, force);
        return;
    }
    let value = String::from_utf8_lossy(&payload).into_owned();
    state.offer(&record.partition_key, position, replayed, force, value);
}

/// Every record of one shard, in order: to its end, or for an open shard
/// (`idle` set) until it is at the tip and has shown no new record for `idle`.
async fn read_shard(
    mut reader: ShardReader,
    idle: Option<Duration>,
) -> fluxcap::Result<Vec<Record>> {
    let cancel = CancellationToken::new();
    let mut records = Vec::new();
    let mut last_new = Instant::now();
    while let Some(batch) = reader.next(&cancel).await? {
        if !batch.records.is_empty() {
            last_new = Instant::now();
        }
        let empty = batch.records.is_empty();
        let at_tip = batch.millis_behind.is_none_or(|ms| ms == 0);
        records.extend(batch.records);
        let idle_over = idle.is_some_and(|idle| last_new.elapsed() >= idle);
        if batch.end_of_shard || (empty && at_tip && idle_over) {
            break;
        }
        if empty {
            // Kinesis allows 5 GetRecords calls per second per shard.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(records)
}
