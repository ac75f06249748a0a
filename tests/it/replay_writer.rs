//! The replay's Kinesis writer beside live traffic, against real emulators:
//! a target that keeps throttling part of every PutRecords call (through the
//! test proxy in front of ferrokinesis), a record the target keeps refusing,
//! and replays into the source stream (`--confirm-same-stream`, the
//! same-stream share of the limits).

use std::collections::{BTreeMap, HashMap};

use fluxcap::consistency::{self, Decoded};

use crate::harness::*;
use crate::proxy::Proxy;

/// JSON events `{"k":…,"v":i}` over `keys` partition keys.
fn events(n: usize, keys: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let k = format!("k{}", i % keys);
            (k.clone(), format!(r#"{{"k":"{k}","v":{i}}}"#).into_bytes())
        })
        .collect()
}

/// Per record of the target: (partition key, original shard, original sequence number).
fn origins(got: &[Got]) -> Vec<(String, String, String)> {
    got.iter()
        .map(
            |g| match consistency::decode(&g.data, consistency::DEFAULT_FIELD) {
                Decoded::Replayed { annotation, .. } => (
                    g.partition_key.clone(),
                    annotation.shard_id,
                    annotation.sequence_number,
                ),
                Decoded::Original(_) => panic!("a record without annotation in the target"),
            },
        )
        .collect()
}

fn summary(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "summary is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn replay_into_a_target_that_throttles_part_of_every_batch_for_long_completes_in_order() {
    let src = ferrokinesis(false);
    let dst = ferrokinesis(false);
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(dst.port));
    let (stream, target) = (unique("src"), unique("busy"));
    let ws = Workspace::new(
        &src.endpoint(),
        None,
        None,
        &format!(
            "[archiver]\nmax_backoff = \"1s\"\n[replay]\ntarget_endpoint = \"{}\"\n",
            proxy.endpoint()
        ),
        &[(&stream, "json")],
    );
    let (cs, cd) = (
        kinesis_client(&src.endpoint()),
        kinesis_client(&dst.endpoint()),
    );
    // 40 keys: a batch holds at most one record per key, so each target
    // shard needs far more than 30 calls for its 1,000 records.
    let n = 2000;
    let puts = rt.block_on(async {
        create_stream(&cs, &stream, 1).await;
        create_stream(&cd, &target, 2).await;
        put_records(&cs, &stream, &events(n, 40)).await
    });
    // The busy target answers the next 100 calls of two or more entries in
    // part: every second entry throttled. The old writer gave up after 30
    // such batches in a row on one shard.
    let busy_calls = 100;
    proxy.throttle_put_records(busy_calls);
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target}"),
        "--json",
    ]);
    let s = summary(&o);
    assert_eq!(s["records"], n, "{s}");
    assert_eq!(
        proxy.throttled_puts_left(),
        0,
        "the target was busy all along"
    );
    assert_eq!(proxy.injected(), u64::from(busy_calls));
    let shards = s["shards"].as_array().unwrap();
    let throttled_calls: u64 = shards
        .iter()
        .map(|x| x["throttled_calls"].as_u64().unwrap())
        .sum();
    assert_eq!(throttled_calls, u64::from(busy_calls), "{s}");
    assert!(
        shards
            .iter()
            .any(|x| x["throttled_calls"].as_u64().unwrap() > 30),
        "one shard saw more throttled batches than the old limit: {s}"
    );
    // Each shard slowed down (multiplicative decrease to the floor, 1/32
    // of 1,000 records/s) and climbed back (additive increase).
    for x in shards {
        if x["throttled_calls"].as_u64().unwrap() >= 10 {
            let lowest = x["lowest_rate"].as_f64().unwrap();
            assert!(lowest <= 1000.0 / 32.0 + 1e-9, "{x}");
            assert!(x["rate"].as_f64().unwrap() > lowest, "{x}");
        }
    }

    // Every record exactly once, per key in the original order.
    let got = origins(&rt.block_on(read_stream(&cd, &target)));
    let mut count: HashMap<(String, String), usize> = HashMap::new();
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, shard, seq) in &got {
        *count.entry((shard.clone(), seq.clone())).or_default() += 1;
        per_key.entry(k.clone()).or_default().push(seq.clone());
    }
    assert_eq!(got.len(), n);
    for p in &puts {
        assert_eq!(
            count.get(&(p.shard_id.clone(), p.sequence_number.clone())),
            Some(&1),
            "record {} of key {}",
            p.sequence_number,
            p.partition_key
        );
    }
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &puts {
        want.entry(p.partition_key.clone())
            .or_default()
            .push(p.sequence_number.clone());
    }
    for v in want.values_mut() {
        v.sort_by(|a, b| fluxcap::record::cmp_sequence(a, b));
    }
    assert_eq!(per_key, want, "per-key order");
}

#[test]
fn a_record_the_target_keeps_refusing_is_named_after_retry_attempts() {
    let src = ferrokinesis(false);
    let dst = ferrokinesis(false);
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(dst.port));
    let (stream, target) = (unique("src"), unique("dst"));
    let ws = Workspace::new(
        &src.endpoint(),
        None,
        None,
        &format!(
            "[archiver]\nmax_backoff = \"200ms\"\n[replay]\ntarget_endpoint = \"{}\"\nretry_attempts = 5\n",
            proxy.endpoint()
        ),
        &[(&stream, "json")],
    );
    let (cs, cd) = (
        kinesis_client(&src.endpoint()),
        kinesis_client(&dst.endpoint()),
    );
    rt.block_on(async {
        create_stream(&cs, &stream, 1).await;
        create_stream(&cd, &target, 1).await;
        put_records(&cs, &stream, &events(200, 10)).await
    });
    let shard = rt
        .block_on(cd.list_shards().stream_name(&target).send())
        .unwrap()
        .shards()[0]
        .shard_id()
        .to_string();
    proxy.refuse_key("k3", "InternalFailure");
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target}"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for part in [
        "refused a record 5 times in a row",
        &format!("stream `{target}`"),
        &format!("shard `{shard}`"),
        "partition key \"k3\"",
        "InternalFailure",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    // Attempts count per record: exactly retry_attempts tries of it, while
    // the other keys' records went through around it.
    assert_eq!(proxy.refused(), 5);
    let got = rt.block_on(read_stream(&cd, &target));
    assert!(!got.is_empty());
    assert!(got.iter().all(|g| g.partition_key != "k3"));
}

#[test]
fn replay_into_the_source_stream_needs_confirmation_and_uses_a_share_of_the_limits() {
    let k = ferrokinesis(false);
    let stream = unique("same");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let n = 30;
    rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &events(n, 5)).await
    });
    let to = format!("kinesis://{stream}");
    let replay = ["replay", "--stream", &stream, "--to", &to];

    // Refused, with a short message saying how to go ahead; nothing sent or recorded.
    let o = ws.run(&replay);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("source stream"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&format!("`{stream}`")) && lines[0].contains("--confirm-same-stream"),
        "{err}"
    );
    assert_eq!(rt.block_on(read_stream(&c, &stream)).len(), n);
    let o = ws.ok(&["replay", "--list", "--json"]);
    assert_eq!(summary(&o), serde_json::json!([]));
    // The same for a dry run.
    let o = ws.run(&[&replay[..], &["--dry-run"]].concat());
    assert_eq!(o.status.code(), Some(2));

    // Confirmed: it runs, at half the per-shard limits (the default share).
    let o = ws.ok(&[&replay[..], &["--confirm-same-stream", "--json"]].concat());
    let s = summary(&o);
    assert_eq!(s["records"], n);
    assert_eq!(s["shards"][0]["rate"], 500.0, "{s}");
    let got = rt.block_on(read_stream(&c, &stream));
    assert_eq!(got.len(), 2 * n);
    assert_eq!(origins(&got[n..]).len(), n);

    // A configured share scales the dry run's estimate.
    let o = ws.ok(&[
        &replay[..],
        &[
            "--confirm-same-stream",
            "--dry-run",
            "--json",
            "--set",
            "replay.same_stream_share=0.25",
        ],
    ]
    .concat());
    let d = summary(&o);
    let (records, bytes) = (d["records"].as_f64().unwrap(), d["bytes"].as_f64().unwrap());
    let want = (records / 250.0).max(bytes / (0.25 * 1024.0 * 1024.0));
    assert!(
        (d["estimated_seconds"].as_f64().unwrap() - want).abs() < 1e-9,
        "{d}"
    );

    // The share is checked.
    for bad in ["0", "1.5"] {
        let o = ws.run(
            &[
                &replay[..],
                &[
                    "--confirm-same-stream",
                    "--set",
                    &format!("replay.same_stream_share={bad}"),
                ],
            ]
            .concat(),
        );
        assert_eq!(o.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("replay.same_stream_share"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
