//! Build an archive of many small data files on the configured store (the
//! local S3 server in `scripts/bench-verify`) with the library's own commit
//! protocol, so that `fluxcap verify` can be timed over it.
//!
//! ```text
//! cargo run --example gen_verify_archive -- CONFIG STREAM SHARDS FLUSHES HOURS
//! ```
//!
//! Each of SHARDS shards gets FLUSHES flushes; each flush spans HOURS hours
//! and so writes HOURS files (one per hour partition) of 10 records each:
//! SHARDS × FLUSHES × HOURS files, all committed and published.

use std::sync::Arc;

use bytes::Bytes;
use fluxcap::archive::ingest::write_flush;
use fluxcap::archive::store::Archive;
use fluxcap::archive::writer::ParquetSettings;
use fluxcap::record::Record;

const PER_FILE: u64 = 10;
const START_MS: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z
const HOUR: i64 = 3_600_000;

fn usage() -> ! {
    eprintln!("usage: gen_verify_archive CONFIG STREAM SHARDS FLUSHES HOURS");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        usage();
    }
    let parse = |s: &str| s.parse::<u64>().unwrap_or_else(|_| usage());
    let stream = args[2].clone();
    let (shards, flushes, hours) = (parse(&args[3]), parse(&args[4]), parse(&args[5]));
    let sources = fluxcap::config::Sources::from_env(Some(args[1].clone().into()));
    let archive = match fluxcap::config::load(&sources) {
        Ok(cfg) => match Archive::open(&cfg).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..shards {
        let archive = archive.clone();
        let stream = stream.clone();
        tasks.spawn(async move {
            let shard: Arc<str> = format!("shardId-{s:012}").into();
            let settings = ParquetSettings::default();
            let mut n = 0u64;
            for f in 0..flushes {
                let records: Vec<Record> = (0..hours * PER_FILE)
                    .map(|j| {
                        n += 1;
                        let hour = (f * hours + j / PER_FILE) as i64;
                        Record {
                            shard_id: shard.clone(),
                            sequence_number: format!("4963{s:04}{n:048}").into(),
                            subsequence_number: 0,
                            partition_key: format!("customer-{}", n % 997),
                            explicit_hash_key: None,
                            arrival_ms: START_MS + hour * HOUR + (j % PER_FILE) as i64 * 1000,
                            data: Bytes::from(format!(
                                r#"{{"event_id":"e-{s}-{n}","type":"paid","amount":{}}}"#,
                                n % 10_000
                            )),
                        }
                    })
                    .collect();
                write_flush(&archive, &settings, &stream, &shard, &records).await?;
            }
            Ok::<u64, fluxcap::Error>(n)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
    eprintln!(
        "wrote {total} records in {} files of stream {stream} in {:.1}s",
        shards * flushes * hours,
        started.elapsed().as_secs_f64()
    );
}
