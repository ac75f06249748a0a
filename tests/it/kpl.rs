//! KPL-aggregated records built by an independent encoder (the PyPI
//! `aws_kinesis_agg` package), mixed with plain records and with a record
//! that only looks aggregated: each user record is archived with its own
//! partition key, explicit hash key and sub-sequence number.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine as _;

use crate::harness::*;

struct UserRec {
    pk: String,
    ehk: Option<String>,
    data: Vec<u8>,
}

fn encode_with_python(
    users: &[UserRec],
    per_aggregate: usize,
) -> Vec<(String, Vec<u8>, Vec<usize>)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut child = Command::new(python())
        .arg(root().join("scripts/py/kpl_encode.py"))
        .args(["--max-per-aggregate", &per_aggregate.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for u in users {
            let line = serde_json::json!({"partition_key": u.pk, "explicit_hash_key": u.ehk, "data_b64": b64.encode(&u.data)});
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kpl_encode.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["partition_key"].as_str().unwrap().to_string(),
                b64.decode(v["data_b64"].as_str().unwrap()).unwrap(),
                v["user_records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn kpl_aggregates_are_deaggregated() {
    deaggregated("");
}

/// KPL aggregates, plain records and a fake aggregate put to a 2-shard
/// stream, archived by `archive --once` with `extra` configuration: every
/// user record exactly once, with its subsequence number and keys.
pub fn deaggregated(extra: &str) {
    let users: Vec<UserRec> = (0..60)
        .map(|i| UserRec {
            pk: format!("user-{}", i % 7),
            ehk: (i % 3 == 0).then(|| format!("{}", 12345678901234567890u128 + i as u128)),
            data: format!(r#"{{"n":{i}}}"#).into_bytes(),
        })
        .collect();
    let aggs = encode_with_python(&users, 8);
    assert!(
        aggs.len() >= 8,
        "the encoder made {} aggregates",
        aggs.len()
    );
    assert!(
        aggs.iter()
            .all(|(_, d, _)| d.starts_with(&[0xF3, 0x89, 0x9A, 0xC2]))
    );

    // Something that looks aggregated but fails the MD5: archived as is.
    let mut fake = aggs[0].1.clone();
    let n = fake.len();
    fake[n - 1] ^= 0x55;

    let k = kinesis();
    let stream = unique("kpl");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let mut to_put: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, (pk, data, _)) in aggs.iter().enumerate() {
        to_put.push((pk.clone(), data.clone()));
        to_put.push((
            format!("plain-{i}"),
            format!(r#"{{"plain":{i}}}"#).into_bytes(),
        ));
    }
    to_put.push(("fake".into(), fake.clone()));
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &to_put).await
    });

    // Expected user records: each aggregate expands, plain and fake stay whole.
    let mut expected = Vec::new();
    let mut agg_iter = aggs.iter();
    for p in &puts {
        if p.partition_key.starts_with("plain-") || p.partition_key == "fake" {
            expected.push((
                p.shard_id.clone(),
                p.sequence_number.clone(),
                0i64,
                p.partition_key.clone(),
                None,
                p.data.clone(),
            ));
            continue;
        }
        let (_, data, idx) = agg_iter.next().unwrap();
        assert_eq!(&p.data, data);
        for (sub, &u) in idx.iter().enumerate() {
            expected.push((
                p.shard_id.clone(),
                p.sequence_number.clone(),
                sub as i64,
                users[u].pk.clone(),
                users[u].ehk.clone(),
                users[u].data.clone(),
            ));
        }
    }
    expected.sort();

    let ws = Workspace::new(&k.endpoint(), None, None, extra, &[(&stream, "json")]);
    ws.ok(&["archive", "--once"]);
    for engine in ["pyarrow", "duckdb"] {
        let mut got: Vec<_> = read_local(engine, &ws.archive.join(&stream))
            .into_iter()
            .map(|a| {
                (
                    a.shard_id,
                    a.sequence_number,
                    a.subsequence_number,
                    a.partition_key,
                    a.explicit_hash_key,
                    a.data,
                )
            })
            .collect();
        got.sort();
        assert_eq!(got.len(), 60 + aggs.len() + 1, "{engine}");
        assert_eq!(got, expected, "{engine}");
    }
    ws.ok(&["verify"]);
}
