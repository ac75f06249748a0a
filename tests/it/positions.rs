//! The positions table (`<root>/fluxcap-positions/<stream>/positions.parquet`),
//! read with DuckDB (scripts/py/positions.py), against the published files
//! (read with DuckDB too) and the checkpoints:
//!
//! - after a run, each shard's row is its last published record, with the
//!   stream's identity and the format version;
//! - an archiver killed while the table's write is held (its flush committed
//!   and published) leaves the table behind by that one commit and never
//!   ahead of the published files; the next run brings it level;
//! - across a split, the parent's row is finished at its last record and
//!   each child has its own row.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::proxy::Proxy;

const FLUSHES: &str = "[archive.flush]\nmax_age = \"200ms\"\n[archiver]\npoll_interval = \"100ms\"\nmetrics_bind = \"\"\nlease_ttl = \"3s\"";

/// A row of the positions table, as DuckDB read it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    position: Option<(String, i64)>,
    sequence_key: Option<String>,
    finished: bool,
    records: i64,
    arn: String,
}

/// The table's rows by shard id, and its footer's format version.
fn read_positions(args: &[&str]) -> (BTreeMap<String, Row>, String) {
    let out = std::process::Command::new(python())
        .arg(root().join("scripts/py/positions.py"))
        .arg("read")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "positions.py read: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows = BTreeMap::new();
    let mut version = String::new();
    for v in parse_json_lines(&out.stdout) {
        if let Some(ver) = v.get("version") {
            version = ver.as_str().unwrap_or_default().to_string();
            continue;
        }
        let position = v["sequence_number"].as_str().map(|s| {
            (
                s.to_string(),
                v["subsequence_number"].as_i64().unwrap_or(-1),
            )
        });
        rows.insert(
            v["shard_id"].as_str().unwrap().to_string(),
            Row {
                position,
                sequence_key: v["sequence_key"].as_str().map(str::to_string),
                finished: v["finished"].as_bool().unwrap(),
                records: v["records"].as_i64().unwrap(),
                arn: v["stream_arn"].as_str().unwrap_or_default().to_string(),
            },
        );
    }
    (rows, version)
}

/// Kinesis order of positions: sequence numbers as numbers, then sub-sequence.
fn key(p: &(String, i64)) -> (usize, String, i64) {
    (p.0.len(), p.0.clone(), p.1)
}

/// Published positions per shard, ascending.
fn published(records: &[Archived]) -> BTreeMap<String, Vec<(String, i64)>> {
    let mut m: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    for r in records {
        m.entry(r.shard_id.clone())
            .or_default()
            .push((r.sequence_number.clone(), r.subsequence_number));
    }
    for v in m.values_mut() {
        v.sort_by_key(key);
    }
    m
}

/// A row is never ahead of the published files: it names a published
/// record (or none), so every record up to it is published. Returns how
/// many published records of the shard come after it.
fn after_row(row: &Row, published: &[(String, i64)], shard: &str) -> usize {
    match &row.position {
        None => published.len(),
        Some(p) => {
            let i = published.iter().position(|q| q == p).unwrap_or_else(|| {
                panic!("the row of {shard} names {p:?}, which no published file holds")
            });
            published.len() - i - 1
        }
    }
}

#[test]
fn the_positions_table_follows_each_commit_and_is_never_ahead_of_the_published_files() {
    let k = kinesis();
    let s3 = s3();
    let stream = unique("pos");
    let bucket = unique("pos");
    create_bucket(&s3, &bucket);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(100, 1)).await
    });
    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&format!("s3://{bucket}/a")),
        Some(&proxy.endpoint()),
        FLUSHES,
        &[(&stream, "json")],
    );
    let key_of = format!("a/fluxcap-positions/{stream}/positions.parquet");
    let table_args = [
        "--s3-endpoint",
        &s3.endpoint(),
        "--bucket",
        &bucket,
        "--key",
        &key_of,
    ];
    let prefix = format!("a/{stream}");
    let data_args = [
        "--s3-endpoint",
        &s3.endpoint(),
        "--bucket",
        &bucket,
        "--prefix",
        &prefix,
    ];

    // After a run: each shard's row is its last published record.
    ws.ok(&["archive", "--once"]);
    let (rows, version) = read_positions(&table_args);
    assert_eq!(version, "1");
    let pubd = published(&read_archive("duckdb", &data_args));
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (shard, row) in &rows {
        let last = pubd[shard].last().cloned();
        assert_eq!(row.position, last, "{shard}");
        assert!(!row.finished);
        assert_eq!(row.records as usize, pubd[shard].len());
        assert!(row.arn.contains(&stream), "{row:?}");
        let p = row.position.clone().unwrap_or_default();
        assert_eq!(
            row.sequence_key.as_deref(),
            Some(format!("{:0>129}", p.0).as_str())
        );
    }

    // An archiver killed while the table's write is held: its flushes are
    // committed and published, the table still has the rows before them.
    proxy.clear_requests();
    let mut archiver = ws.spawn_archiver();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The table is written once when the archiver starts (nothing changed).
    while !proxy
        .requests()
        .iter()
        .any(|r| r.line.starts_with("PUT ") && r.line.contains("/fluxcap-positions/"))
    {
        assert!(
            Instant::now() < deadline,
            "the archiver never wrote the table"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.hold_next("PUT", "/fluxcap-positions/");
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(100, 2))));
    rt.block_on(proxy.wait_held(Duration::from_secs(60)));
    archiver.kill().unwrap();
    archiver.wait().unwrap();

    let (held_rows, _) = read_positions(&table_args);
    assert_eq!(held_rows, rows, "the held write reached the store");
    let pubd = published(&read_archive("duckdb", &data_args));
    let mut behind = 0;
    for (shard, row) in &held_rows {
        let after = after_row(row, &pubd[shard], shard);
        // Behind by at most one commit: what is published after the row is
        // what the shard's latest checkpoint added to the one before it.
        let gens = checkpoints(
            &s3,
            &bucket,
            &format!("{prefix}/_fluxcap/checkpoints/{shard}/"),
        );
        let latest = gens.last().map_or(0, |g| g["records"].as_i64().unwrap());
        let before = gens
            .iter()
            .rev()
            .nth(1)
            .map_or(0, |g| g["records"].as_i64().unwrap());
        // (A shard may also have been killed between its commit and its
        // publication: committed records need not all be published yet.)
        assert!(pubd[shard].len() as i64 <= latest, "{shard}");
        assert!(
            after as i64 <= latest - before,
            "{shard}: {after} published records after the row, the latest commit added {}",
            latest - before
        );
        behind += after;
    }
    assert!(
        behind > 0,
        "no flush was committed while the write was held"
    );

    // The next run brings the table level with the published files.
    ws.ok(&["archive", "--once"]);
    let (rows, _) = read_positions(&table_args);
    let got = read_archive("duckdb", &data_args);
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "after the restart",
    );
    let pubd = published(&got);
    for (shard, row) in &rows {
        assert_eq!(row.position, pubd[shard].last().cloned(), "{shard}");
        assert_eq!(after_row(row, &pubd[shard], shard), 0);
    }
}

/// Every checkpoint generation under `prefix`, oldest first.
fn checkpoints(s3: &Server, bucket: &str, prefix: &str) -> Vec<serde_json::Value> {
    let o = aws_cli(s3)
        .args(["s3", "ls"])
        .arg(format!("s3://{bucket}/{prefix}"))
        .output()
        .unwrap();
    let mut names: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let o = aws_cli(s3)
                .args(["s3", "cp", "--only-show-errors"])
                .arg(format!("s3://{bucket}/{prefix}{n}"))
                .arg("-")
                .output()
                .unwrap();
            serde_json::from_slice(&o.stdout).unwrap()
        })
        .collect()
}

#[test]
fn positions_follow_a_shard_split() {
    let k = kinesis();
    let stream = unique("possplit");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(50, 3)).await;
        split_first_shard(&c, &stream).await;
        put_records(&c, &stream, &orders(100, 4)).await;
    });
    let ws = Workspace::new(&k.endpoint(), None, None, FLUSHES, &[(&stream, "json")]);
    ws.ok(&["archive", "--once"]);
    let file = ws
        .archive
        .join(format!("fluxcap-positions/{stream}/positions.parquet"));
    let (rows, _) = read_positions(&["--file", file.to_str().unwrap()]);
    let pubd = published(&read_local("duckdb", &ws.archive.join(&stream)));
    assert_eq!(rows.len(), 3, "parent and two children: {rows:?}");
    let parent = "shardId-000000000000";
    assert!(rows[parent].finished, "{rows:?}");
    assert_eq!(pubd[parent].len(), 50);
    let mut children = 0;
    for (shard, row) in &rows {
        assert_eq!(
            row.position,
            pubd.get(shard).and_then(|v| v.last().cloned()),
            "{shard}"
        );
        if shard != parent {
            assert!(!row.finished, "{shard}");
            children += pubd.get(shard).map_or(0, Vec::len);
        }
    }
    assert_eq!(children, 100);
}
