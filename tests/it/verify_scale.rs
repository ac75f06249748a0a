//! `verify` and `status` over large archives, against the real S3 server
//! through the test proxy: `verify` reads only footers (ranged GETs), resumes
//! from its watermark (`--since-last`), and keeps working while files and
//! checkpoint generations move under it; finished shards come from the
//! stream's manifest instead of one read each.

use std::time::Duration;

use fluxcap::archive::checkpoint::{Commit, PublishPolicy, ShardCheckpoint, load_latest};
use fluxcap::archive::ingest::{write_flush, write_flush_with};
use fluxcap::archive::store::Archive;
use fluxcap::archive::writer::ParquetSettings;
use fluxcap::record::Record;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::harness::*;
use crate::proxy::Proxy;

const HOUR: i64 = 3_600_000;
/// 2026-11-20T00:00:00Z
const T0: i64 = 1_795_132_800_000;
const PREFIX: &str = "arch";

/// A workspace whose archive is `bucket` reached through `s3` (the proxy),
/// and whose Kinesis is `kinesis` (nothing listens there by default).
fn s3_workspace(s3: &str, bucket: &str, stream: &str, kinesis: Option<&str>) -> Workspace {
    Workspace::new(
        kinesis.unwrap_or("http://127.0.0.1:9"),
        Some(&format!("s3://{bucket}/{PREFIX}")),
        Some(s3),
        "",
        &[(stream, "json")],
    )
}

/// `n` records of `shard` from sequence `from`, spread over `hours` hours
/// from `hour0`, with incompressible payloads of `size` bytes.
fn records(
    shard: &str,
    from: usize,
    n: usize,
    hour0: i64,
    hours: usize,
    size: usize,
) -> Vec<Record> {
    (from..from + n)
        .map(|i| Record {
            shard_id: shard.into(),
            sequence_number: format!("4960{:052}", i + 1).into(),
            subsequence_number: 0,
            partition_key: format!("k{}", i % 13),
            explicit_hash_key: None,
            arrival_ms: hour0 + ((i - from) * hours / n) as i64 * HOUR + (i as i64 % 1000),
            data: (0..size)
                .map(|_| rand::random::<u8>())
                .collect::<Vec<u8>>()
                .into(),
        })
        .collect()
}

fn shard(i: usize) -> String {
    format!("shardId-{i:012}")
}

/// Published data files under the stream and their total size.
async fn data_files(a: &Archive, stream: &str) -> (Vec<String>, u64) {
    let dir = a.layout.stream_dir(stream);
    let objects: Vec<_> = a.store.list(Some(&dir)).try_collect().await.unwrap();
    let data: Vec<_> = objects
        .iter()
        .filter(|o| {
            o.location.as_ref().ends_with(".parquet") && !o.location.as_ref().contains("_fluxcap")
        })
        .collect();
    (
        data.iter().map(|o| o.location.to_string()).collect(),
        data.iter().map(|o| o.size).sum(),
    )
}

/// Forwarded GETs whose path contains `part`.
fn gets(p: &Proxy, part: &str) -> Vec<crate::proxy::Request> {
    p.requests()
        .into_iter()
        .filter(|r| r.line.starts_with("GET ") && r.line.contains(part))
        .collect()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn verify_reads_only_footers_and_resumes_from_its_watermark() {
    let s3 = s3();
    let bucket = unique("vfy");
    create_bucket(&s3, &bucket);
    let stream = unique("big");
    let rt = rt();
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let settings = ParquetSettings::default();
    // 2 shards × 3 flushes × 2 hours: 12 files of ~240 KB.
    rt.block_on(async {
        for s in 0..2 {
            for f in 0..3 {
                let recs = records(&shard(s), f * 60, 60, T0 + (f as i64) * 2 * HOUR, 2, 8192);
                write_flush(&direct, &settings, &stream, &shard(s), &recs)
                    .await
                    .unwrap();
            }
        }
    });
    let (files, total) = rt.block_on(data_files(&direct, &stream));
    assert_eq!(files.len(), 12, "{files:?}");
    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = s3_workspace(&proxy.endpoint(), &bucket, &stream, None);

    let out = ws.ok(&["verify"]);
    assert!(
        stdout(&out).contains("no gaps, no duplicates"),
        "{}",
        stdout(&out)
    );
    // Footers only: every data GET is ranged, and together they fetch a
    // small part of the files.
    let reads = gets(&proxy, ".parquet");
    assert!(reads.len() >= files.len(), "{reads:?}");
    assert!(
        reads.iter().all(|r| r.range.is_some()),
        "unranged: {reads:?}"
    );
    let fetched: usize = reads.iter().map(|r| r.response_bytes).sum();
    assert!(
        (fetched as u64) * 8 < total,
        "verify fetched {fetched} bytes of {total} bytes of data files"
    );

    // Nothing new: --since-last reads no data file at all.
    proxy.clear_requests();
    let out = ws.ok(&["verify", "--since-last"]);
    let text = stdout(&out);
    assert!(text.contains("no gaps, no duplicates"), "{text}");
    assert!(text.contains("360 records"), "{text}");
    assert_eq!(gets(&proxy, ".parquet").len(), 0, "{:?}", proxy.requests());

    // A new flush of shard 0: only its file is read.
    let new = rt.block_on(async {
        let recs = records(&shard(0), 180, 60, T0 + 10 * HOUR, 1, 2048);
        write_flush(&direct, &settings, &stream, &shard(0), &recs)
            .await
            .unwrap()
    });
    assert_eq!(new.len(), 1);
    proxy.clear_requests();
    let out = ws.ok(&["verify", "--since-last", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sh0 = &v["streams"][0]["shards"][0];
    assert_eq!(sh0["records"], 240, "{v}");
    assert_eq!(sh0["files"], 7, "{v}");
    assert_eq!(sh0["files_read"], 1, "{v}");
    let reads = gets(&proxy, ".parquet");
    assert!(
        !reads.is_empty()
            && reads
                .iter()
                .all(|r| r.line.contains(new[0].filename().unwrap())),
        "{reads:?}"
    );

    // A loss after the watermark is found by --since-last too.
    let newer = rt.block_on(async {
        let recs = records(&shard(1), 180, 60, T0 + 11 * HOUR, 1, 2048);
        write_flush(&direct, &settings, &stream, &shard(1), &recs)
            .await
            .unwrap()
    });
    rt.block_on(direct.store.delete(&newer[0])).unwrap();
    let out = ws.run(&["verify", "--since-last"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(stdout(&out).contains(&shard(1)), "{}", stdout(&out));
    let out = ws.run(&["verify"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
}

#[test]
fn a_checkpoint_generation_deleted_under_status_and_verify_is_read_again() {
    let k = kinesis();
    let s3 = s3();
    let bucket = unique("gen");
    create_bucket(&s3, &bucket);
    let stream = unique("busy");
    let rt = rt();
    let c = kinesis_client(&k.endpoint());
    rt.block_on(create_stream(&c, &stream, 2));
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let settings = ParquetSettings::default();
    let flush = |n: usize| {
        rt.block_on(async {
            for s in 0..2 {
                let recs = records(&shard(s), n * 10, 10, T0 + n as i64 * HOUR, 1, 64);
                write_flush(&direct, &settings, &stream, &shard(s), &recs)
                    .await
                    .unwrap();
            }
        })
    };
    flush(0);
    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = s3_workspace(&proxy.endpoint(), &bucket, &stream, Some(&k.endpoint()));
    for (round, args) in [["verify", "--format"], ["status", "--format"]]
        .iter()
        .enumerate()
    {
        let before = rt
            .block_on(load_latest(&direct, &stream, &shard(1)))
            .unwrap()
            .unwrap();
        proxy.hold_next("GET", &format!("_fluxcap/checkpoints/{}/", shard(1)));
        let child = ws
            .cmd()
            .args(args)
            .arg("json")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let held = rt.block_on(proxy.wait_held(Duration::from_secs(60)));
        assert!(
            held.contains(&format!("{:020}.json", before.generation)),
            "{held}"
        );
        // An archiver commits meanwhile: the generation being read goes.
        flush(round + 1);
        let gone = rt.block_on(direct.store.head(&direct.layout.checkpoint(
            &stream,
            &shard(1),
            before.generation,
        )));
        assert!(
            matches!(gone, Err(object_store::Error::NotFound { .. })),
            "{gone:?}"
        );
        assert_eq!(rt.block_on(proxy.release()), 404);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let shards = v["streams"][0]["shards"].as_array().unwrap();
        let key = if round == 0 {
            "records"
        } else {
            "records_archived"
        };
        let got: u64 = shards.iter().map(|s| s[key].as_u64().unwrap()).sum();
        // Everything committed before the command started is there.
        assert!(got >= 20 * (round as u64 + 1), "{v}");
    }
}

#[test]
fn verify_while_committed_files_are_merged_and_since_last_across_a_merge() {
    let s3 = s3();
    let bucket = unique("mrg");
    create_bucket(&s3, &bucket);
    let stream = unique("hourly");
    let rt = rt();
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let policy = PublishPolicy {
        hourly: true,
        ..PublishPolicy::default()
    };
    let sh = shard(0);
    let flush = |from: usize, hour: i64, closed: Option<i64>| {
        rt.block_on(async {
            let recs = records(&sh, from, 20, hour, 1, 256);
            write_flush_with(&direct, &policy, &stream, &sh, &recs, closed)
                .await
                .unwrap()
        })
    };
    // Two flushes of hour T0 stay staged (the hour is not closed).
    flush(0, T0, None);
    flush(20, T0, None);
    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = s3_workspace(&proxy.endpoint(), &bucket, &stream, None);
    proxy.hold_next("GET", "_fluxcap/staging/");
    let child = ws
        .cmd()
        .arg("verify")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    rt.block_on(proxy.wait_held(Duration::from_secs(60)));
    // The archiver closes hour T0: both parts merged into one published
    // file, the staged parts deleted.
    flush(40, T0 + HOUR, Some(T0 + HOUR));
    let (files, _) = rt.block_on(data_files(&direct, &stream));
    assert_eq!(files.len(), 1, "{files:?}");
    rt.block_on(proxy.release());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("no gaps, no duplicates"),
        "{}",
        stdout(&out)
    );

    // Hour T0+1 holds a staged part when verify records its watermark; it
    // is merged with a later part afterwards: --since-last reads the merged
    // file and finds no gap.
    let out = ws.ok(&["verify"]);
    assert!(stdout(&out).contains("60 records"), "{}", stdout(&out));
    flush(60, T0 + HOUR, Some(T0 + 2 * HOUR));
    let (files, _) = rt.block_on(data_files(&direct, &stream));
    assert_eq!(files.len(), 2, "{files:?}");
    proxy.clear_requests();
    let out = ws.ok(&["verify", "--since-last"]);
    let text = stdout(&out);
    assert!(
        text.contains("no gaps, no duplicates") && text.contains("80 records"),
        "{text}"
    );
    let reads = gets(&proxy, ".parquet");
    assert!(
        !reads.is_empty() && reads.iter().all(|r| r.line.contains("hr%3D01")),
        "only the hour that was open is read again: {reads:?}"
    );
}

#[test]
fn finished_shards_are_read_from_the_stream_manifest() {
    let k = kinesis();
    let s3 = s3();
    let bucket = unique("fin");
    create_bucket(&s3, &bucket);
    let stream = unique("closed");
    let rt = rt();
    let c = kinesis_client(&k.endpoint());
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(30, 7)).await
    });
    let direct = s3_archive(&s3.endpoint(), &bucket, PREFIX);
    let settings = ParquetSettings::default();
    // 40 finished shards of an earlier shard layout (gone from the stream).
    const CLOSED: usize = 40;
    let closed = |i: usize| format!("shardId-9{i:011}");
    rt.block_on(async {
        for i in 0..CLOSED {
            let recs = records(&closed(i), 0, 5, T0, 1, 64);
            write_flush(&direct, &settings, &stream, &closed(i), &recs)
                .await
                .unwrap();
            let mut ck = ShardCheckpoint::open(&direct, &stream, &closed(i), vec![], "test", 0)
                .await
                .unwrap();
            ck.commit(Commit {
                finished: true,
                ..Commit::default()
            })
            .await
            .unwrap();
        }
    });
    let proxy = rt.block_on(Proxy::start(s3.port));
    let ws = s3_workspace(&proxy.endpoint(), &bucket, &stream, Some(&k.endpoint()));
    // The first archiver run (an archive without a manifest) writes it.
    ws.ok(&["archive", "--once"]);
    let manifest: serde_json::Value = serde_json::from_slice(
        &rt.block_on(direct.get_bytes(&direct.layout.finished_manifest(&stream)))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["version"], 1);
    assert_eq!(manifest["shards"].as_array().unwrap().len(), CLOSED);

    let expected = (CLOSED * 5 + puts.len()) as i64;
    let closed_reads = |p: &Proxy| gets(p, "_fluxcap/checkpoints/shardId-9").len();
    proxy.clear_requests();
    let out = ws.ok(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shards = v["streams"][0]["shards"].as_array().unwrap();
    assert_eq!(shards.len(), CLOSED + 1, "{v}");
    let archived: u64 = shards
        .iter()
        .map(|s| s["records_archived"].as_u64().unwrap())
        .sum();
    assert_eq!(archived as i64, expected);
    assert_eq!(
        shards.iter().filter(|s| s["state"] == "finished").count(),
        CLOSED,
        "{v}"
    );
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) AS n FROM {}", q(&stream))),
        expected
    );
    ws.ok(&["archive", "--once"]);
    assert_eq!(closed_reads(&proxy), 0, "{:?}", proxy.requests());

    // A manifest entry that does not match the listing is not used; a
    // manifest that cannot be read is ignored.
    let mut edited = manifest.clone();
    edited["shards"][3]["generation"] = serde_json::json!(1);
    edited["shards"][3]["records"] = serde_json::json!(999_999);
    let path = direct.layout.finished_manifest(&stream);
    rt.block_on(direct.put_bytes(&path, serde_json::to_vec(&edited).unwrap().into()))
        .unwrap();
    proxy.clear_requests();
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{}", q(&stream))),
        expected
    );
    let out = ws.ok(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let archived: u64 = v["streams"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["records_archived"].as_u64().unwrap())
        .sum();
    assert_eq!(archived as i64, expected);
    assert_eq!(
        closed_reads(&proxy),
        2,
        "one read per command, of that shard only"
    );
    rt.block_on(direct.put_bytes(&path, bytes::Bytes::from_static(b"{not json")))
        .unwrap();
    ws.ok(&["verify"]);
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{}", q(&stream))),
        expected
    );
}
