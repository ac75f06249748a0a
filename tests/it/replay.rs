//! `fluxcap replay` against real local Kinesis servers (ferrokinesis, which
//! really throttles with enforce_limits, and kinesis-mock for resharding).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use fluxcap::consistency::{self, Decoded};

use crate::harness::*;

/// JSON events: key `k<i % keys>`, a version `v`, an op (every 7th a delete),
/// and a group.
fn events(n: usize, keys: usize, from: usize) -> Vec<(String, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            let k = format!("k{}", i % keys);
            let op = if i % 7 == 3 { "del" } else { "put" };
            let body = format!(
                r#"{{"k":"{k}","v":{i},"op":"{op}","grp":"g{}","pad":"{}"}}"#,
                i % 3,
                "x".repeat(i % 50)
            );
            (k, body.into_bytes())
        })
        .collect()
}

pub(crate) fn lines(path: &Path) -> Vec<serde_json::Value> {
    parse_json_lines(&std::fs::read(path).unwrap())
}

fn key(v: &serde_json::Value) -> (String, String) {
    (
        v["shard_id"].as_str().unwrap().to_string(),
        v["sequence_number"].as_str().unwrap().to_string(),
    )
}

fn seq_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fluxcap::record::cmp_sequence(a, b)
}

/// Per key, the puts in put order (each key lives on one shard here).
fn put_order(puts: &[Put]) -> BTreeMap<String, Vec<Put>> {
    let mut m: BTreeMap<String, Vec<Put>> = BTreeMap::new();
    for p in puts {
        m.entry(p.partition_key.clone())
            .or_default()
            .push(p.clone());
    }
    for v in m.values_mut() {
        v.sort_by(|a, b| seq_cmp(&a.sequence_number, &b.sequence_number));
    }
    m
}

pub(crate) fn v_of(data: &[u8]) -> i64 {
    serde_json::from_slice::<serde_json::Value>(data).unwrap()["v"]
        .as_i64()
        .unwrap()
}

#[test]
fn replay_to_files_bounds_filter_compaction_and_parquet_results() {
    let k = ferrokinesis(false);
    let stream = unique("src");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &events(300, 20, 0)).await
    });
    ws.ok(&["archive", "--once"]);
    // More records that stay live (not archived).
    puts.extend(rt.block_on(put_records(&c, &stream, &events(200, 20, 300))));
    let all: HashMap<(String, String), &Put> = puts
        .iter()
        .map(|p| ((p.shard_id.clone(), p.sequence_number.clone()), p))
        .collect();

    // Everything, archived and live, exactly once, per-key order kept.
    let out = ws.dir.path().join("all.jsonl");
    let to = format!("file://{}", out.display());
    ws.ok(&["replay", "--stream", &stream, "--to", &to]);
    let got = lines(&out);
    let everything = got.clone();
    assert_eq!(got.len(), puts.len());
    let mut seen = std::collections::HashSet::new();
    for g in &got {
        let p = all
            .get(&key(g))
            .expect("a replayed record that was never put");
        assert!(seen.insert(key(g)), "duplicate {g}");
        assert_eq!(g["data"].as_str().unwrap().as_bytes(), &p.data[..]);
        assert_eq!(g["partition_key"], p.partition_key.as_str());
        assert!(g["replay_id"].as_str().unwrap().starts_with("r-"));
    }
    let order = put_order(&puts);
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in &got {
        per_key
            .entry(g["partition_key"].as_str().unwrap().to_string())
            .or_default()
            .push(g["sequence_number"].as_str().unwrap().to_string());
    }
    for (k, seqs) in &per_key {
        let want: Vec<String> = order[k].iter().map(|p| p.sequence_number.clone()).collect();
        assert_eq!(seqs, &want, "order of key {k}");
    }

    // A filter over JSON, to standard output.
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--where",
        "json_get_int(data, 'v') % 5 = 0 AND data->>'op' = 'put'",
        "--no-annotate",
    ]);
    let got = parse_json_lines(&o.stdout);
    let want = puts
        .iter()
        .filter(|p| {
            let v: serde_json::Value = serde_json::from_slice(&p.data).unwrap();
            v["v"].as_i64().unwrap() % 5 == 0 && v["op"] == "put"
        })
        .count();
    assert_eq!(got.len(), want);
    assert!(got.iter().all(|g| g.get("replay_id").is_none()));

    // Compaction with tombstones: each key's last record, unless it is a delete.
    let out = ws.dir.path().join("compact.jsonl");
    let to = format!("file://{}", out.display());
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &to,
        "--compact",
        "--tombstone",
        "data->>'op' = 'del'",
    ]);
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for (k, ps) in &order {
        let last = ps.last().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&last.data).unwrap();
        if v["op"] != "del" {
            want.insert(k.clone(), v["v"].as_i64().unwrap());
        }
    }
    assert!(
        want.len() < order.len(),
        "the data must have tombstoned keys"
    );
    let got: BTreeMap<String, i64> = lines(&out)
        .iter()
        .map(|g| {
            (
                g["partition_key"].as_str().unwrap().to_string(),
                v_of(g["data"].as_str().unwrap().as_bytes()),
            )
        })
        .collect();
    assert_eq!(got, want);

    // A key expression: the last record per JSON group.
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--compact",
        "--key",
        "data->>'grp'",
    ]);
    let got = parse_json_lines(&o.stdout);
    // "Last" is by position: arrival time, then shard and sequence (the
    // emulator's arrival times have whole seconds, so shards tie often).
    let mut last_by_group: BTreeMap<String, (String, String, String, i64)> = BTreeMap::new();
    for g in &everything {
        let d: serde_json::Value = serde_json::from_str(g["data"].as_str().unwrap()).unwrap();
        let pos = (
            g["approximate_arrival_timestamp"]
                .as_str()
                .unwrap()
                .to_string(),
            g["shard_id"].as_str().unwrap().to_string(),
            format!("{:0>64}", g["sequence_number"].as_str().unwrap()),
            d["v"].as_i64().unwrap(),
        );
        let grp = d["grp"].as_str().unwrap().to_string();
        if last_by_group.get(&grp).is_none_or(|cur| pos > *cur) {
            last_by_group.insert(grp, pos);
        }
    }
    let want: BTreeMap<String, i64> = last_by_group.into_iter().map(|(g, p)| (g, p.3)).collect();
    let got: BTreeMap<String, i64> = got
        .iter()
        .map(|g| {
            let d: serde_json::Value = serde_json::from_str(g["data"].as_str().unwrap()).unwrap();
            (
                d["grp"].as_str().unwrap().to_string(),
                d["v"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Records whose key is NULL are not compacted (all of them are replayed,
    // but tombstones).
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--compact",
        "--key",
        "data->>'no_such_field'",
        "--tombstone",
        "data->>'op' = 'del'",
    ]);
    let dels = puts
        .iter()
        .filter(|p| String::from_utf8_lossy(&p.data).contains("\"op\":\"del\""))
        .count();
    assert_eq!(parse_json_lines(&o.stdout).len(), puts.len() - dels);

    // Sequence bounds on one shard, and time bounds.
    let shard0 = order["k0"][0].shard_id.clone();
    let mut s0: Vec<&Put> = puts.iter().filter(|p| p.shard_id == shard0).collect();
    s0.sort_by(|a, b| seq_cmp(&a.sequence_number, &b.sequence_number));
    let (lo, hi) = (&s0[10].sequence_number, &s0[40].sequence_number);
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--from-sequence",
        &format!("{shard0}={lo}"),
        "--to-sequence",
        &format!("{shard0}={hi}"),
        "--where",
        &format!("shard_id = '{shard0}'"),
    ]);
    assert_eq!(parse_json_lines(&o.stdout).len(), 31);
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--since",
        "2099-01-01",
    ]);
    assert!(o.stdout.is_empty());
    let o = ws.ok(&["replay", "--stream", &stream, "--to", "-", "--since", "1d"]);
    assert_eq!(parse_json_lines(&o.stdout).len(), puts.len());
    let o = ws.ok(&["replay", "--stream", &stream, "--to", "-", "--until", "1d"]);
    assert!(o.stdout.is_empty());

    // A result set written by SQL (as a cluster engine's CTAS would), replayed.
    let result = ws.dir.path().join("result.parquet");
    ws.ok(&[
        "sql",
        &format!(
            "SELECT shard_id, sequence_number, partition_key, approximate_arrival_timestamp, data \
             FROM {} WHERE data->>'op' = 'del'",
            q(&stream)
        ),
        "-o",
        result.to_str().unwrap(),
    ]);
    let out = ws.dir.path().join("fromparquet.jsonl");
    let to = format!("file://{}", out.display());
    ws.ok(&[
        "replay",
        "--from-parquet",
        result.to_str().unwrap(),
        "--stream",
        &stream,
        "--to",
        &to,
    ]);
    let got = lines(&out);
    let dels: Vec<&Put> = puts
        .iter()
        .filter(|p| String::from_utf8_lossy(&p.data).contains("\"op\":\"del\""))
        .collect();
    assert_eq!(got.len(), dels.len());
    for g in &got {
        let p = all[&key(g)];
        assert_eq!(g["data"].as_str().unwrap().as_bytes(), &p.data[..]);
        assert_eq!(g["subsequence_number"], 0);
    }
    // A Parquet file without the record columns is refused with a clear message.
    let bad = ws.dir.path().join("bad.parquet");
    ws.ok(&["sql", "SELECT 1 AS x", "-o", bad.to_str().unwrap()]);
    let o = ws.run(&[
        "replay",
        "--from-parquet",
        bad.to_str().unwrap(),
        "--to",
        "-",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("lack the record column"));

    // Every replay is listed.
    let o = ws.ok(&["replay", "--list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert!(listed.len() >= 8, "{listed:?}");
    assert!(listed.iter().all(|r| r["state"] == "done"), "{listed:?}");
}

/// Decode what a target received into (annotation, original payload).
pub(crate) fn decode_all(got: &[Got]) -> Vec<(Option<consistency::Annotation>, Vec<u8>)> {
    got.iter()
        .map(
            |g| match consistency::decode(&g.data, consistency::DEFAULT_FIELD) {
                Decoded::Original(b) => (None, b.to_vec()),
                Decoded::Replayed {
                    annotation,
                    payload,
                } => (Some(annotation), payload.to_vec()),
            },
        )
        .collect()
}

#[test]
fn replay_to_kinesis_annotates_json_and_binary_records() {
    // Replay state in an S3 archive store (moto).
    let k = ferrokinesis(false);
    let s3 = s3();
    let bucket = unique("replays");
    create_bucket(&s3, &bucket);
    let (json_s, bin_s, target) = (unique("js"), unique("bin"), unique("dst"));
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&format!("s3://{bucket}/archive")),
        Some(&s3.endpoint()),
        "",
        &[(&json_s, "json"), (&bin_s, "binary")],
    );
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let mut recs = events(40, 8, 0);
    recs.push(("odd".into(), b"[1,2,3]".to_vec())); // JSON, but not an object
    recs.push(("odd".into(), b"not json".to_vec()));
    let bin: Vec<(String, Vec<u8>)> = (0..30u8)
        .map(|i| (format!("b{}", i % 4), vec![0xff, i, 0x00, 0x80]))
        .collect();
    let (jp, bp) = rt.block_on(async {
        create_stream(&c, &json_s, 1).await;
        create_stream(&c, &bin_s, 2).await;
        create_stream(&c, &target, 3).await;
        (
            put_records(&c, &json_s, &recs).await,
            put_records(&c, &bin_s, &bin).await,
        )
    });
    let to = format!("kinesis://{target}");
    let o = ws.ok(&[
        "replay",
        "--stream",
        &json_s,
        "--to",
        &to,
        "--annotate",
        "team=payments",
        "--annotate",
        "ticket=INC-7",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["records"], jp.len());
    assert_eq!(summary["enveloped"], 2);
    let id = summary["id"].as_str().unwrap().to_string();
    let got = rt.block_on(read_stream(&c, &target));
    assert_eq!(got.len(), jp.len());
    let by_pos: HashMap<String, &Put> = jp.iter().map(|p| (p.sequence_number.clone(), p)).collect();
    let mut envelopes = 0;
    for (g, (a, payload)) in got.iter().zip(decode_all(&got)) {
        let a = a.expect("every replayed record is annotated");
        let p = by_pos[&a.sequence_number];
        assert_eq!(a.replay_id, id);
        assert_eq!(a.stream, json_s);
        assert_eq!(a.shard_id, p.shard_id);
        assert_eq!(a.annotations["team"], "payments");
        assert_eq!(a.annotations["ticket"], "INC-7");
        assert!(!a.force_overwrite);
        assert_eq!(g.partition_key, p.partition_key);
        if a.envelope.is_some() {
            envelopes += 1;
            assert_eq!(payload, p.data);
        } else {
            // The JSON form: the original object plus one top-level field.
            let orig: serde_json::Value = serde_json::from_slice(&p.data).unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&g.data).unwrap();
            assert_eq!(
                sent.as_object().unwrap().len(),
                orig.as_object().unwrap().len() + 1
            );
            assert_eq!(
                sent["_fluxcap"]["sequence_number"],
                p.sequence_number.as_str()
            );
            let back: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(back, orig);
        }
    }
    assert_eq!(envelopes, 2);

    // Binary stream: always the envelope, with force_overwrite when asked.
    let target2 = unique("dst2");
    rt.block_on(create_stream(&c, &target2, 1));
    ws.ok(&[
        "replay",
        "--stream",
        &bin_s,
        "--to",
        &format!("kinesis://{target2}"),
        "--force-overwrite",
    ]);
    let got = rt.block_on(read_stream(&c, &target2));
    assert_eq!(got.len(), bp.len());
    let mut want: Vec<(String, Vec<u8>)> = bp
        .iter()
        .map(|p| (p.sequence_number.clone(), p.data.clone()))
        .collect();
    let mut have: Vec<(String, Vec<u8>)> = decode_all(&got)
        .into_iter()
        .map(|(a, d)| {
            let a = a.unwrap();
            assert_eq!(a.envelope, Some(1));
            assert!(a.force_overwrite);
            (a.sequence_number, d)
        })
        .collect();
    want.sort();
    have.sort();
    assert_eq!(have, want);

    // --no-annotate: the original bytes.
    let target3 = unique("dst3");
    rt.block_on(create_stream(&c, &target3, 1));
    ws.ok(&[
        "replay",
        "--stream",
        &bin_s,
        "--to",
        &format!("kinesis://{target3}"),
        "--no-annotate",
    ]);
    let o = ws.ok(&["replay", "--list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "done")
    );
    let mut have: Vec<Vec<u8>> = rt
        .block_on(read_stream(&c, &target3))
        .into_iter()
        .map(|g| g.data)
        .collect();
    let mut want: Vec<Vec<u8>> = bp.iter().map(|p| p.data.clone()).collect();
    have.sort();
    want.sort();
    assert_eq!(have, want);
}

/// Sequence numbers of one key, in the order the target holds them (each key
/// lands on one target shard, read in order).
fn target_order(got: &[Got]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (g, (a, _)) in got.iter().zip(decode_all(got)) {
        let a = a.expect("annotated");
        m.entry(g.partition_key.clone())
            .or_default()
            .push(a.sequence_number);
    }
    m
}

#[test]
fn replay_paces_and_retries_against_a_throttling_target_and_dry_run_matches() {
    let src = ferrokinesis(false);
    let dst = ferrokinesis(true);
    let (stream, target) = (unique("src"), unique("dst"));
    let ws = Workspace::new(
        &src.endpoint(),
        None,
        None,
        &format!("[replay]\ntarget_endpoint = \"{}\"\n", dst.endpoint()),
        &[(&stream, "json")],
    );
    let (cs, cd) = (
        kinesis_client(&src.endpoint()),
        kinesis_client(&dst.endpoint()),
    );
    let rt = rt();
    let n = 2500;
    let puts = rt.block_on(async {
        create_stream(&cs, &stream, 2).await;
        create_stream(&cd, &target, 2).await;
        put_records(&cs, &stream, &events(n, 40, 0)).await
    });
    let to = format!("kinesis://{target}");
    let order = put_order(&puts);

    // Dry run: per target shard figures, nothing sent.
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &to,
        "--dry-run",
        "--json",
    ]);
    let dry: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(dry["records"], n);
    assert!(dry["estimated_seconds"].as_f64().unwrap() > 0.5);
    assert!(rt.block_on(read_stream(&cd, &target)).is_empty());

    // No pacing: the target throttles, failed entries are retried in order.
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &to,
        "--json",
        "--set",
        "replay.shard_records_per_second=0",
        "--set",
        "replay.shard_bytes_per_second=0",
    ]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(s["throttled"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["records"], n);
    let got = rt.block_on(read_stream(&cd, &target));
    assert_eq!(got.len(), n, "every record exactly once");
    let want: BTreeMap<String, Vec<String>> = order
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.iter().map(|p| p.sequence_number.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(target_order(&got), want, "per-key order after retries");

    // Dry-run figures match the real run, shard by shard.
    let real: Vec<(String, u64, u64)> = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["shard_id"].as_str().unwrap().to_string(),
                x["records"].as_u64().unwrap(),
                x["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let est: Vec<(String, u64, u64)> = dry["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["shard_id"].as_str().unwrap().to_string(),
                x["records"].as_u64().unwrap(),
                x["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(real, est);

    // Paced: far fewer throttles, same content and order.
    let target2 = unique("dst2");
    rt.block_on(create_stream(&cd, &target2, 2));
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target2}"),
        "--json",
    ]);
    let paced: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        paced["throttled"].as_u64().unwrap() < s["throttled"].as_u64().unwrap(),
        "paced {paced} vs unpaced {s}"
    );
    let got = rt.block_on(read_stream(&cd, &target2));
    assert_eq!(got.len(), n);
    assert_eq!(target_order(&got), want);

    // --rate caps the overall rate: 300 records at 200/s cannot take less than 1.5 s.
    let target3 = unique("dst3");
    rt.block_on(create_stream(&cd, &target3, 2));
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target3}"),
        "--where",
        "json_get_int(data, 'v') < 300",
        "--rate",
        "200",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["records"], 300);
    assert!(r["seconds"].as_f64().unwrap() >= 1.4, "{r}");

    // A record larger than the target takes is reported, not dropped silently.
    let target4 = unique("dst4");
    rt.block_on(create_stream(&cd, &target4, 1));
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target4}"),
        "--where",
        "json_get_int(data, 'v') < 100",
        "--no-annotate",
        "--set",
        "replay.max_record_size=80",
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("larger than the target's maximum record size"),
        "{err}"
    );
    let big = puts
        .iter()
        .filter(|p| v_of(&p.data) < 100 && p.data.len() + p.partition_key.len() > 80)
        .count();
    assert!(big > 0);
    let got = rt.block_on(read_stream(&cd, &target4));
    assert_eq!(got.len(), 100 - big);
    let listed = walk(&ws.archive)
        .into_iter()
        .find(|p| p.ends_with("rejected.jsonl"))
        .expect("rejected records are listed in the store");
    assert_eq!(lines(&listed).len(), big);
}

/// Every file under `dir`.
pub(crate) fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn replay_resumes_after_kill_9_with_duplicates_only_in_the_window() {
    let src = ferrokinesis(false);
    let dst = ferrokinesis(true);
    let (stream, target) = (unique("src"), unique("dst"));
    let checkpoint = 200;
    let ws = Workspace::new(
        &src.endpoint(),
        None,
        None,
        &format!(
            "[replay]\ntarget_endpoint = \"{}\"\ncheckpoint_records = {checkpoint}\ncheckpoint_interval = \"200ms\"\n",
            dst.endpoint()
        ),
        &[(&stream, "json")],
    );
    let (cs, cd) = (
        kinesis_client(&src.endpoint()),
        kinesis_client(&dst.endpoint()),
    );
    let rt = rt();
    let n = 3000;
    let puts = rt.block_on(async {
        create_stream(&cs, &stream, 1).await;
        create_stream(&cd, &target, 1).await;
        put_records(&cs, &stream, &events(n, 30, 0)).await
    });
    // Paced at 1,000 records/s into one shard: about 3 s.
    let mut child = ws
        .cmd()
        .args([
            "replay",
            "--stream",
            &stream,
            "--to",
            &format!("kinesis://{target}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until progress shows records sent, then kill -9.
    let progress = crate::replay_resume::wait_for_progress(
        &ws,
        &mut child,
        std::time::Duration::from_secs(120),
        |v| v["sent"].as_u64().unwrap_or(0) >= 600,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let id = progress
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let o = ws.ok(&["replay", "--list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let me = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap()
        .clone();
    assert!(
        me["state"].as_str().unwrap().starts_with("interrupted"),
        "{me}"
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&progress).unwrap()).unwrap();
    let sent_before = saved["sent"].as_u64().unwrap();
    assert!(sent_before < n as u64);

    ws.ok(&["replay", "--resume", &id]);
    let got = rt.block_on(read_stream(&cd, &target));
    let mut count: HashMap<String, usize> = HashMap::new();
    for (a, _) in decode_all(&got) {
        *count.entry(a.unwrap().sequence_number).or_default() += 1;
    }
    for p in &puts {
        assert!(count.contains_key(&p.sequence_number), "record lost");
    }
    assert_eq!(count.len(), n);
    let dups: usize = count.values().map(|c| c - 1).sum();
    // The documented window: records acknowledged since the last save
    // (checkpoint_records) plus one batch in flight per target shard.
    let window = checkpoint + 500;
    assert!(dups <= window, "{dups} duplicates > window {window}");
    // A finished replay cannot be resumed again.
    let o = ws.run(&["replay", "--resume", &id]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn replay_keeps_per_key_order_across_a_resharded_source() {
    let src = kinesis();
    let dst = ferrokinesis(false);
    let (stream, target) = (unique("src"), unique("dst"));
    let ws = Workspace::new(
        &src.endpoint(),
        None,
        None,
        &format!("[replay]\ntarget_endpoint = \"{}\"\n", dst.endpoint()),
        &[(&stream, "json")],
    );
    let (cs, cd) = (
        kinesis_client(&src.endpoint()),
        kinesis_client(&dst.endpoint()),
    );
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&cs, &stream, 1).await;
        create_stream(&cd, &target, 3).await;
        let mut p = put_records(&cs, &stream, &events(150, 12, 0)).await;
        split_first_shard(&cs, &stream).await;
        p.extend(put_records(&cs, &stream, &events(150, 12, 150)).await);
        p
    });
    // Part archived, part live.
    ws.ok(&["archive", "--once"]);
    let puts2 = rt.block_on(put_records(&cs, &stream, &events(60, 12, 300)));
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target}"),
    ]);
    let got = rt.block_on(read_stream(&cd, &target));
    assert_eq!(got.len(), puts.len() + puts2.len());
    // Per key, the versions arrive in the order they were written (v grows).
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut depths = std::collections::BTreeSet::new();
    for (g, (a, payload)) in got.iter().zip(decode_all(&got)) {
        depths.insert(a.unwrap().lineage_depth);
        per_key
            .entry(g.partition_key.clone())
            .or_default()
            .push(v_of(&payload));
    }
    assert!(depths.contains(&0) && depths.contains(&1), "{depths:?}");
    for (k, vs) in &per_key {
        let mut sorted = vs.clone();
        sorted.sort();
        assert_eq!(vs, &sorted, "key {k} out of order");
    }
}

/// The example consumer, built by `cargo test` next to the test binary.
pub(crate) fn consumer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().unwrap().parent().unwrap();
    let bin = debug.join("examples").join("consistent_consumer");
    assert!(
        bin.exists(),
        "{} is missing: scripts/test builds it (cargo build --examples)",
        bin.display()
    );
    bin
}

#[test]
fn compacted_replay_into_the_live_source_converges_for_a_protocol_consumer() {
    let k = ferrokinesis(false);
    let stream = unique("conv");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let keys = 150;
    // The source of truth: every write, in write order (one writer).
    let mut truth: BTreeMap<String, i64> = BTreeMap::new();
    let mut v = 0i64;
    let mut write =
        |n: usize, rt: &tokio::runtime::Runtime, pick: &mut dyn FnMut(usize) -> usize| {
            let batch: Vec<(String, Vec<u8>)> = (0..n)
                .map(|i| {
                    v += 1;
                    let key = format!("k{}", pick(i));
                    truth.insert(key.clone(), v);
                    (
                        key.clone(),
                        format!(r#"{{"k":"{key}","v":{v}}}"#).into_bytes(),
                    )
                })
                .collect();
            rt.block_on(put_records(&c, &stream, &batch));
        };
    rt.block_on(create_stream(&c, &stream, 2));
    for _ in 0..3 {
        write(keys, &rt, &mut |i| i);
    }
    ws.ok(&["archive", "--once"]);
    write(keys, &rt, &mut |i| i); // live, not archived

    // A slow compacted replay into the same stream.
    let mut child = ws
        .cmd()
        .args([
            "replay",
            "--stream",
            &stream,
            "--to",
            &format!("kinesis://{stream}"),
            "--confirm-same-stream",
            "--compact",
            "--rate",
            "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the replay has fixed its horizon (its manifest exists), every key
    // gets a newer write; then the writer keeps going until the replay ends.
    while !walk(&ws.archive)
        .iter()
        .any(|p| p.ends_with("manifest.json"))
    {
        assert!(child.try_wait().unwrap().is_none(), "replay ended early");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    write(keys, &rt, &mut |i| i);
    let mut seed = 7usize;
    while child.try_wait().unwrap().is_none() {
        write(5, &rt, &mut |_| {
            seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
            (seed >> 8) % keys
        });
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The stream now holds originals and, interleaved, replayed old values.
    let got = rt.block_on(read_stream(&c, &stream));
    let decoded = decode_all(&got);
    let replayed = decoded.iter().filter(|(a, _)| a.is_some()).count();
    assert_eq!(replayed, keys, "one replayed record per key");
    // Applying records naively (last one wins) would regress keys.
    let mut naive: BTreeMap<String, i64> = BTreeMap::new();
    for (g, (_, payload)) in got.iter().zip(&decoded) {
        naive.insert(g.partition_key.clone(), v_of(payload));
    }
    assert_ne!(
        naive, truth,
        "the scenario must make naive consumers diverge"
    );

    // The protocol consumer converges to the last write per key.
    let o = std::process::Command::new(consumer_bin())
        .args([
            "--stream",
            &stream,
            "--idle-ms",
            "500",
            "--json",
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

#[test]
fn replay_time_bounds_prune_hour_partitions() {
    // An archive of a stream that is no longer in Kinesis: three past hours.
    let k = ferrokinesis(false);
    let stream = unique("old");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let h0 = (chrono::Utc::now().timestamp_millis() / 3_600_000 - 50) * 3_600_000;
    let hours = [h0, h0 + 3_600_000, h0 + 7_200_000];
    let recs = ingest_hours(&ws.archive, &stream, 2, &hours, 40);
    let t = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    };
    let (since, until) = (t(hours[1]), t(hours[2]));
    let bounded = [
        "replay", "--stream", &stream, "--to", "-", "--since", &since, "--until", &until,
    ];
    let o = ws.ok(&bounded);
    let got = parse_json_lines(&o.stdout);
    let want = recs
        .iter()
        .filter(|r| r.arrival_ms >= hours[1] && r.arrival_ms < hours[2])
        .count();
    assert_eq!(got.len(), want);
    assert_eq!(want, 80);
    // Damage every file of the first hour: a bounded replay never opens
    // them, an unbounded one fails naming the file.
    let (dt, hr) = fluxcap::archive::layout::partition_of(hours[0]);
    let dir = ws
        .archive
        .join(&stream)
        .join(format!("dt={dt}"))
        .join(format!("hr={hr}"));
    let files = walk(&dir);
    assert!(!files.is_empty());
    for f in &files {
        std::fs::write(f, b"not parquet").unwrap();
    }
    let o = ws.ok(&bounded);
    assert_eq!(parse_json_lines(&o.stdout).len(), want);
    let o = ws.run(&["replay", "--stream", &stream, "--to", "-"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("hr={hr}")), "{err}");
    // Mistakes in an option's SQL name the option, before anything runs.
    for (opt, expr) in [
        ("--where", "no_such_column = 1"),
        ("--where", "octet_length(data)"),
    ] {
        let o = ws.run(&["replay", "--stream", &stream, "--to", "-", opt, expr]);
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains(opt));
    }
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--compact",
        "--tombstone",
        "data",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("true/false"));
}
