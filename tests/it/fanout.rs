//! `archiver.read = "fanout"`: the archiver reads with enhanced fan-out
//! (a registered consumer and SubscribeToShard) against kinesis-mock and
//! ferrokinesis, which both serve SubscribeToShard's event stream to the
//! Rust SDK over plain HTTP/1.1 (chunked). Every record exactly once, with
//! a split during archiving; the consumer registered once and reused by
//! later runs; no GetRecords call at all (counted by the test proxy, which
//! passes event streams through); failed subscriptions retried.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::proxy::Proxy;
use crate::resharding::{archived_count, terminate};

const FANOUT: &str = "[archiver]\nread = \"fanout\"\nshard_discovery_interval = \"1s\"\n\
                      metrics_bind = \"127.0.0.1:0\"\n[archive.flush]\nmax_age = \"500ms\"\n";

/// The consumers registered on `stream`: (name, status).
async fn consumers(c: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, String)> {
    let arn = c
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .unwrap()
        .stream_description_summary
        .unwrap()
        .stream_arn;
    c.list_stream_consumers()
        .stream_arn(arn)
        .send()
        .await
        .unwrap()
        .consumers()
        .iter()
        .map(|c| {
            (
                c.consumer_name().to_string(),
                c.consumer_status().as_str().to_string(),
            )
        })
        .collect()
}

fn archived_exactly(ws: &Workspace, stream: &str, puts: &[Put], what: &str) {
    let table = ws.archive.join(stream);
    for engine in ["pyarrow", "duckdb"] {
        assert_same(
            &puts_multiset(puts),
            &archived_multiset(&read_local(engine, &table)),
            &format!("{what} ({engine})"),
        );
    }
}

/// `archive --once` twice around a split, through the counting proxy: the
/// first run registers the consumer, the second finds it; the split
/// parent is read to its end, then its children; zero GetRecords calls.
fn once_runs_around_a_split(k: &Server, server: &str) {
    let stream = unique("fanout");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(200, 1)).await
    });
    let ws = Workspace::new(&proxy.endpoint(), None, None, FANOUT, &[(&stream, "json")]);
    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("archived 200 records"), "{server}: {err}");
    archived_exactly(&ws, &stream, &puts, &format!("{server}, first run"));
    assert_eq!(proxy.calls("RegisterStreamConsumer"), 1, "{server}");
    assert!(proxy.calls("SubscribeToShard") >= 2, "{server}");

    // Split a shard, write to the parent's children and the other shard.
    rt.block_on(split_first_shard(&c, &stream));
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(200, 2))));
    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shard finished"), "{server}: {err}");
    // The children existed at the start of this run: it reads them too.
    archived_exactly(&ws, &stream, &puts, &format!("{server}, after the split"));

    // Nothing new: nothing archived, and still the one consumer.
    let out = ws.ok(&["archive", "--once"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("archived 0 records"),
        "{server}"
    );
    assert_eq!(
        rt.block_on(consumers(&c, &stream)),
        vec![("fluxcap-archiver".to_string(), "ACTIVE".to_string())],
        "{server}: one consumer, registered once and reused"
    );
    assert_eq!(proxy.calls("RegisterStreamConsumer"), 1, "{server}");
    assert!(proxy.calls("DescribeStreamConsumer") >= 3, "{server}");
    // Every record came through SubscribeToShard: 2, 4 and 3 shards read.
    assert_eq!(proxy.calls("GetRecords"), 0, "{server}: no GetRecords");
    assert_eq!(proxy.calls("GetShardIterator"), 0, "{server}");
    assert!(proxy.calls("SubscribeToShard") >= 7, "{server}");
    // Runs after the first resume their shards at the checkpointed record.
    // (A subscription may be retried: the server may still hold the
    // previous run's for a moment, answering ResourceInUseException.)
    let resumed: std::collections::BTreeSet<(String, String)> = proxy
        .subscriptions()
        .iter()
        .filter(|r| r["StartingPosition"]["Type"] == "AT_SEQUENCE_NUMBER")
        .map(|r| {
            (
                r["ShardId"].as_str().unwrap().to_string(),
                r["StartingPosition"]["SequenceNumber"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    // Run 2: both initial shards; run 3: the open one and both children.
    assert_eq!(resumed.len(), 5, "{server}: {resumed:#?}");
    let out = ws.ok(&["verify"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"),
        "{server}"
    );
}

#[test]
fn fanout_once_runs_around_a_split_on_kinesis_mock() {
    once_runs_around_a_split(&kinesis(), "kinesis-mock");
}

#[test]
fn fanout_once_runs_around_a_split_on_ferrokinesis() {
    once_runs_around_a_split(&ferrokinesis(false), "ferrokinesis");
}

/// A continuous archiver reading with fan-out while a shard is split and
/// records keep coming: every record exactly once, lineage kept, and
/// still no GetRecords call.
#[test]
fn fanout_split_while_archiving() {
    let k = kinesis();
    let stream = unique("fanout-live");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    rt.block_on(create_stream(&c, &stream, 2));
    let ws = Workspace::new(&proxy.endpoint(), None, None, FANOUT, &[(&stream, "json")]);
    let (mut child, log) = ws.spawn_archiver_logged();
    let mut puts = rt.block_on(put_records(&c, &stream, &orders(150, 1)));
    let wait_for = |n: usize, what: &str, child: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while archived_count(&ws, &rt, &stream) < n as u64 {
            let log = || std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "archiver did not catch up: {what}\n{}",
                log()
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "archiver exited early:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(puts.len(), "before the split", &mut child);
    rt.block_on(split_first_shard(&c, &stream));
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(150, 2))));
    wait_for(puts.len(), "after the split", &mut child);
    let st = terminate(&mut child);
    assert!(st.success(), "archiver exit status after SIGTERM: {st}");
    archived_exactly(&ws, &stream, &puts, "split while archiving");
    let out = ws.ok(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no gaps, no duplicates"), "{text}");
    assert_eq!(proxy.calls("GetRecords"), 0);
    assert_eq!(proxy.calls("RegisterStreamConsumer"), 1);
    // The two initial shards, then the split parent's two children.
    assert!(proxy.calls("SubscribeToShard") >= 4);
    assert_eq!(rt.block_on(consumers(&c, &stream)).len(), 1);
}

/// Failed subscriptions (server errors, another subscription still
/// active) are retried with backoff; nothing is lost or read twice.
#[test]
fn fanout_retries_failed_subscriptions() {
    let k = kinesis();
    let stream = unique("fanout-retry");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(100, 3)).await
    });
    proxy.fail_kinesis("SubscribeToShard", "InternalFailure", 2);
    proxy.fail_kinesis("SubscribeToShard", "ResourceInUseException", 1);
    let ws = Workspace::new(&proxy.endpoint(), None, None, FANOUT, &[(&stream, "json")]);
    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("archived 100 records"), "{err}");
    assert_eq!(proxy.injected(), 3);
    assert_eq!(proxy.calls("SubscribeToShard"), 4);
    assert_eq!(proxy.calls("GetRecords"), 0);
    archived_exactly(&ws, &stream, &puts, "after failed subscriptions");
}

/// With a memory budget far too small for every shard's next event at once,
/// the shards take turns (an event is taken from its stream only with memory
/// for it) and everything is archived exactly once.
#[test]
fn fanout_shards_take_turns_within_a_tiny_memory_budget() {
    let k = kinesis();
    let stream = unique("fanout-mem");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 4).await;
        put_records(&c, &stream, &orders(400, 5)).await
    });
    let extra = format!("{FANOUT}memory_budget = \"1MiB\"\n");
    let ws = Workspace::new(&k.endpoint(), None, None, &extra, &[(&stream, "json")]);
    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("archived 400 records"), "{err}");
    archived_exactly(&ws, &stream, &puts, "tiny budget");
}

/// KPL aggregates pushed by SubscribeToShard are de-aggregated as polled ones are.
#[test]
fn fanout_deaggregates_kpl_records() {
    crate::kpl::deaggregated(FANOUT);
}

/// `archiver.read` takes "polling" or "fanout"; `config show` shows it.
#[test]
fn fanout_read_mode_is_validated() {
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "[archiver]\nread = \"push\"\n",
        &[("s", "json")],
    );
    let out = ws.run(&["config", "show"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("archiver.read") || err.contains("read"),
        "{err}"
    );
    assert!(err.contains("fanout"), "{err}");
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "[archiver]\nconsumer_name = \"no spaces allowed\"\n",
        &[("s", "json")],
    );
    let out = ws.run(&["config", "show"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("archiver.consumer_name"), "{err}");
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("s", "json")]);
    let out = ws.ok(&["config", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read = \"polling\""), "{text}");
    assert!(
        text.contains("consumer_name = \"fluxcap-archiver\""),
        "{text}"
    );
}

/// kinesis-mock with its TLS port on a certificate for 127.0.0.1 made by
/// the test; killed on drop.
struct TlsKinesis {
    child: std::process::Child,
    plain: u16,
    tls: u16,
    log: std::path::PathBuf,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TlsKinesis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_kinesis() -> TlsKinesis {
    let dir = tempfile::tempdir().unwrap();
    // A CA, and the server's certificate for 127.0.0.1 signed by it.
    let p = |name: &str| dir.path().join(name);
    let (ca, key, cert) = (p("ca.pem"), p("key.pem"), p("cert.pem"));
    std::fs::write(
        p("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let st = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (to make the emulator's certificate)");
        assert!(st.success(), "openssl {args:?} failed");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=fluxcap test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    let server_json = dir.path().join("server.json");
    let json = serde_json::json!({"server": {
        "key": std::fs::read_to_string(&key).unwrap(),
        "cert": std::fs::read_to_string(&cert).unwrap(),
    }});
    std::fs::write(&server_json, json.to_string()).unwrap();
    let (plain, tls) = (free_port(), free_port());
    let log = dir.path().join("kinesis-mock.log");
    let child = std::process::Command::new(root().join("scripts/kinesis-mock"))
        .arg(plain.to_string())
        .env("KINESIS_MOCK_TLS_PORT", tls.to_string())
        .env("KINESIS_MOCK_CERT_PATH", &server_json)
        // Request lines with their HTTP version are logged at TRACE.
        .env("LOG_LEVEL", "TRACE")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut k = TlsKinesis {
        child,
        plain,
        tls,
        log,
        ca,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for port in [plain, tls] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(k.child.try_wait().unwrap().is_none(), "kinesis-mock exited");
            assert!(Instant::now() < deadline, "kinesis-mock did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    k
}

/// Over TLS the SDK negotiates HTTP/2 (ALPN), as with AWS, where
/// SubscribeToShard needs it: the archiver reads through kinesis-mock's
/// TLS port, trusting its certificate through `AWS_CA_BUNDLE`, and every
/// request it made there — SubscribeToShard included — was HTTP/2.
/// (Over plain `http://` endpoints the SDK speaks HTTP/1.1, which both
/// emulators accept for SubscribeToShard too; AWS endpoints are HTTPS.)
#[test]
fn fanout_over_tls_speaks_http2() {
    let k = tls_kinesis();
    let stream = unique("fanout-h2");
    let c = kinesis_client(&format!("http://127.0.0.1:{}", k.plain));
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(120, 4)).await
    });
    let ws = Workspace::new(
        &format!("https://127.0.0.1:{}", k.tls),
        None,
        None,
        FANOUT,
        &[(&stream, "json")],
    );
    // What the test's own client asked (HTTP/1.1, on the plain port) is logged before.
    let before = std::fs::read_to_string(&k.log).unwrap().lines().count();
    let out = output_within(
        ws.cmd()
            .args(["archive", "--once"])
            .env("AWS_CA_BUNDLE", &k.ca),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("archived 120 records"), "{err}");
    archived_exactly(&ws, &stream, &puts, "over TLS");
    let log = std::fs::read_to_string(&k.log).unwrap();
    // Request lines: "<version> POST <uri> Headers(… x-amz-target: …SubscribeToShard …)".
    let requests: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.contains(" POST ") && l.contains("x-amz-target: Kinesis_20131202."))
        .collect();
    let subscribes: Vec<&str> = requests
        .iter()
        .copied()
        .filter(|l| l.contains("x-amz-target: Kinesis_20131202.SubscribeToShard"))
        .collect();
    assert!(
        subscribes.len() >= 2,
        "SubscribeToShard requests logged: {}",
        subscribes.len()
    );
    let http1: Vec<String> = requests
        .iter()
        .filter(|l| !l.contains("HTTP/2.0 POST "))
        .map(|l| l.chars().take(300).collect())
        .collect();
    assert!(http1.is_empty(), "requests not over HTTP/2: {http1:#?}");
}

/// Subscriptions that end early or break (here: cut by the proxy every
/// 1.5 s, as Kinesis ends each after 5 minutes) are renewed from
/// AFTER_SEQUENCE_NUMBER of the last record read: records put across many
/// subscriptions are archived exactly once.
#[test]
fn fanout_resubscribes_after_the_last_record() {
    let k = kinesis();
    let stream = unique("fanout-resub");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(k.port));
    proxy.cut_subscriptions_after(1500);
    rt.block_on(create_stream(&c, &stream, 1));
    let ws = Workspace::new(&proxy.endpoint(), None, None, FANOUT, &[(&stream, "json")]);
    let mut child = ws.spawn_archiver();
    let mut puts = Vec::new();
    for round in 0..4 {
        puts.extend(rt.block_on(put_records(&c, &stream, &orders(60, 10 + round))));
        let deadline = Instant::now() + Duration::from_secs(120);
        while archived_count(&ws, &rt, &stream) < puts.len() as u64 {
            assert!(
                Instant::now() < deadline,
                "archiver did not catch up (round {round})"
            );
            assert!(child.try_wait().unwrap().is_none(), "archiver exited early");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Let a few more subscriptions come and go over what was read.
    let subscribed = proxy.calls("SubscribeToShard");
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.calls("SubscribeToShard") < subscribed + 2 {
        assert!(Instant::now() < deadline, "no new subscription");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = terminate(&mut child);
    assert!(st.success(), "archiver exit status after SIGTERM: {st}");
    assert!(proxy.calls("SubscribeToShard") >= 4);
    archived_exactly(&ws, &stream, &puts, "across subscriptions");
    // The first subscription starts at the trim horizon; every later one
    // right after a record read (none before the first record arrived).
    let positions: Vec<serde_json::Value> = proxy
        .subscriptions()
        .iter()
        .map(|r| r["StartingPosition"].clone())
        .collect();
    assert_eq!(positions[0]["Type"], "TRIM_HORIZON", "{positions:#?}");
    let seqs: std::collections::HashSet<&str> =
        puts.iter().map(|p| p.sequence_number.as_str()).collect();
    let mut after = 0;
    for p in &positions[1..] {
        match p["Type"].as_str() {
            Some("AFTER_SEQUENCE_NUMBER") => {
                let seq = p["SequenceNumber"].as_str().unwrap();
                assert!(seqs.contains(seq), "{p}: not a record put");
                after += 1;
            }
            Some("TRIM_HORIZON") if after == 0 => {}
            _ => panic!("unexpected starting position {p}"),
        }
    }
    assert!(after >= 4, "{positions:#?}");
    // The last one is after the last record put.
    let last = positions.last().unwrap();
    assert_eq!(
        last["SequenceNumber"].as_str(),
        puts.iter()
            .map(|p| p.sequence_number.as_str())
            .max_by(|a, b| fluxcap::record::cmp_sequence(a, b)),
        "{last}"
    );
    let out = ws.ok(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no gaps, no duplicates"), "{text}");
    assert_eq!(proxy.calls("GetRecords"), 0);
}
