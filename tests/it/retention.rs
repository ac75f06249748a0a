//! Retention loss is recorded, never hidden, and never blocks the lineage:
//! records that expired while no archiver ran, and a closed shard that left
//! `ListShards` before it was archived to its end.

use crate::harness::*;
use crate::proxy::Proxy;

fn verify_report(ws: &Workspace) -> (i32, String) {
    let out = ws.run(&["verify"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

fn status_json(ws: &Workspace) -> serde_json::Value {
    let out = ws.ok(&["status", "--format", "json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn shard_gaps(status: &serde_json::Value, shard: &str) -> Vec<String> {
    status["streams"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard_id"] == shard)
        .map(|s| {
            s["gaps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn records_that_expired_while_no_archiver_ran_are_recorded_as_a_gap() {
    let k = ferrokinesis(false);
    let stream = unique("expired");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let archived_first = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(100, 1)).await
    });
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    ws.ok(&["archive", "--once"]);
    let lost = rt.block_on(put_records(&c, &stream, &orders(80, 2)));
    // The archiver stays down longer than the retention: everything stored
    // so far leaves the stream (the emulator's test hook does what time would).
    let removed: usize = reqwest_post(&format!("{}/_fluxcap/expire", k.endpoint()), &stream);
    assert_eq!(removed, 180);
    let after = rt.block_on(put_records(&c, &stream, &orders(50, 3)));

    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no longer in the stream"),
        "the loss is logged: {err}"
    );

    let kept: Vec<Put> = archived_first.into_iter().chain(after).collect();
    let got = read_local("pyarrow", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&kept),
        &archived_multiset(&got),
        "around the gap",
    );
    assert!(
        !got.iter()
            .any(|g| lost.iter().any(|l| l.sequence_number == g.sequence_number))
    );

    let (code, report) = verify_report(&ws);
    assert_eq!(code, 3, "verify fails on a recorded gap: {report}");
    let first_after = &kept[100].sequence_number;
    assert!(
        report.contains("gap (recorded") && report.contains(first_after.as_str()),
        "{report}"
    );
    let gaps = shard_gaps(&status_json(&ws), "shardId-000000000000");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert!(gaps[0].contains(first_after.as_str()), "{gaps:?}");
}

#[test]
fn a_closed_shard_that_left_the_stream_is_a_gap_and_releases_its_children() {
    let k = kinesis();
    let stream = unique("gone");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let first = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(60, 11)).await
    });
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    ws.ok(&["archive", "--once"]);
    let lost = rt.block_on(async {
        let lost = put_records(&c, &stream, &orders(40, 12)).await;
        split_first_shard(&c, &stream).await;
        lost
    });
    let children = rt.block_on(put_records(&c, &stream, &orders(60, 13)));
    assert!(
        children
            .iter()
            .all(|p| p.shard_id != "shardId-000000000000")
    );

    // Through a proxy that leaves the closed parent out of ListShards, as AWS
    // does once it is older than the retention.
    let proxy = rt.block_on(Proxy::start(k.port));
    proxy.hide_shard("shardId-000000000000");
    let hidden = Workspace::new(
        &proxy.endpoint(),
        Some(ws.archive.to_str().unwrap()),
        None,
        "",
        &[(&stream, "json")],
    );
    let out = hidden.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is no longer in the stream"), "{err}");

    let kept: Vec<Put> = first.into_iter().chain(children).collect();
    let got = read_local("duckdb", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&kept),
        &archived_multiset(&got),
        "children archived",
    );
    assert!(
        !got.iter()
            .any(|g| lost.iter().any(|l| l.sequence_number == g.sequence_number))
    );

    let (code, report) = verify_report(&ws);
    assert_eq!(code, 3, "{report}");
    assert!(report.contains("the end of the shard"), "{report}");
    let gaps = shard_gaps(&status_json(&hidden), "shardId-000000000000");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
}

/// POST `body` to `url` and parse the answer as a number.
fn reqwest_post(url: &str, body: &str) -> usize {
    use std::io::{Read, Write};
    let u = url::Url::parse(url).unwrap();
    let mut s = std::net::TcpStream::connect((u.host_str().unwrap(), u.port().unwrap())).unwrap();
    write!(
        s,
        "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        u.path(),
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad answer: {resp}"))
}

#[test]
fn a_re_created_stream_is_archived_as_a_new_stream() {
    let k = kinesis();
    let stream = unique("recreated");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let old = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        let mut p = put_records(&c, &stream, &orders(50, 21)).await;
        split_first_shard(&c, &stream).await;
        p.extend(put_records(&c, &stream, &orders(50, 22)).await);
        p
    });
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    ws.ok(&["archive", "--once"]);
    let table = ws.archive.join(&stream);
    let before = read_local("pyarrow", &table);
    assert_same(
        &puts_multiset(&old),
        &archived_multiset(&before),
        "first stream",
    );
    let files_before: Vec<(std::path::PathBuf, Vec<u8>)> = walk(&table)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();

    // Deleted and re-created under the same name: shard ids start again.
    let new = rt.block_on(async {
        c.delete_stream().stream_name(&stream).send().await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while c
            .describe_stream_summary()
            .stream_name(&stream)
            .send()
            .await
            .is_ok()
        {
            assert!(std::time::Instant::now() < deadline, "stream not deleted");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(200, 23)).await
    });
    assert!(new.iter().all(|p| p.shard_id == "shardId-000000000000"));
    // Before the archiver meets the new stream, `S` is the old stream's
    // archive plus the new stream read live from its start (the old
    // checkpoints name positions the new stream does not have).
    let n = ws.sql_count(&format!("SELECT count(*) AS n FROM {}", q(&stream)));
    assert_eq!(n, 300);

    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("re-created"), "{err}");
    assert!(err.contains("archived 200 records"), "{err}");

    let all: Vec<Put> = old.into_iter().chain(new).collect();
    let got = read_local("duckdb", &table);
    assert_same(
        &puts_multiset(&all),
        &archived_multiset(&got),
        "both streams",
    );
    for (p, b) in &files_before {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
    // The new stream's records are also in `fluxcap sql` (archive + live).
    let n = ws.sql_count(&format!("SELECT count(*) AS n FROM {}", q(&stream)));
    assert_eq!(n, 300);
    // status says so; the old stream's open shards may have held unread
    // records when it was deleted: recorded as gaps, which verify reports.
    let st = status_json(&ws);
    let states: Vec<&str> = st["streams"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"previous stream"), "{states:?}");
    let (code, report) = verify_report(&ws);
    assert_eq!(code, 3, "{report}");
    assert!(report.contains("deleted (and re-created)"), "{report}");
    assert!(!report.contains("duplicate"), "{report}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if !p.file_name().unwrap().to_string_lossy().starts_with('_') {
                out.extend(walk(&p));
            }
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn status_keeps_its_retention_warning_through_empty_pages_and_throttling() {
    let k = kinesis();
    let stream = unique("peek");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(20, 31)).await;
    });
    let proxy = rt.block_on(Proxy::start(k.port));
    // Any unarchived record is "at risk" under a 25 h threshold (24 h retention).
    let ws = Workspace::new(
        &proxy.endpoint(),
        None,
        None,
        "[status]\nretention_warning = \"25h\"\n[archiver]\nmax_backoff = \"100ms\"",
        &[(&stream, "json")],
    );
    let shard = |st: &serde_json::Value| st["streams"][0]["shards"][0].clone();

    // Throttled twice, then three empty pages behind the tip, then the record.
    proxy.fail_kinesis("GetRecords", "ProvisionedThroughputExceededException", 2);
    proxy.empty_get_records(3);
    let st = status_json(&ws);
    assert!(shard(&st)["warning"].as_bool().unwrap(), "{st}");
    let expires = shard(&st)["expires_in_secs"].as_i64().unwrap();
    assert!(expires > 23 * 3600 && expires <= 24 * 3600, "{st}");
    assert_eq!(proxy.injected(), 2);

    // No answer at all: warn from the last archived record's arrival.
    let direct = Workspace::new(
        &k.endpoint(),
        Some(ws.archive.to_str().unwrap()),
        None,
        "",
        &[(&stream, "json")],
    );
    direct.ok(&["archive", "--once"]);
    rt.block_on(put_records(&c, &stream, &orders(5, 32)));
    proxy.fail_kinesis("GetRecords", "InternalFailure", u32::MAX);
    let st = status_json(&ws);
    assert!(shard(&st)["warning"].as_bool().unwrap(), "{st}");
    assert!(shard(&st)["expires_in_secs"].as_i64().is_some(), "{st}");
    assert!(
        st["streams"][0]["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("retention")),
        "{st}"
    );
}
