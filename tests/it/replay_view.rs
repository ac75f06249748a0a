//! A replay and a statement see one view of the stream: one checkpoint
//! snapshot, one horizon and one live read for all of their scans.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;
use crate::proxy::Proxy;

fn events(n: usize, from: usize) -> Vec<(String, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            (
                format!("k{}", i % 7),
                format!(r#"{{"i":{i},"v":"{}"}}"#, i * 3).into_bytes(),
            )
        })
        .collect()
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    parse_json_lines(&std::fs::read(path).unwrap_or_default())
}

/// Old code took one snapshot for the horizon and another inside its live
/// scan: a flush committed in between moved records out of the live tail, so
/// the horizon stopped at the older committed position and those records
/// were silently left out of the replay.
#[test]
fn a_flush_committed_while_the_replay_fixes_its_horizon_is_not_lost() {
    let k = kinesis();
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let stream = unique("view");
    let c = kinesis_client(&k.endpoint());
    let archiver = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let archive = archiver.archive.display().to_string();
    let replayer = Workspace::new(
        &proxy.endpoint(),
        Some(&archive),
        None,
        "",
        &[(&stream, "json")],
    );
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &events(20, 0)).await
    });
    archiver.ok(&["archive", "--once"]);
    puts.extend(rt.block_on(put_records(&c, &stream, &events(20, 20))));

    // The replay's first Kinesis call (listing the shards for its horizon)
    // waits while the archiver commits the live records.
    proxy.hold_next("POST", "/");
    let out = replayer.dir.path().join("out.jsonl");
    let child = replayer
        .cmd()
        .args(["replay", "--stream", &stream, "--to"])
        .arg(format!("file://{}", out.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    rt.block_on(proxy.wait_held(Duration::from_secs(60)));
    archiver.ok(&["archive", "--once"]);
    rt.block_on(proxy.release());
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let got = lines(&out);
    let mut got: Vec<String> = got
        .iter()
        .map(|g| g["sequence_number"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = puts.iter().map(|p| p.sequence_number.clone()).collect();
    got.sort();
    want.sort();
    assert_eq!(
        got.len(),
        want.len(),
        "records of the flush committed meanwhile are missing"
    );
    assert_eq!(got, want);
}

/// Every scan of a statement reads the same live tail, read from Kinesis
/// once: a compacted replay (several scans) and a self-join each open one
/// iterator per shard, and their answers count every record exactly once.
#[test]
fn the_live_tail_is_read_once_per_replay_and_per_statement() {
    let k = kinesis();
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let stream = unique("once");
    let c = kinesis_client(&k.endpoint());
    let ws = Workspace::new(&proxy.endpoint(), None, None, "", &[(&stream, "json")]);
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &events(50, 0)).await
    });

    let before = proxy.calls("GetShardIterator");
    let out = ws.dir.path().join("compact.jsonl");
    ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--compact",
        "--to",
        &format!("file://{}", out.display()),
    ]);
    assert_eq!(lines(&out).len(), 7, "one record per key");
    assert_eq!(
        proxy.calls("GetShardIterator") - before,
        1,
        "the compacted replay read the shard more than once"
    );

    let before = proxy.calls("GetShardIterator");
    let n = ws.sql_count(&format!(
        "SELECT count(*) AS n FROM {s} a JOIN {s} b \
           ON a.sequence_number = b.sequence_number AND a.shard_id = b.shard_id \
         WHERE a.sequence_number IN (SELECT sequence_number FROM {s})",
        s = q(&stream)
    ));
    assert_eq!(n, puts.len() as i64);
    assert_eq!(
        proxy.calls("GetShardIterator") - before,
        1,
        "the statement read the shard once per scan"
    );
}
