//! Build a synthetic archive of realistic JSON events with the library's own
//! writer and commit protocol, for `scripts/bench-query` and
//! `scripts/bench-replay`.
//!
//! ```text
//! cargo run --release --example gen_archive -- DIR STREAM EVENTS DAYS SHARDS
//! ```
//!
//! Events are spread evenly over DAYS days ending 2026-11-20T00:00Z, across
//! SHARDS shards (`shardId-000000000100` on), each shard written in flushes
//! of at most 200,000 records.
//! The payload is an order event of about 350 bytes; keys (`customer-N`) and
//! field values repeat the way real traffic does.

use std::sync::Arc;

use bytes::Bytes;
use fluxcap::archive::ingest::write_flush;
use fluxcap::archive::layout::Layout;
use fluxcap::archive::store::Archive;
use fluxcap::archive::writer::ParquetSettings;
use fluxcap::config::ArchiveLocation;
use fluxcap::record::Record;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

const FLUSH: usize = 200_000;
const END_MS: i64 = 1_795_132_800_000; // 2026-11-20T00:00:00Z

fn event(i: u64, rng: &mut u64) -> (String, String) {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let customer = next() % 50_000;
    let kind = [
        "created",
        "paid",
        "shipped",
        "delivered",
        "cancelled",
        "refunded",
    ][(next() % 6) as usize];
    let country = ["DE", "FR", "US", "GB", "IN", "BR", "JP", "ES"][(next() % 8) as usize];
    let device = ["ios", "android", "web"][(next() % 3) as usize];
    let amount = next() % 100_000;
    let items = 1 + next() % 5;
    let sku = next() % 9_000;
    let body = format!(
        r#"{{"event_id":"e-{i:012}","type":"{kind}","order_id":"o-{}","customer":"customer-{customer}","amount":{}.{:02},"currency":"EUR","country":"{country}","device":"{device}","items":[{{"sku":"sku-{sku:05}","qty":{items},"price":{}.99}}],"coupon":{},"session":"s-{:016x}","ua":"Mozilla/5.0 (compatible; shop/{}.{})"}}"#,
        i / 3,
        amount / 100,
        amount % 100,
        amount / 300,
        if next() % 5 == 0 {
            "\"WINTER10\""
        } else {
            "null"
        },
        next(),
        next() % 20,
        next() % 10,
    );
    (format!("customer-{customer}"), body)
}

fn usage() -> ! {
    eprintln!("usage: gen_archive DIR STREAM EVENTS DAYS SHARDS");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        usage();
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let stream = args[2].clone();
    let parse = |s: &str| s.parse::<u64>().unwrap_or_else(|_| usage());
    let (events, days, shards) = (parse(&args[3]), parse(&args[4]), parse(&args[5]).max(1));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        std::process::exit(1);
    }
    let store = match LocalFileSystem::new_with_prefix(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    let archive = Archive {
        store: Arc::new(store),
        location: ArchiveLocation::Local(dir.clone()),
        layout: Layout::new(Path::default()),
    };
    let span_ms = (days * 86_400_000) as i64;
    let start_ms = END_MS - span_ms;
    let per_shard = events / shards;
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..shards {
        let archive = archive.clone();
        let stream = stream.clone();
        tasks.spawn(async move {
            // From shardId-000000000100: never one of a local emulator's
            // shards (scripts/bench-query reads live records beside it).
            let shard: Arc<str> = format!("shardId-{:012}", s + 100).into();
            let settings = ParquetSettings::default();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (s + 1);
            let mut done = 0u64;
            while done < per_shard {
                let n = (per_shard - done).min(FLUSH as u64);
                let records: Vec<Record> = (done..done + n)
                    .map(|j| {
                        let i = j * shards + s;
                        let (key, body) = event(i, &mut rng);
                        Record {
                            shard_id: shard.clone(),
                            sequence_number: format!("4963{:04}{:048}", s, j + 1).into(),
                            subsequence_number: 0,
                            partition_key: key,
                            explicit_hash_key: None,
                            arrival_ms: start_ms
                                + (j as i128 * span_ms as i128 / per_shard as i128) as i64,
                            data: Bytes::from(body),
                        }
                    })
                    .collect();
                write_flush(&archive, &settings, &stream, &shard, &records).await?;
                done += n;
            }
            Ok::<u64, fluxcap::Error>(done)
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
        "wrote {total} events of stream {stream} under {}",
        dir.display()
    );
}
