//! Query-time live reads (`live.S`, `S`, replays) are paced to
//! `query.live_read_share` of each shard's read limits (5 GetRecords calls/s,
//! 2 MiB/s), and a throttled read is waited for instead of failing the query.
//!
//! The proxy in front of kinesis-mock logs when each GetRecords call of each
//! shard arrived; the rate is measured there.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::proxy::Proxy;

/// Records per GetRecords call: small, so that a shard needs many calls.
const PER_CALL: usize = 4;

fn config(share: f64, attempts: u32) -> String {
    format!(
        "[archiver]\nmax_records_per_call = {PER_CALL}\n\
         [query]\nlive_read_share = {share}\nlive_retry_attempts = {attempts}\n"
    )
}

/// The most calls that arrived within any `window` (from one call on).
fn most_in_window(times: &[Instant], window: Duration) -> usize {
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t - times[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Time from the first to the last call.
fn span(times: &[Instant]) -> Duration {
    match (times.first(), times.last()) {
        (Some(a), Some(b)) => *b - *a,
        _ => Duration::ZERO,
    }
}

/// A new two-shard stream with `n` order events put (seed `seed`): its
/// name, the puts, and the fewest records a shard got (enough for many
/// GetRecords calls of [`PER_CALL`] records).
fn two_shard_backlog(
    rt: &tokio::runtime::Runtime,
    k: &Server,
    prefix: &str,
    n: usize,
    seed: u64,
) -> (String, Vec<Put>, usize) {
    let stream = unique(prefix);
    let c = kinesis_client(&k.endpoint());
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(n, seed)).await
    });
    let per_shard_min = ["shardId-000000000000", "shardId-000000000001"]
        .iter()
        .map(|s| puts.iter().filter(|p| p.shard_id == *s).count())
        .min()
        .unwrap_or(0);
    assert!(
        per_shard_min >= 6 * PER_CALL,
        "records per shard: {per_shard_min}"
    );
    (stream, puts, per_shard_min)
}

/// (shard, sequence number) of every record put.
fn put_ids(puts: &[Put]) -> BTreeSet<(String, String)> {
    puts.iter()
        .map(|p| (p.shard_id.clone(), p.sequence_number.clone()))
        .collect()
}

fn row_ids(rows: &[serde_json::Value]) -> BTreeSet<(String, String)> {
    rows.iter()
        .map(|r| {
            (
                r["shard_id"].as_str().unwrap_or_default().to_string(),
                r["sequence_number"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// Check the GetRecords calls the proxy saw since it was last cleared: for
/// every shard, at least `min_calls`, never more than `per_second` within
/// (a little less than) one second. Returns the longest span of a shard.
fn check_rate(proxy: &Proxy, shards: usize, min_calls: usize, per_second: usize) -> Duration {
    let times = proxy.call_times("GetRecords");
    assert!(
        !times.contains_key(""),
        "GetRecords calls of an unknown shard: {times:?}"
    );
    assert_eq!(times.len(), shards, "shards read: {:?}", times.keys());
    let mut longest = Duration::ZERO;
    for (shard, t) in &times {
        assert!(
            t.len() >= min_calls,
            "{shard}: only {} GetRecords calls; the test needs many",
            t.len()
        );
        // 100 ms of slack for the way from the client to the proxy.
        let most = most_in_window(t, Duration::from_millis(900));
        assert!(
            most <= per_second,
            "{shard}: {most} GetRecords calls within one second (allowed {per_second}); \
             {} calls in {:?}",
            t.len(),
            span(t)
        );
        eprintln!(
            "{shard}: {} GetRecords calls in {:?}, at most {most} within 900 ms",
            t.len(),
            span(t)
        );
        longest = longest.max(span(t));
    }
    longest
}

/// Old code read each shard's tail as fast as Kinesis answered (dozens of
/// calls per second here), taking every other consumer's share.
#[test]
fn live_reads_keep_to_their_share_of_each_shards_read_limits() {
    let k = kinesis();
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let (stream, puts, per_shard_min) = two_shard_backlog(&rt, &k, "pace", 100, 11);
    let want = put_ids(&puts);
    let min_calls = per_shard_min / PER_CALL;

    // share 0.4: 2 calls per second per shard, `S` (archive and live).
    let paced = Workspace::new(
        &proxy.endpoint(),
        None,
        None,
        &config(0.4, 10),
        &[(&stream, "json")],
    );
    proxy.clear_call_times();
    let rows = paced.sql(&format!(
        "SELECT shard_id, sequence_number FROM {}",
        q(&stream)
    ));
    assert_eq!(
        row_ids(&rows),
        want,
        "the paced query lost or added records"
    );
    assert_eq!(rows.len(), want.len());
    let slow = check_rate(&proxy, 2, min_calls, 2);
    assert!(
        slow >= Duration::from_millis(400 * (min_calls as u64 - 1)),
        "{min_calls} calls at 2/s took only {slow:?}"
    );

    // A replay reads the live side through the same path.
    proxy.clear_call_times();
    let out = paced.dir.path().join("replay.jsonl");
    paced.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("file://{}", out.display()),
    ]);
    let replayed = parse_json_lines(&std::fs::read(&out).unwrap_or_default());
    assert_eq!(
        row_ids(&replayed),
        want,
        "the paced replay lost or added records"
    );
    check_rate(&proxy, 2, min_calls, 2);

    // The whole limit (1.0): 5 calls per second, so the same read is faster.
    let whole = Workspace::new(
        &proxy.endpoint(),
        None,
        None,
        &config(1.0, 10),
        &[(&stream, "json")],
    );
    proxy.clear_call_times();
    let rows = whole.sql(&format!(
        "SELECT shard_id, sequence_number FROM live.{}",
        q(&stream)
    ));
    assert_eq!(row_ids(&rows), want);
    let fast = check_rate(&proxy, 2, min_calls, 5);
    assert!(
        fast * 3 / 2 < slow,
        "share 1.0 read in {fast:?}, not clearly faster than share 0.4 ({slow:?})"
    );
}

/// Old code counted throttled calls as failed attempts and failed the query
/// after `query.live_retry_attempts` of them; throttling is waited for, while
/// other failures still give up after that many attempts.
#[test]
fn a_throttled_live_read_waits_and_completes() {
    let k = kinesis();
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let stream = unique("throttle");
    let c = kinesis_client(&k.endpoint());
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(20, 12)).await
    });
    let ws = Workspace::new(
        &proxy.endpoint(),
        None,
        None,
        &config(1.0, 2),
        &[(&stream, "json")],
    );
    let sql = format!("SELECT shard_id, sequence_number FROM live.{}", q(&stream));

    proxy.fail_kinesis("GetRecords", "ProvisionedThroughputExceededException", 5);
    let rows = ws.sql(&sql);
    assert_eq!(proxy.injected(), 5, "every throttling answer was given");
    assert_eq!(
        row_ids(&rows),
        put_ids(&puts),
        "the throttled query lost records"
    );

    // A fault that is not throttling still fails the query after
    // live_retry_attempts consecutive calls.
    proxy.fail_kinesis("GetRecords", "InternalFailure", 5);
    let out = ws.run(&["sql", "--format", "json", &sql]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failing live read succeeded");
    assert!(stderr.contains("gave up after 2 attempts"), "{stderr}");
}

/// The bytes of each answer hold the next call back: at share 0.1 a shard
/// gives 0.2 MiB/s, so after an answer of 4 × 200 KB the next call waits
/// about 3.8 s — almost twice the 2 s the call budget alone asks for.
#[test]
fn the_bytes_read_hold_the_next_call_back() {
    let k = kinesis();
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let stream = unique("bytes");
    let c = kinesis_client(&k.endpoint());
    let big: Vec<(String, Vec<u8>)> = (0..2 * PER_CALL)
        .map(|i| {
            let pad = "x".repeat(200_000);
            (
                format!("k{i}"),
                format!(r#"{{"i":{i},"pad":"{pad}"}}"#).into_bytes(),
            )
        })
        .collect();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &big).await
    });
    let ws = Workspace::new(
        &proxy.endpoint(),
        None,
        None,
        &config(0.1, 10),
        &[(&stream, "json")],
    );
    proxy.clear_call_times();
    let rows = ws.sql(&format!(
        "SELECT shard_id, sequence_number FROM live.{}",
        q(&stream)
    ));
    assert_eq!(row_ids(&rows), put_ids(&puts));
    let times = proxy.call_times("GetRecords");
    let t = &times["shardId-000000000000"];
    assert!(t.len() >= 3, "{} GetRecords calls", t.len());
    // The first two calls each read 4 records of 200 KB (800 KB at 0.2 MiB/s).
    for w in t[..3].windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(3000),
            "a call {gap:?} after one that read 800 KB (the byte budget needs ~3.8 s)"
        );
    }
}

/// Old code: an archiver catching up a backlog read each shard as fast as
/// Kinesis answered (here, 5 calls within one second), taking the whole of
/// the shard's 5 calls/s from every other consumer.
#[test]
fn an_archiver_catching_up_keeps_to_max_reads_per_second() {
    let k = kinesis();
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let (stream, puts, per_shard_min) = two_shard_backlog(&rt, &k, "arch-pace", 80, 12);
    let ws = Workspace::new(
        &proxy.endpoint(),
        None,
        None,
        &format!("[archiver]\nmax_records_per_call = {PER_CALL}\nmax_reads_per_second = 3\n"),
        &[(&stream, "json")],
    );
    proxy.clear_call_times();
    ws.ok(&["archive", "--once"]);
    check_rate(&proxy, 2, per_shard_min / PER_CALL, 3);
    // Every record archived, once.
    let rows = ws.sql(&format!(
        "SELECT shard_id, sequence_number FROM archive.{}",
        q(&stream)
    ));
    assert_eq!(rows.len(), puts.len());
    assert_eq!(row_ids(&rows), put_ids(&puts));
}
