//! `fluxcap sql` against the real S3 server through the test proxy, where
//! every request is a round trip: a query that must consult every file
//! (a key lookup over several days) opens each data file with at most 1.2
//! GETs on average — one ranged read of the tail with footer, page index and
//! bloom filters — and answers the same as DuckDB over a local copy.

use std::collections::BTreeMap;

use fluxcap::archive::ingest::write_flush;
use fluxcap::archive::key_index::KEYS_DIR;
use fluxcap::archive::store::Archive;
use fluxcap::archive::writer::ParquetSettings;
use fluxcap::record::Record;
use object_store::ObjectStoreExt;

use crate::harness::*;
use crate::proxy::Proxy;

const HOUR: i64 = 3_600_000;
/// 2026-11-20T00:00:00Z
const T0: i64 = 1_795_132_800_000;
const PREFIX: &str = "arch";
const SHARDS: usize = 2;
const HOURS: usize = 48;
const PER_HOUR: usize = 40;

/// One shard's records over `hours` hours, `PER_HOUR` per hour, keyed by
/// `key(i, shard)`, with JSON payloads holding `payload` random hex
/// characters (about half of it after zstd).
fn make_records(
    shard: usize,
    hours: usize,
    payload: usize,
    key: fn(usize, usize) -> String,
) -> Vec<Record> {
    (0..hours * PER_HOUR)
        .map(|i| {
            let hour = i / PER_HOUR;
            let noise: String = (0..payload)
                .map(|_| char::from(b"0123456789abcdef"[usize::from(rand::random::<u8>() % 16)]))
                .collect();
            Record {
                shard_id: format!("shardId-{shard:012}").into(),
                sequence_number: format!("4960{:052}", i + 1).into(),
                subsequence_number: 0,
                partition_key: key(i, shard),
                explicit_hash_key: None,
                arrival_ms: T0 + hour as i64 * HOUR + (i % PER_HOUR) as i64 * 1000,
                data: format!("{{\"i\":{i},\"noise\":\"{noise}\"}}")
                    .into_bytes()
                    .into(),
            }
        })
        .collect()
}

/// The key of record `i` of `shard`: `k5needle` in exactly two hours of
/// shard 0 (inside every file's min/max), `k7` and others in many files.
fn needle_key(i: usize, shard: usize) -> String {
    let hour = i / PER_HOUR;
    if shard == 0 && (hour == 5 || hour == 40) && i % PER_HOUR == 7 {
        "k5needle".to_string()
    } else {
        format!("k{}", (i * 7 + shard) % 211)
    }
}

/// One shard's records over `HOURS` hours with payloads of ~32 KB that
/// compress to about half (so each file, ~650 KB, is larger than
/// DataFusion's 512 KiB footer read).
fn records(shard: usize) -> Vec<Record> {
    make_records(shard, HOURS, 32_000, needle_key)
}

/// GETs of published data files, per file.
fn data_gets(p: &Proxy) -> BTreeMap<String, usize> {
    let mut per = BTreeMap::new();
    for r in p.requests() {
        let Some(path) = r.line.strip_prefix("GET ") else {
            continue;
        };
        let path = path.split(' ').next().unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default();
        if path.ends_with(".parquet") && !path.contains("_fluxcap") {
            *per.entry(path.to_string()).or_insert(0) += 1;
        }
    }
    per
}

/// Delete the key summaries of `stream` (`archive::key_index`); returns how many there were.
async fn remove_key_summaries(archive: &Archive, stream: &str) -> usize {
    let dir = archive
        .layout
        .stream_dir(stream)
        .join("_fluxcap")
        .join(KEYS_DIR);
    let objects = archive.list(&dir).await.unwrap();
    for o in &objects {
        archive.store.delete(&o.location).await.unwrap();
    }
    objects.len()
}

/// GETs of key summaries.
fn summary_gets(p: &Proxy) -> usize {
    p.requests()
        .iter()
        .filter(|r| {
            r.line.starts_with("GET ") && r.line.contains(&format!("/_fluxcap/{KEYS_DIR}/"))
        })
        .filter(|r| !r.line.contains("list-type"))
        .count()
}

#[test]
fn a_key_lookup_over_days_opens_each_file_with_one_request() {
    let s3 = s3();
    let bucket = unique("req");
    create_bucket(&s3, &bucket);
    let stream = unique("days");
    let rt = rt();
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let local = tempfile::tempdir().unwrap();
    let copy = local_archive(local.path());
    let settings = ParquetSettings::default();
    rt.block_on(async {
        for s in 0..SHARDS {
            let recs = records(s);
            write_flush(
                &direct,
                &settings,
                &stream,
                &format!("shardId-{s:012}"),
                &recs,
            )
            .await
            .unwrap();
            write_flush(
                &copy,
                &settings,
                &stream,
                &format!("shardId-{s:012}"),
                &recs,
            )
            .await
            .unwrap();
        }
    });
    // Files without key summaries (an archive written before them): every
    // file of the lookup is opened, each with one request.
    rt.block_on(remove_key_summaries(&direct, &stream));
    let proxy = rt.block_on(Proxy::start(s3.port));
    proxy.set_delay(5);
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        Some(&format!("s3://{bucket}/{PREFIX}")),
        Some(&proxy.endpoint()),
        "",
        &[(&stream, "json")],
    );
    let table = format!("archive.{}", q(&stream));

    // The key lookup over all days: every file must be consulted.
    let sql = |t: &str| {
        format!(
            "SELECT shard_id, sequence_number, dt, hr, octet_length(data) AS len \
             FROM {t} WHERE partition_key = 'k5needle' \
             ORDER BY shard_id, sequence_number"
        )
    };
    let got = ws.sql(&sql(&table));
    let per_file = data_gets(&proxy);
    let files = SHARDS * HOURS;
    let gets: usize = per_file.values().sum();
    assert_eq!(got.len(), 2, "{got:?}");
    let want = duckdb(
        &local.path().join(&stream),
        "SELECT shard_id, sequence_number, dt, hr, octet_length(data) AS len FROM t \
         WHERE partition_key = 'k5needle' ORDER BY shard_id, sequence_number",
    );
    assert_eq!(got, want);
    assert!(
        per_file.len() <= files,
        "opened {} files of {files}",
        per_file.len()
    );
    let per_opened = gets as f64 / per_file.len().max(1) as f64;
    assert!(
        per_opened <= 1.2,
        "{gets} GETs for {} opened files ({per_opened:.2} per file): {per_file:?}",
        per_file.len()
    );

    // Count per hour over one day: the same answer as DuckDB, also at most
    // 1.2 GETs per opened file (no filter on row values: statistics only).
    proxy.clear_requests();
    let per_hour = |t: &str| {
        format!("SELECT hr, count(*) AS n FROM {t} WHERE dt = '2026-11-21' GROUP BY hr ORDER BY hr")
    };
    let got = ws.sql(&per_hour(&table));
    assert_eq!(got, duckdb(&local.path().join(&stream), &per_hour("t")));
    assert_eq!(got.len(), 24, "{got:?}");
    let per_file = data_gets(&proxy);
    let gets: usize = per_file.values().sum();
    assert!(per_file.len() <= SHARDS * 24, "{per_file:?}");
    assert!(
        gets as f64 <= 1.2 * per_file.len() as f64,
        "{gets} GETs for {} files: {per_file:?}",
        per_file.len()
    );

    // A lookup of several keys, one of them nowhere: still correct, still
    // one request per file that holds none of them. (DataFusion uses bloom
    // filters for `=` and `IN`, not for an `OR` of different columns: such
    // a filter reads the data of every file, one more request each.)
    proxy.clear_requests();
    let got = ws.sql(&format!(
        "SELECT partition_key FROM {table} WHERE partition_key IN ('k5absent', 'k5needle')"
    ));
    assert_eq!(got.len(), 2, "{got:?}");
    let per_file = data_gets(&proxy);
    let gets: usize = per_file.values().sum();
    assert!(
        gets as f64 <= 1.2 * per_file.len() as f64,
        "{gets} GETs for {} files: {per_file:?}",
        per_file.len()
    );
}

/// Data files in the physical plan of `sql`; `None` when EXPLAIN shortened
/// the lists (a plan of many files).
fn files_in_plan(ws: &Workspace, sql: &str) -> Option<usize> {
    let plan = physical_plan(ws, sql);
    (!plan.contains("...")).then(|| plan.matches(".parquet").count())
}

/// Small records of one shard over `HOURS` hours.
fn small_records(shard: usize) -> Vec<Record> {
    make_records(shard, HOURS, 0, needle_key)
}

/// With the key summaries the writer leaves beside each flush, a key lookup
/// over all days reads the summaries (one object per flush and day) and
/// opens only the files that may hold the key — not every file of the days
/// (96 here, which the code before the summaries opened). Summaries that are
/// missing, unreadable or of an unknown version are ignored: the answer
/// stays the same, every file is opened again.
#[test]
fn a_key_lookup_over_days_opens_only_the_files_the_key_summaries_allow() {
    let s3 = s3();
    let bucket = unique("keys");
    create_bucket(&s3, &bucket);
    let stream = unique("days");
    let rt = rt();
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let local = tempfile::tempdir().unwrap();
    let copy = local_archive(local.path());
    let settings = ParquetSettings::default();
    rt.block_on(async {
        for s in 0..SHARDS {
            let shard = format!("shardId-{s:012}");
            let recs = small_records(s);
            // Two flushes per shard: the second starts in the middle of day 2.
            let (a, b) = recs.split_at(recs.len() * 3 / 4);
            for part in [a, b] {
                write_flush(&direct, &settings, &stream, &shard, part)
                    .await
                    .unwrap();
                write_flush(&copy, &settings, &stream, &shard, part)
                    .await
                    .unwrap();
            }
        }
    });
    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        Some(&format!("s3://{bucket}/{PREFIX}")),
        Some(&proxy.endpoint()),
        "",
        &[(&stream, "json")],
    );
    let table = format!("archive.{}", q(&stream));
    let files = SHARDS * HOURS;
    let lookup = |t: &str, keys: &str| {
        format!(
            "SELECT shard_id, sequence_number, dt, hr, partition_key FROM {t} \
             WHERE partition_key IN ({keys}) ORDER BY shard_id, sequence_number"
        )
    };
    let want = |keys: &str| duckdb(&local.path().join(&stream), &lookup("t", keys));

    let got = ws.sql(&lookup(&table, "'k5needle'"));
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got, want("'k5needle'"));
    let opened = data_gets(&proxy);
    // Two files hold the key; a bloom filter (1 % false positives) may let
    // one or two more through.
    assert!(
        opened.len() <= 4,
        "opened {} of {files} files",
        opened.len()
    );
    // Per shard: one summary of day 1, two of day 2 (the flushes meet there).
    assert_eq!(summary_gets(&proxy), SHARDS * 3);
    let total = proxy.requests().len();
    assert!(total <= 30, "{total} requests: {:#?}", proxy.requests());

    // The same archive in a local directory: the same answer, and the plan
    // holds only the files the summaries allow (opening a local file costs
    // its footer and bloom filter reads too).
    let lws = Workspace::new(
        "http://127.0.0.1:9",
        Some(local.path().to_str().unwrap()),
        None,
        "",
        &[(&stream, "json")],
    );
    assert_eq!(lws.sql(&lookup(&table, "'k5needle'")), want("'k5needle'"));
    let planned = files_in_plan(&lws, &lookup(&table, "'k5needle'"));
    assert!(
        planned.is_some_and(|n| (2..=4).contains(&n)),
        "the local plan holds {planned:?} of {files} files (None: too many to list)"
    );

    // A key in many files, with one in two: every file that holds one is read.
    proxy.clear_requests();
    let keys = "'k5needle', 'k7'";
    let got = ws.sql(&lookup(&table, keys));
    assert_eq!(got, want(keys));
    assert!(got.len() > 2, "{got:?}");
    assert!(data_gets(&proxy).len() < files);

    // Without summaries, and with summaries that cannot be used: the same
    // answer, every file opened.
    let removed = rt.block_on(remove_key_summaries(&direct, &stream));
    assert_eq!(removed, SHARDS * 3);
    let dir = direct
        .layout
        .stream_dir(&stream)
        .join("_fluxcap")
        .join(KEYS_DIR)
        .join("dt=2026-11-20");
    rt.block_on(async {
        direct
            .store
            .put(&dir.clone().join("x.json"), b"not json".to_vec().into())
            .await
            .unwrap();
        direct
            .store
            .put(
                &dir.join("y.json"),
                br#"{"version":99,"files":[]}"#.to_vec().into(),
            )
            .await
            .unwrap();
    });
    proxy.clear_requests();
    let got = ws.sql(&lookup(&table, "'k5needle'"));
    assert_eq!(got, want("'k5needle'"));
    assert_eq!(data_gets(&proxy).len(), files);
}

/// A query over one hour by arrival time, which decodes every file of the
/// hour, opens each with one request: files of ~100–200 KB (more than the
/// 64 KiB tail, less than the 512 KiB read whole) are read whole by their
/// first read instead of tail first and data second. A `count(*)` per hour
/// (no record column) still reads only tails.
#[test]
fn an_hour_by_arrival_time_reads_each_small_file_with_one_request() {
    let s3 = s3();
    let bucket = unique("hour");
    create_bucket(&s3, &bucket);
    let stream = unique("hour");
    let rt = rt();
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let settings = ParquetSettings::default();
    let hours = 4;
    let mut all = Vec::new();
    rt.block_on(async {
        for s in 0..SHARDS {
            let recs = make_records(s, hours, 8_000, |i, shard| {
                format!("k{}", (i * 7 + shard) % 23)
            });
            write_flush(
                &direct,
                &settings,
                &stream,
                &format!("shardId-{s:012}"),
                &recs,
            )
            .await
            .unwrap();
            all.extend(recs);
        }
    });
    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        Some(&format!("s3://{bucket}/{PREFIX}")),
        Some(&proxy.endpoint()),
        "",
        &[(&stream, "json")],
    );
    let table = format!("archive.{}", q(&stream));
    // Hour 2 of the first day, by arrival time.
    let (from, to) = (T0 + 2 * HOUR, T0 + 3 * HOUR);
    let got = ws.sql(&format!(
        "SELECT count(*) AS n, count(DISTINCT partition_key) AS keys FROM {table} \
         WHERE approximate_arrival_timestamp >= to_timestamp_millis({from}) \
         AND approximate_arrival_timestamp < to_timestamp_millis({to})"
    ));
    let in_hour: Vec<&Record> = all
        .iter()
        .filter(|r| (from..to).contains(&r.arrival_ms))
        .collect();
    let keys: std::collections::BTreeSet<&str> =
        in_hour.iter().map(|r| r.partition_key.as_str()).collect();
    assert_eq!(
        got,
        vec![serde_json::json!({"n": in_hour.len(), "keys": keys.len()})]
    );
    let sizes = rt.block_on(direct.list(&direct.layout.stream_dir(&stream)));
    let sizes: Vec<u64> = sizes
        .unwrap()
        .iter()
        .filter(|o| o.location.as_ref().contains("hr=02"))
        .map(|o| o.size)
        .collect();
    assert!(
        sizes.len() == SHARDS && sizes.iter().all(|&s| s > 64 * 1024 && s < 512 * 1024),
        "files of the hour between the tail and the whole-file sizes: {sizes:?}"
    );
    let per_file = data_gets(&proxy);
    assert_eq!(per_file.len(), SHARDS, "{per_file:?}");
    assert!(
        per_file.values().all(|&n| n == 1),
        "one GET per opened file: {per_file:?}"
    );

    // Count per hour over the day: tails only (the data is not needed).
    proxy.clear_requests();
    let got = ws.sql(&format!(
        "SELECT hr, count(*) AS n FROM {table} GROUP BY hr ORDER BY hr"
    ));
    assert_eq!(got.len(), hours, "{got:?}");
    let per_file = data_gets(&proxy);
    assert_eq!(per_file.len(), SHARDS * hours, "{per_file:?}");
    assert!(per_file.values().all(|&n| n == 1), "{per_file:?}");
    let tails: u64 = proxy
        .requests()
        .iter()
        .filter(|r| r.line.starts_with("GET ") && r.line.contains(".parquet"))
        .map(|r| r.response_bytes as u64)
        .sum();
    assert!(
        tails <= (SHARDS * hours) as u64 * 64 * 1024 + 64 * 1024,
        "{tails} bytes for the tails of {} files",
        SHARDS * hours
    );

    // A long-lived process (`fluxcap serve`) keeps what it read: the same
    // query again lists the hour but reads no data file.
    let token = crate::server::token();
    let server = crate::server::serve(&ws, &token);
    let body = serde_json::json!({"sql": format!(
        "SELECT count(*) AS n, count(DISTINCT partition_key) AS keys FROM {table} \
         WHERE approximate_arrival_timestamp >= to_timestamp_millis({from}) \
         AND approximate_arrival_timestamp < to_timestamp_millis({to})"
    )})
    .to_string();
    let ask = || {
        let a = crate::server::http(
            server.port,
            "POST",
            "/api/sql",
            Some(&token),
            body.as_bytes(),
        );
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        a.json()["rows"].clone()
    };
    proxy.clear_requests();
    let first = ask();
    assert_eq!(data_gets(&proxy).len(), SHARDS);
    proxy.clear_requests();
    assert_eq!(ask(), first);
    assert_eq!(
        data_gets(&proxy),
        BTreeMap::new(),
        "the second query reads no data file"
    );
    assert_eq!(first, serde_json::json!([[in_hour.len(), keys.len()]]));
}

/// Many small flushes of one day: the writer merges the day's summary
/// pieces 8 at a time, and 8 merged objects into one of the next level, so
/// a lookup reads a few objects instead of one per flush, and still opens
/// only the files that may hold the key (merged objects describe every file
/// of the objects they replaced).
#[test]
fn many_flushes_of_a_day_leave_few_key_summaries() {
    let s3 = s3();
    let bucket = unique("merge");
    create_bucket(&s3, &bucket);
    let stream = unique("merge");
    let rt = rt();
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let local = tempfile::tempdir().unwrap();
    let copy = local_archive(local.path());
    let settings = ParquetSettings::default();
    let shard = "shardId-000000000000";
    let flushes = 80;
    // 80 flushes of 10 records each, all on one day (hours 0–19, four per hour).
    let recs: Vec<Record> = (0..flushes * 10)
        .map(|i| Record {
            shard_id: shard.into(),
            sequence_number: format!("4960{:052}", i + 1).into(),
            subsequence_number: 0,
            partition_key: if i == 333 {
                "needle".to_string()
            } else {
                format!("k{}", i % 97)
            },
            explicit_hash_key: None,
            arrival_ms: T0 + (i / 40) as i64 * HOUR + (i % 40) as i64 * 1000,
            data: format!("{{\"i\":{i}}}").into_bytes().into(),
        })
        .collect();
    rt.block_on(async {
        for part in recs.chunks(10) {
            write_flush(&direct, &settings, &stream, shard, part)
                .await
                .unwrap();
            write_flush(&copy, &settings, &stream, shard, part)
                .await
                .unwrap();
        }
    });
    let day = direct
        .layout
        .stream_dir(&stream)
        .join("_fluxcap")
        .join(KEYS_DIR)
        .join("dt=2026-11-20");
    let objects = rt.block_on(direct.list(&day)).unwrap();
    let names: Vec<String> = objects
        .iter()
        .filter_map(|o| o.location.filename().map(str::to_string))
        .collect();
    // Checks after writes 1, 9, 17, …, 73: nine level-1 objects were made,
    // the first eight of them merged into one of level 2.
    let level = |l: &str| names.iter().filter(|n| n.starts_with(l)).count();
    assert_eq!(level("merged-2-"), 1, "{names:?}");
    assert_eq!(level("merged-1-"), 1, "{names:?}");
    assert_eq!(names.len(), 2 + 7, "{names:?}");
    // Every data file is described, by the merged object or a piece.
    let described: std::collections::BTreeSet<String> = objects
        .iter()
        .flat_map(|o| {
            let body = rt.block_on(direct.get_bytes(&o.location)).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let data: std::collections::BTreeSet<String> = rt
        .block_on(direct.list(&direct.layout.stream_dir(&stream)))
        .unwrap()
        .iter()
        .filter(|o| !o.location.as_ref().contains("_fluxcap"))
        .filter_map(|o| o.location.filename().map(str::to_string))
        .collect();
    assert_eq!(data.len(), flushes);
    assert_eq!(described, data);

    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        Some(&format!("s3://{bucket}/{PREFIX}")),
        Some(&proxy.endpoint()),
        "",
        &[(&stream, "json")],
    );
    let sql = |t: &str| {
        format!(
            "SELECT sequence_number, partition_key FROM {t} \
             WHERE partition_key = 'needle' ORDER BY sequence_number"
        )
    };
    let got = ws.sql(&sql(&format!("archive.{}", q(&stream))));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got, duckdb(&local.path().join(&stream), &sql("t")));
    assert_eq!(summary_gets(&proxy), names.len());
    let opened = data_gets(&proxy);
    assert!(
        opened.len() <= 3,
        "opened {} of {flushes} files",
        opened.len()
    );
}
