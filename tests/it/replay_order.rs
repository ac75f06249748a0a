//! Replay's order, copies and deletes: a position is the shard's sequence
//! order and its ancestry (never arrival time), replayed copies are known as
//! copies, deleted keys are emitted or dropped as asked, and a protocol
//! consumer converges beside two overlapping replays and a delete.

use std::collections::BTreeMap;
use std::process::Stdio;

use fluxcap::consistency;

use crate::harness::*;
use crate::replay::{consumer_bin, decode_all, lines, v_of, walk};

fn local_archive(dir: &std::path::Path) -> fluxcap::archive::store::Archive {
    use fluxcap::archive::layout::Layout;
    std::fs::create_dir_all(dir).unwrap();
    fluxcap::archive::store::Archive {
        store: std::sync::Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap(),
        ),
        location: fluxcap::config::ArchiveLocation::Local(dir.to_path_buf()),
        layout: Layout::new(object_store::path::Path::default()),
    }
}

fn rec(shard: &str, seq: u64, key: &str, v: i64, arrival_ms: i64) -> fluxcap::record::Record {
    fluxcap::record::Record {
        shard_id: shard.into(),
        sequence_number: format!("49600{seq:045}").into(),
        subsequence_number: 0,
        partition_key: key.into(),
        explicit_hash_key: None,
        arrival_ms,
        data: format!(r#"{{"k":"{key}","v":{v}}}"#).into_bytes().into(),
    }
}

/// Arrival times that go backwards — inside a shard and across a split —
/// do not change the order: a child's records come after its parent's, and
/// a shard's records in sequence order. Old code ordered and compacted by
/// arrival time first.
#[test]
fn order_and_compaction_follow_sequence_and_ancestry_not_arrival_time() {
    let k = kinesis();
    let stream = unique("order");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let archive = local_archive(&ws.archive);
    let t = (chrono::Utc::now().timestamp_millis() / 3_600_000 - 3) * 3_600_000;
    let parent = "shardId-000000000000";
    let child = "shardId-000000000001";
    let settings = fluxcap::archive::writer::ParquetSettings::default();
    rt().block_on(async {
        // Parent: a then b; b's arrival time is earlier than a's.
        fluxcap::archive::ingest::write_flush(
            &archive,
            &settings,
            &stream,
            parent,
            &[
                rec(parent, 1, "a", 1, t + 50_000),
                rec(parent, 2, "b", 1, t + 40_000),
                rec(parent, 3, "a", 2, t + 60_000),
            ],
        )
        .await
        .unwrap();
        // The child (split from the parent) has arrival times before all of
        // the parent's, and going backwards inside it too.
        fluxcap::archive::ingest::write_child_flush(
            &archive,
            &settings,
            &stream,
            child,
            &[parent.to_string()],
            &[
                rec(child, 10, "a", 3, t + 10_000),
                rec(child, 11, "b", 2, t + 5_000),
                rec(child, 12, "a", 4, t + 1_000),
            ],
        )
        .await
        .unwrap();
    });

    // Plain replay: per key, the write order.
    let out = ws.dir.path().join("all.jsonl");
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("file://{}", out.display()),
    ]);
    let got = lines(&out);
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for g in &got {
        per_key
            .entry(g["partition_key"].as_str().unwrap().to_string())
            .or_default()
            .push(v_of(g["data"].as_str().unwrap().as_bytes()));
    }
    assert_eq!(per_key["a"], vec![1, 2, 3, 4]);
    assert_eq!(per_key["b"], vec![1, 2]);
    // The whole order: the parent's records, then the child's, each in sequence order.
    let seqs: Vec<&str> = got
        .iter()
        .map(|g| g["sequence_number"].as_str().unwrap())
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted);

    // Compacted: each key's last write, whatever the arrival times say.
    let out = ws.dir.path().join("compact.jsonl");
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--compact",
        "--to",
        &format!("file://{}", out.display()),
    ]);
    let last: BTreeMap<String, i64> = lines(&out)
        .iter()
        .map(|g| {
            (
                g["partition_key"].as_str().unwrap().to_string(),
                v_of(g["data"].as_str().unwrap().as_bytes()),
            )
        })
        .collect();
    assert_eq!(last, BTreeMap::from([("a".into(), 4), ("b".into(), 2)]));

    // Annotations carry the child's depth (1): consumers order it after the parent.
    let c = kinesis_client(&k.endpoint());
    let target = unique("order-t");
    let rt = rt();
    rt.block_on(create_stream(&c, &target, 1));
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target}"),
    ]);
    let got = rt.block_on(read_stream(&c, &target));
    assert_eq!(got.len(), 6);
    for (a, payload) in decode_all(&got) {
        let a = a.expect("annotated");
        assert_eq!(a.lineage_depth, u32::from(a.shard_id == child), "{a:?}");
        assert_eq!(
            a.position().cmp(&consistency::Position {
                arrival_ms: 0,
                lineage_depth: 0,
                shard_id: parent.into(),
                sequence_number: "49600".into(),
                subsequence_number: 0,
            }),
            std::cmp::Ordering::Greater,
            "{payload:?}"
        );
    }
}

fn json_events(keys: &[&str], v: i64) -> Vec<(String, Vec<u8>)> {
    keys.iter()
        .map(|k| {
            (
                k.to_string(),
                format!(r#"{{"k":"{k}","v":{v}}}"#).into_bytes(),
            )
        })
        .collect()
}

/// A replay into the stream it reads puts copies there; the tables show
/// them as copies, a later replay leaves them out (or, with
/// `--include-replayed`, orders them by their original and sends them
/// unchanged). Old code took a copy for an original written when the copy
/// arrived: a compacted replay then sent the old value with a newer
/// position, and consumers went back to it.
#[test]
fn replayed_copies_are_known_as_copies() {
    let k = kinesis();
    let stream = unique("copies");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let keys = ["a", "b", "c", "d"];
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        let mut p = put_records(&c, &stream, &json_events(&keys, 1)).await;
        p.extend(put_records(&c, &stream, &json_events(&keys, 2)).await);
        p
    });
    ws.ok(&["archive", "--once"]);

    // Replay the old values (v = 1) into the stream itself.
    let out = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--where",
        "json_get_int(data, 'v') = 1",
        "--to",
        &format!("kinesis://{stream}"),
        "--confirm-same-stream",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first_id = summary["id"].as_str().unwrap().to_string();
    assert_eq!(summary["records"], 4);

    // The copies, as the tables show them (live now, then archived).
    let s = q(&stream);
    for _ in 0..2 {
        assert_eq!(
            ws.sql_count(&format!("SELECT count(*) FROM {s} WHERE replay_id IS NULL")),
            8
        );
        let copies = ws.sql(&format!(
            "SELECT replay_id, origin_shard_id, origin_sequence_number, \
                    origin_subsequence_number, origin_lineage_depth \
             FROM {s} WHERE replay_id IS NOT NULL ORDER BY origin_sequence_number"
        ));
        assert_eq!(copies.len(), 4);
        let mut want: Vec<(&str, &str)> = puts[..4]
            .iter()
            .map(|p| (p.shard_id.as_str(), p.sequence_number.as_str()))
            .collect();
        want.sort_by(|a, b| a.1.cmp(b.1));
        for (row, (shard, seq)) in copies.iter().zip(&want) {
            assert_eq!(row["replay_id"], first_id.as_str());
            assert_eq!(row["origin_shard_id"], *shard);
            assert_eq!(row["origin_sequence_number"], *seq);
            assert_eq!(row["origin_subsequence_number"], 0);
            assert_eq!(row["origin_lineage_depth"], 0);
        }
        ws.ok(&["archive", "--once"]);
    }

    // A compacted replay of everything: the last write per key (v = 2), no copy.
    let out = ws.dir.path().join("compact.jsonl");
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--compact",
        "--to",
        &format!("file://{}", out.display()),
    ]);
    let got = lines(&out);
    assert_eq!(got.len(), 4);
    for g in &got {
        assert_eq!(v_of(g["data"].as_str().unwrap().as_bytes()), 2, "{g}");
    }

    // With the copies included: still v = 2 per key (copies compete with
    // their original's position), and a plain replay sends them unchanged.
    let out = ws.dir.path().join("included.jsonl");
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--compact",
        "--include-replayed",
        "--to",
        &format!("file://{}", out.display()),
    ]);
    let got = lines(&out);
    assert_eq!(got.len(), 4);
    for g in &got {
        let data = g["data"].as_str().unwrap();
        let payload = consistency::decode(data.as_bytes(), consistency::DEFAULT_FIELD);
        assert_eq!(v_of(payload.payload()), 2, "{g}");
    }
    let out = ws.dir.path().join("old.jsonl");
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--include-replayed",
        "--where",
        "json_get_int(data, 'v') = 1",
        "--to",
        &format!("file://{}", out.display()),
    ]);
    let got = lines(&out);
    assert_eq!(got.len(), 8, "four originals and their four copies");
    let mut copies = 0;
    for g in &got {
        let data = g["data"].as_str().unwrap();
        if let consistency::Decoded::Replayed { annotation, .. } =
            consistency::decode(data.as_bytes(), consistency::DEFAULT_FIELD)
        {
            copies += 1;
            // The first replay's annotation, not wrapped again.
            assert_eq!(annotation.replay_id, first_id);
            assert!(
                puts[..4]
                    .iter()
                    .any(|p| p.sequence_number == annotation.sequence_number)
            );
        }
    }
    assert_eq!(copies, 4);
}

/// `--tombstones drop` sends nothing of a deleted key, `emit` sends its
/// delete so that consumers restored from a backup delete it too; emit is
/// the default into the source stream, drop into a file.
#[test]
fn deleted_keys_are_emitted_or_dropped() {
    let k = kinesis();
    let stream = unique("tomb");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &json_events(&["a", "b", "c"], 1)).await;
        put_records(
            &c,
            &stream,
            &[(
                "b".to_string(),
                br#"{"k":"b","op":"delete","v":2}"#.to_vec(),
            )],
        )
        .await;
    });
    let tomb = "json_get_str(data, 'op') = 'delete'";
    let run = |extra: &[&str]| -> Vec<serde_json::Value> {
        let out = ws.dir.path().join(format!("{}.jsonl", unique("t")));
        let mut args = vec![
            "replay",
            "--stream",
            &stream,
            "--compact",
            "--tombstone",
            tomb,
        ];
        args.extend_from_slice(extra);
        let to = format!("file://{}", out.display());
        args.extend_from_slice(&["--to", &to]);
        ws.ok(&args);
        lines(&out)
    };
    let keys = |got: &[serde_json::Value]| -> Vec<String> {
        let mut k: Vec<String> = got
            .iter()
            .map(|g| g["partition_key"].as_str().unwrap().to_string())
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&run(&[])),
        ["a", "c"],
        "a file target drops by default"
    );
    assert_eq!(keys(&run(&["--tombstones", "drop"])), ["a", "c"]);
    let emitted = run(&["--tombstones", "emit"]);
    assert_eq!(keys(&emitted), ["a", "b", "c"]);
    let b = emitted.iter().find(|g| g["partition_key"] == "b").unwrap();
    assert!(b["data"].as_str().unwrap().contains(r#""op":"delete""#));
    // --where filters the compacted state, but a delete is always sent.
    assert_eq!(
        keys(&run(&[
            "--tombstones",
            "emit",
            "--where",
            "json_get_str(data,'k') = 'a'"
        ])),
        ["a", "b"]
    );
    // Into the source stream the delete is emitted by default (dry run: counted only).
    let out = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--compact",
        "--tombstone",
        tomb,
        "--to",
        &format!("kinesis://{stream}"),
        "--confirm-same-stream",
        "--dry-run",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["records"], 3);
    // --tombstones without --tombstone says what is missing.
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--compact",
        "--tombstones",
        "emit",
        "--to",
        "-",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("give --tombstone too"));
}

/// Two overlapping replays into the live source (the first sends old
/// values, the second compacts a window that holds the first one's copies)
/// beside live writes and a delete: the protocol consumer ends with the last
/// write per key, and without the deleted key.
#[test]
fn a_consumer_converges_beside_two_overlapping_replays_and_a_delete() {
    let k = ferrokinesis(false);
    let stream = unique("conv2");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let keys = 40usize;
    let mut truth: BTreeMap<String, i64> = BTreeMap::new();
    let mut v = 0i64;
    let mut write = |rt: &tokio::runtime::Runtime, picks: &[usize], delete: bool| {
        let batch: Vec<(String, Vec<u8>)> = picks
            .iter()
            .map(|i| {
                v += 1;
                let key = format!("k{i}");
                if delete {
                    truth.remove(&key);
                    (
                        key.clone(),
                        format!(r#"{{"k":"{key}","op":"delete","v":{v}}}"#).into_bytes(),
                    )
                } else {
                    truth.insert(key.clone(), v);
                    (
                        key.clone(),
                        format!(r#"{{"k":"{key}","v":{v}}}"#).into_bytes(),
                    )
                }
            })
            .collect();
        rt.block_on(put_records(&c, &stream, &batch));
    };
    let all: Vec<usize> = (0..keys).collect();
    rt.block_on(create_stream(&c, &stream, 2));
    write(&rt, &all, false); // v 1..=40: the old values
    let old_max = keys as i64;
    write(&rt, &all, false);
    ws.ok(&["archive", "--once"]);

    // Replay 1: the old values, back into the stream.
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--where",
        &format!("json_get_int(data, 'v') <= {old_max}"),
        "--to",
        &format!("kinesis://{stream}"),
        "--confirm-same-stream",
    ]);
    // A delete and some newer writes.
    write(&rt, &[3], true);
    write(&rt, &[5, 6, 7], false);
    ws.ok(&["archive", "--once"]);

    // Replay 2 overlaps replay 1's copies: compacted, deletes emitted,
    // while live writes go on.
    let mut child = ws
        .cmd()
        .args([
            "replay",
            "--stream",
            &stream,
            "--compact",
            "--tombstone",
            "json_get_str(data, 'op') = 'delete'",
            "--to",
            &format!("kinesis://{stream}"),
            "--confirm-same-stream",
            "--rate",
            "100",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while walk(&ws.archive)
        .iter()
        .filter(|p| p.ends_with("manifest.json"))
        .count()
        < 2
    {
        assert!(child.try_wait().unwrap().is_none(), "replay ended early");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    write(&rt, &[8, 9], false);
    write(&rt, &[9], true);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Naively applying the stream in order would diverge (copies of old values).
    let got = rt.block_on(read_stream(&c, &stream));
    let decoded = decode_all(&got);
    assert!(decoded.iter().filter(|(a, _)| a.is_some()).count() >= keys);

    let o = std::process::Command::new(consumer_bin())
        .args([
            "--stream",
            &stream,
            "--idle-ms",
            "500",
            "--json",
            "--delete-when",
            "op=delete",
            "--config",
        ])
        .arg(&ws.config)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state: BTreeMap<String, String> = serde_json::from_slice(&o.stdout).unwrap();
    let state: BTreeMap<String, i64> = state
        .into_iter()
        .map(|(k, val)| (k, v_of(val.as_bytes())))
        .collect();
    assert_eq!(state, truth);
}

/// With few partition keys an ordered replay sends a key's records one per
/// round trip: the dry run says so (and counts it in its estimate), and
/// `--unordered` sends them in full batches.
#[test]
fn unordered_sends_a_hot_keys_records_in_full_batches_and_the_dry_run_counts_the_skew() {
    let k = kinesis();
    let rt = rt();
    let proxy = rt.block_on(crate::proxy::Proxy::start(k.port));
    let stream = unique("hot");
    let target = unique("hot-t");
    let ws = Workspace::new(&proxy.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let n = 60;
    rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        create_stream(&c, &target, 1).await;
        let recs: Vec<(String, Vec<u8>)> = (0..n)
            .map(|v| ("hot".to_string(), format!(r#"{{"v":{v}}}"#).into_bytes()))
            .collect();
        put_records(&c, &stream, &recs).await;
    });
    let to = format!("kinesis://{target}");
    let dry = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &to,
        "--dry-run",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(summary["busiest_key_records"], n);
    assert!(summary["estimated_seconds"].as_f64().unwrap() >= n as f64 * 0.03 - 1e-9);

    let before = proxy.calls("PutRecords");
    ws.ok(&["replay", "--stream", &stream, "--to", &to]);
    let ordered = proxy.calls("PutRecords") - before;
    assert!(
        ordered >= n,
        "ordered: {ordered} PutRecords calls for {n} records of one key"
    );

    let before = proxy.calls("PutRecords");
    ws.ok(&["replay", "--stream", &stream, "--to", &to, "--unordered"]);
    let unordered = proxy.calls("PutRecords") - before;
    assert!(unordered <= 3, "unordered: {unordered} PutRecords calls");

    // Every record arrived twice (two replays), each copy annotated.
    let got = rt.block_on(read_stream(&c, &target));
    assert_eq!(got.len(), 2 * n as usize);
    let mut vs: Vec<i64> = decode_all(&got)
        .into_iter()
        .map(|(a, p)| {
            assert!(a.is_some());
            v_of(&p)
        })
        .collect();
    vs.sort();
    let want: Vec<i64> = (0..n as i64).flat_map(|v| [v, v]).collect();
    assert_eq!(vs, want);
    // --unordered without the annotation is refused.
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &to,
        "--unordered",
        "--no-annotate",
    ]);
    assert_eq!(o.status.code(), Some(2));
}
