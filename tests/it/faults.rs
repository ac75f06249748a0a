//! Fault injection: a proxy in front of Kinesis and S3 answers a fraction of
//! requests with throttling errors, 500s and connection resets (before or
//! after forwarding); the archive still completes with nothing lost or
//! duplicated. And deterministically: the response of a conditional write
//! (lease renewal, checkpoint) that the store did apply is lost, and the
//! retried write is recognised as ours rather than as another archiver's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;
use crate::proxy::{Proxy, forward, read_request, reset};
use crate::resharding::terminate;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Kinesis,
    S3,
}

#[derive(Default)]
struct Injected {
    throttled: AtomicU64,
    errors: AtomicU64,
    resets: AtomicU64,
    lost_responses: AtomicU64,
    forwarded: AtomicU64,
}

struct FaultProxy {
    port: u16,
    injected: Arc<Injected>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_proxy(upstream_port: u16, kind: Upstream, rate: f64) -> FaultProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let injected = Arc::new(Injected::default());
    let inj = injected.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let inj = inj.clone();
            tokio::spawn(async move {
                let _ = handle(sock, upstream_port, kind, rate, inj).await;
            });
        }
    });
    FaultProxy {
        port,
        injected,
        task,
    }
}

fn canned(kind: Upstream, throttle: bool) -> Vec<u8> {
    let (status, ctype, body) = match (kind, throttle) {
        (Upstream::Kinesis, true) => (
            "400 Bad Request",
            "application/x-amz-json-1.1",
            r#"{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for shard (injected)"}"#.to_string(),
        ),
        (Upstream::Kinesis, false) => (
            "500 Internal Server Error",
            "application/x-amz-json-1.1",
            r#"{"__type":"InternalFailure","message":"injected"}"#.to_string(),
        ),
        (Upstream::S3, true) => (
            "503 Slow Down",
            "application/xml",
            "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>".to_string(),
        ),
        (Upstream::S3, false) => (
            "500 Internal Server Error",
            "application/xml",
            "<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>injected</Message></Error>".to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn handle(
    mut sock: TcpStream,
    upstream: u16,
    kind: Upstream,
    rate: f64,
    inj: Arc<Injected>,
) -> std::io::Result<()> {
    let Some((head, body)) = read_request(&mut sock).await? else {
        return Ok(());
    };
    let roll: f64 = rand::rng().random();
    if roll < rate * 0.35 {
        inj.throttled.fetch_add(1, Ordering::Relaxed);
        sock.write_all(&canned(kind, true)).await?;
        return Ok(());
    }
    if roll < rate * 0.6 {
        inj.errors.fetch_add(1, Ordering::Relaxed);
        sock.write_all(&canned(kind, false)).await?;
        return Ok(());
    }
    if roll < rate * 0.8 {
        inj.resets.fetch_add(1, Ordering::Relaxed);
        reset(sock);
        return Ok(());
    }
    // Forward, one request per connection.
    let resp = forward(upstream, &head, &body).await?;
    if roll < rate {
        // The upstream applied the request but the response is lost.
        inj.lost_responses.fetch_add(1, Ordering::Relaxed);
        reset(sock);
        return Ok(());
    }
    inj.forwarded.fetch_add(1, Ordering::Relaxed);
    sock.write_all(&resp).await?;
    sock.shutdown().await?;
    Ok(())
}

/// `engine` reads the archive of `stream` under `a/` in `bucket` straight
/// from the S3 server: every record of `puts` exactly once.
fn assert_archived_once(
    engine: &str,
    s3: &Server,
    bucket: &str,
    stream: &str,
    puts: &[Put],
    what: &str,
) {
    let prefix = format!("a/{stream}");
    let endpoint = s3.endpoint();
    let args = [
        "--s3-endpoint",
        &endpoint,
        "--bucket",
        bucket,
        "--prefix",
        &prefix,
    ];
    let got = read_archive(engine, &args);
    assert_same(&puts_multiset(puts), &archived_multiset(&got), what);
}

#[test]
fn archive_survives_throttling_500s_and_resets() {
    let k = kinesis();
    let s3 = s3();
    let stream = unique("faulty");
    let bucket = unique("faulty");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(800, 5)).await
    });
    create_bucket(&s3, &bucket);

    let (kp, sp) = rt.block_on(async {
        (
            start_proxy(k.port, Upstream::Kinesis, 0.25).await,
            start_proxy(s3.port, Upstream::S3, 0.2).await,
        )
    });
    let loc = format!("s3://{bucket}/a");
    let ws = Workspace::new(
        &format!("http://127.0.0.1:{}", kp.port),
        Some(&loc),
        Some(&format!("http://127.0.0.1:{}", sp.port)),
        // Small limits: many GetRecords calls and many flushes (many S3 writes).
        "[archive.flush]\nmax_bytes = \"8KiB\"\n[archiver]\nmax_records_per_call = 10\nmax_backoff = \"200ms\"",
        &[(&stream, "json")],
    );
    // The proxies run on `rt`'s worker threads while the binary runs.
    let out = ws.run(&["archive", "--once"]);
    assert!(
        out.status.success(),
        "archive under faults failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("calls retried"), "{err}");
    for (name, p) in [("kinesis", &kp), ("s3", &sp)] {
        let i = &p.injected;
        let faults = i.throttled.load(Ordering::Relaxed)
            + i.errors.load(Ordering::Relaxed)
            + i.resets.load(Ordering::Relaxed);
        assert!(faults >= 5, "{name}: only {faults} faults injected");
    }
    assert!(
        sp.injected.lost_responses.load(Ordering::Relaxed)
            + kp.injected.lost_responses.load(Ordering::Relaxed)
            > 0
    );

    // Read the result directly from the S3 server (no proxy).
    assert_archived_once(
        "duckdb",
        &s3,
        &bucket,
        &stream,
        &puts,
        "archive under faults",
    );
    let direct = Workspace::new(
        &k.endpoint(),
        Some(&loc),
        Some(&s3.endpoint()),
        "",
        &[(&stream, "json")],
    );
    direct.ok(&["verify"]);
}

/// One conditional write the store applied but whose answer is lost: `(path
/// part, header the request carries, how many times)`.
type Lose<'a> = (&'a str, Option<&'a str>, u32);

/// Archive a stream on S3 through a proxy that loses the answers of `lose`,
/// until every answer was lost, every record is committed and `renewed`
/// (the lease or heartbeat folder) was written once more and answered; then
/// SIGTERM: exit 0, never "fenced", every record exactly once.
fn archive_with_lost_responses(extra: &str, lose: &[Lose], renewed: &str) {
    let k = kinesis();
    let s3 = s3();
    let stream = unique("lostresp");
    let bucket = unique("lostresp");
    create_bucket(&s3, &bucket);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(300, 11)).await
    });
    let proxy = rt.block_on(Proxy::start(s3.port));
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for &(part, header, times) in lose {
        proxy.lose_responses("PUT", part, header, times);
        *want.entry(part).or_default() += u64::from(times);
    }
    let loc = format!("s3://{bucket}/a");
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&loc),
        Some(&proxy.endpoint()),
        &format!(
            "[archive.flush]\nmax_age = \"200ms\"\n[archiver]\npoll_interval = \"100ms\"\nmetrics_bind = \"\"\nlease_ttl = \"3s\"\n{extra}"
        ),
        &[(&stream, "json")],
    );
    let (mut child, log) = ws.spawn_archiver_logged();
    let alive = |child: &mut std::process::Child| child.try_wait().unwrap().is_none();
    // Read the checkpoints straight from the S3 server (no proxy).
    let direct = s3_archive(&s3.endpoint(), &bucket, "a");
    let archived_count = || -> u64 {
        rt.block_on(fluxcap::archive::checkpoint::load_all(&direct, &stream))
            .map(|cks| cks.iter().map(|c| c.records).sum())
            .unwrap_or(0)
    };
    wait_until(
        60,
        "the lost responses and the whole stream archived",
        || {
            assert!(
                alive(&mut child),
                "the archiver stopped: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            want.iter().all(|(part, n)| proxy.lost(part) == *n)
                && archived_count() == puts.len() as u64
        },
    );
    // One more renewal after the lost ones, answered: the lease is still ours.
    let renewals = |p: &Proxy| {
        p.requests()
            .iter()
            .filter(|r| r.line.starts_with("PUT ") && r.line.contains(renewed))
            .count()
    };
    let seen = renewals(&proxy);
    wait_until(30, "a renewal after the lost ones", || {
        assert!(alive(&mut child), "the archiver stopped");
        renewals(&proxy) > seen
    });
    let st = terminate(&mut child);
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(st.success(), "exit status {st}: {err}");
    assert!(!err.contains("fenced"), "{err}");
    assert_archived_once(
        "pyarrow",
        &s3,
        &bucket,
        &stream,
        &puts,
        "after lost responses",
    );
    ws.ok(&["verify"]);
}

/// The lease's creation and its first two renewals (conditional updates of
/// the version we wrote), and two checkpoints (conditional creates).
#[test]
fn a_conditional_write_whose_response_was_lost_is_recognised_as_ours() {
    archive_with_lost_responses(
        "",
        &[
            ("/_fluxcap/lease/", Some("if-none-match"), 1),
            ("/_fluxcap/lease/", Some("if-match"), 2),
            ("/_fluxcap/checkpoints/", None, 2),
        ],
        "/_fluxcap/lease/",
    );
}

/// A shared archiver: its heartbeat's creation and two renewals, its claim
/// of the shard, and two writes of the positions table (read, merged and
/// written conditionally by shared archivers).
#[test]
fn a_shared_archivers_conditional_writes_survive_lost_responses() {
    archive_with_lost_responses(
        "shared = true\nshard_discovery_interval = \"1s\"",
        &[
            ("/_fluxcap/workers/", Some("if-none-match"), 1),
            ("/_fluxcap/workers/", Some("if-match"), 2),
            ("/_fluxcap/owners/", None, 1),
            ("/fluxcap-positions/", None, 2),
        ],
        "/_fluxcap/workers/",
    );
}
