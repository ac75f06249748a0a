//! Build a synthetic archive of realistic JSON events with the library's own
//! writer and commit protocol, for `scripts/bench-query` and
//! `scripts/bench-replay`.
//!
//! ```text
//! cargo run --release --example gen_archive -- DIR STREAM EVENTS DAYS SHARDS \
//!     [--flush-minutes M] [--publish flush|hour]
//! ```
//!
//! Events are spread evenly over DAYS days ending 2026-11-20T00:00Z, across
//! SHARDS shards (`shardId-000000000100` on), each shard written in flushes
//! of at most 200,000 records — or, with `--flush-minutes M`, in one flush
//! per M minutes of arrival time, as an archiver with `archive.flush.max_age
//! = "Mm"` on a steady stream writes them. `--publish hour` publishes them as
//! `archive.publish = "hour"` does: each flush tells the checkpoint that the
//! hours ended by its last arrival are closed, so a shard's flushes of an
//! hour are merged into one file (the last flush closes every hour).
//! The payload is an order event of about 350 bytes; keys (`customer-N`) and
//! field values repeat the way real traffic does.

use std::sync::Arc;

use bytes::Bytes;
use fluxcap::archive::checkpoint::PublishPolicy;
use fluxcap::archive::ingest::write_flush_with;
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
    eprintln!(
        "usage: gen_archive DIR STREAM EVENTS DAYS SHARDS [--flush-minutes M] [--publish flush|hour]"
    );
    std::process::exit(2)
}

/// How the flushes are cut and published.
#[derive(Clone, Copy)]
struct Flushes {
    /// One flush per this many minutes of arrival time; `None`: by count.
    minutes: Option<u64>,
    /// Hourly publication (`archive.publish = "hour"`).
    hourly: bool,
}

fn parse_flags(rest: &[String]) -> Flushes {
    let mut f = Flushes {
        minutes: None,
        hourly: false,
    };
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match (flag.as_str(), value.as_str()) {
            ("--flush-minutes", m) => {
                f.minutes = Some(m.parse().ok().filter(|&m| m > 0).unwrap_or_else(|| usage()))
            }
            ("--publish", "flush") => f.hourly = false,
            ("--publish", "hour") => f.hourly = true,
            _ => usage(),
        }
    }
    f
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        usage();
    }
    let flushes = parse_flags(&args[6..]);
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
            let policy = PublishPolicy {
                hourly: flushes.hourly,
                settings: ParquetSettings::default(),
                ..PublishPolicy::default()
            };
            let arrival =
                |j: u64| start_ms + (j as i128 * span_ms as i128 / per_shard as i128) as i64;
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (s + 1);
            let mut done = 0u64;
            while done < per_shard {
                let n = match flushes.minutes {
                    None => (per_shard - done).min(FLUSH as u64),
                    Some(m) => {
                        // Up to the end of the flush window of record `done`.
                        let window = (m * 60_000) as i64;
                        let end = start_ms + ((arrival(done) - start_ms) / window + 1) * window;
                        (done..per_shard).take_while(|&j| arrival(j) < end).count() as u64
                    }
                };
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
                            arrival_ms: arrival(j),
                            data: Bytes::from(body),
                        }
                    })
                    .collect();
                done += n;
                // The flush happens at its last arrival (at the end, at the
                // end of the span: every hour is closed then).
                let now = if done == per_shard {
                    END_MS
                } else {
                    arrival(done - 1) + 1
                };
                write_flush_with(&archive, &policy, &stream, &shard, &records, Some(now)).await?;
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
