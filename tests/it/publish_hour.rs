//! `archive.publish = "hour"`: a shard's committed flushes of a closed hour
//! are published as one file (or files of `archive.publish_target_size`);
//! until then they stay staged, and `fluxcap sql` and `verify` see them.

use std::collections::{BTreeMap, BTreeSet};

use fluxcap::archive::checkpoint::PublishPolicy;
use fluxcap::archive::ingest::write_flush_with;
use fluxcap::archive::key_index::KeyIndex;
use fluxcap::archive::layout::parse_data_file_name;
use fluxcap::archive::writer::ParquetSettings;
use fluxcap::record::Record;

use crate::harness::*;

const HOUR: i64 = 3_600_000;

/// `n` records of `shard` from sequence `from`, arriving in `hour`, with
/// incompressible 2 KB payloads.
fn records(shard: &str, from: usize, n: usize, hour: i64) -> Vec<Record> {
    (from..from + n)
        .map(|i| {
            let data: Vec<u8> = (0..2048).map(|_| rand::random::<u8>()).collect();
            Record {
                shard_id: shard.into(),
                sequence_number: format!("4960{:052}", i + 1).into(),
                subsequence_number: 0,
                partition_key: format!("k{}", i % 13),
                explicit_hash_key: None,
                arrival_ms: hour + (i as i64 % 1000) * 1000,
                data: data.into(),
            }
        })
        .collect()
}

/// Published data files (relative path → record count from the name), by hour folder.
fn published(table: &std::path::Path) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (hour, name) in published_names(table) {
        let parsed = parse_data_file_name(&name).unwrap_or_else(|| panic!("{name}"));
        out.entry(hour).or_default().push(parsed.count);
    }
    out
}

/// Published data files: (`dt=…/hr=…`, file name).
fn published_names(table: &std::path::Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for day in std::fs::read_dir(table).unwrap().flatten() {
        let d = day.file_name().to_string_lossy().to_string();
        if !d.starts_with("dt=") {
            continue;
        }
        for hour in std::fs::read_dir(day.path()).unwrap().flatten() {
            let h = hour.file_name().to_string_lossy().to_string();
            for f in std::fs::read_dir(hour.path()).unwrap().flatten() {
                let name = f.file_name().to_string_lossy().to_string();
                out.push((format!("{d}/{h}"), name));
            }
        }
    }
    out
}

#[test]
fn closed_hours_are_published_merged_and_open_ones_stay_staged() {
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "",
        &[("hourly", "binary")],
    );
    let archive = local_archive(&ws.archive);
    let table = ws.archive.join("hourly");
    let policy = PublishPolicy {
        hourly: true,
        target_size: 1 << 20,
        settings: ParquetSettings::default(),
    };
    let shard = "shardId-000000000000";
    // Two days ago, 10:00 and 11:00 UTC.
    let h = (chrono::Utc::now().timestamp_millis() / (24 * HOUR) - 2) * 24 * HOUR + 10 * HOUR;
    let rt = rt();
    let mut all = Vec::new();
    // Six flushes of hour 10 (≈200 KB each): the hour is not closed yet.
    for f in 0..6 {
        let recs = records(shard, f * 100, 100, h);
        rt.block_on(write_flush_with(
            &archive,
            &policy,
            "hourly",
            shard,
            &recs,
            Some(h),
        ))
        .unwrap();
        all.extend(recs);
    }
    assert!(
        published(&table).is_empty(),
        "nothing is published before the hour closes"
    );
    let n = ws.sql_count("SELECT count(*) AS n FROM archive.hourly");
    assert_eq!(
        n as usize,
        all.len(),
        "staged, committed records are queryable"
    );
    let out = ws.ok(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no gaps, no duplicates") && text.contains("not published yet"),
        "{text}"
    );

    // A record of 11:00 closes 10:00: its six flushes become files of ≤ 1 MiB.
    let recs = records(shard, 600, 50, h + HOUR);
    rt.block_on(write_flush_with(
        &archive,
        &policy,
        "hourly",
        shard,
        &recs,
        Some(h + HOUR),
    ))
    .unwrap();
    all.extend(recs);
    let files = published(&table);
    assert_eq!(files.len(), 1, "{files:?}");
    let counts = files.values().next().unwrap();
    assert_eq!(counts.iter().sum::<usize>(), 600, "{files:?}");
    assert!(
        counts.len() >= 2 && counts.len() < 6,
        "merged into files of about 1 MiB: {counts:?}"
    );
    let got = read_local("pyarrow", &table);
    assert_eq!(got.len(), 600);
    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));
    assert_eq!(
        ws.sql_count("SELECT count(DISTINCT sequence_number) AS n FROM archive.hourly") as usize,
        all.len()
    );

    // The clock closes 11:00 too (an idle shard).
    let recs = records(shard, 650, 10, h + HOUR);
    rt.block_on(write_flush_with(
        &archive,
        &policy,
        "hourly",
        shard,
        &recs,
        Some(chrono::Utc::now().timestamp_millis()),
    ))
    .unwrap();
    all.extend(recs);
    let files = published(&table);
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(
        files.values().nth(1).unwrap(),
        &vec![60],
        "one merged file for 11:00"
    );
    let got = read_local("duckdb", &table);
    assert_eq!(got.len(), all.len());
    let out = ws.ok(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no gaps, no duplicates") && !text.contains("not published"),
        "{text}"
    );

    // Every published file, the merged ones too, has a key summary that a
    // lookup by key can use (see `archive::key_index`).
    let names = published_names(&table);
    let days: BTreeSet<String> = names.iter().map(|(h, _)| h[3..13].to_string()).collect();
    let index = rt.block_on(KeyIndex::load(
        &archive,
        "hourly",
        days.into_iter().collect(),
    ));
    let key = |k: &str| BTreeSet::from([k.to_string()]);
    for (_, name) in &names {
        assert!(index.has(name), "no key summary of {name}");
        assert!(index.may_hold_any(name, &key("k3")), "{name}");
        assert!(!index.may_hold_any(name, &key("zz")), "{name}");
    }
}

#[test]
fn the_archiver_keeps_an_open_hour_staged_under_hourly_publication() {
    let k = ferrokinesis(false);
    let stream = unique("hourly");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 1));
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "publish = \"hour\"\n[archive.flush]\nmax_age = \"100ms\"",
        &[(&stream, "json")],
    );
    let mut puts = Vec::new();
    for seed in 0..3 {
        puts.extend(rt.block_on(put_records(&c, &stream, &orders(40, 50 + seed))));
        ws.ok(&["archive", "--once"]);
    }
    let table = ws.archive.join(&stream);
    // Records of the current hour are not published (an hour boundary
    // crossed during the test may publish the previous hour: one file).
    let now_hour = chrono::Utc::now().timestamp_millis() / HOUR * HOUR;
    let (dt, hr) = fluxcap::archive::layout::partition_of(now_hour);
    let files = if table.exists() {
        published(&table)
    } else {
        BTreeMap::new()
    };
    assert!(
        !files.contains_key(&format!("dt={dt}/hr={hr}")),
        "{files:?}"
    );
    assert!(files.values().all(|v| v.len() == 1), "{files:?}");
    let rows = ws.sql(&format!(
        "SELECT sequence_number FROM archive.{} ORDER BY 1",
        q(&stream)
    ));
    assert_eq!(rows.len(), puts.len());
    // The positions table (read by DuckDB) stops before the first staged
    // record, at or after every published one.
    let key = |s: &str, sub: i64| (s.len(), s.to_string(), sub);
    let o = std::process::Command::new(python())
        .arg(root().join("scripts/py/positions.py"))
        .args(["read", "--file"])
        .arg(
            ws.archive
                .join(format!("fluxcap-positions/{stream}/positions.parquet")),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table_rows = parse_json_lines(&o.stdout);
    assert_eq!(
        table_rows.len(),
        2,
        "one shard and the version: {table_rows:?}"
    );
    let row = &table_rows[0];
    assert_eq!(row["finished"], false);
    let at = row["sequence_number"]
        .as_str()
        .map(|s| key(s, row["subsequence_number"].as_i64().unwrap()));
    let staged = ws.sql(&format!(
        "SELECT sequence_number, subsequence_number FROM archive.{} WHERE dt = '{dt}' AND hr = '{hr}'",
        q(&stream)
    ));
    assert!(!staged.is_empty());
    for r in &staged {
        let k = key(
            r["sequence_number"].as_str().unwrap(),
            r["subsequence_number"].as_i64().unwrap_or(0),
        );
        assert!(
            at.as_ref().is_none_or(|a| *a < k),
            "{row} names a staged record {r}"
        );
    }
    if table.exists() {
        for r in read_local("duckdb", &table) {
            let k = key(&r.sequence_number, r.subsequence_number);
            assert!(
                at.as_ref().is_some_and(|a| k <= *a),
                "{row} is before the published {k:?}"
            );
        }
    }
    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));
}
