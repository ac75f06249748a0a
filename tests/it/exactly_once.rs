//! Exactly once in the field: what an outside reader sees in the raw layout
//! after every kill -9 (before any recovery), a paused archiver that loses
//! its lease while a successor takes over, and a dead archiver's checkpoint
//! write that reaches the store late.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::harness::*;
use crate::proxy::Proxy;

/// The raw layout as pyarrow sees it.
#[derive(Debug, Default)]
struct Raw {
    /// Relative path → (size, sha256).
    files: BTreeMap<String, (u64, String)>,
    unreadable: Vec<String>,
    records: Vec<(String, String, i64)>,
}

fn raw_layout(args: &[&str]) -> Raw {
    let out = Command::new(python())
        .arg(root().join("scripts/py/raw_layout.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "raw_layout.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Raw {
        files: v["files"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, f)| {
                (
                    k.clone(),
                    (
                        f["size"].as_u64().unwrap(),
                        f["sha256"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect(),
        unreadable: v["unreadable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect(),
        records: v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_str().unwrap().to_string(),
                    r[2].as_i64().unwrap_or(0),
                )
            })
            .collect(),
    }
}

/// What every reader may rely on at any instant: only whole, readable data
/// files with our names; no record twice; no file that was seen before is
/// gone or changed.
fn check_raw(seen: &mut BTreeMap<String, (u64, String)>, raw: &Raw, when: &str) {
    assert!(
        raw.unreadable.is_empty(),
        "{when}: unreadable files {:?}",
        raw.unreadable
    );
    for name in raw.files.keys() {
        let file = name.rsplit('/').next().unwrap_or_default();
        assert!(
            fluxcap::archive::layout::parse_data_file_name(file).is_some(),
            "{when}: a file that is not a data file sits in the table: {name}"
        );
    }
    let mut ids = BTreeSet::new();
    for r in &raw.records {
        assert!(
            ids.insert(r.clone()),
            "{when}: record {r:?} is in two published files"
        );
    }
    for (name, f) in seen.iter() {
        assert_eq!(
            raw.files.get(name),
            Some(f),
            "{when}: published file {name} disappeared or changed"
        );
    }
    seen.extend(raw.files.clone());
}

/// Puts batches until stopped; returns the records put.
struct Producer {
    stop: Arc<AtomicBool>,
    puts: Arc<Mutex<Vec<Put>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Producer {
    fn start(endpoint: &str, stream: &str) -> Producer {
        let (stop, puts) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let c = kinesis_client(endpoint);
        let (s, p, stream) = (stop.clone(), puts.clone(), stream.to_string());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut seed = 1000;
            while !s.load(Ordering::Relaxed) {
                let got = rt.block_on(put_records(&c, &stream, &orders(25, seed)));
                p.lock().unwrap().extend(got);
                seed += 1;
            }
        });
        Producer {
            stop,
            puts,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Put> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.puts.lock().unwrap().clone()
    }
}

const SMALL_FLUSHES: &str = "[archive.flush]\nmax_age = \"200ms\"\nmax_bytes = \"16KiB\"\n[archiver]\npoll_interval = \"100ms\"\nmetrics_bind = \"\"\nlease_ttl = \"3s\"";

fn kill_loop(
    ws: &Workspace,
    kills: usize,
    window_ms: std::ops::Range<u64>,
    raw_args: &[&str],
    label: &str,
) {
    let mut rng = rand::rng();
    let mut seen = BTreeMap::new();
    let mut window = window_ms;
    let mut i = 0;
    // At least `kills` kills; on a machine so loaded that no run got as far
    // as publishing, more (up to twice as many), each window twice as long
    // as the last (at most 30 s), until one did.
    while i < kills || (seen.is_empty() && i < 2 * kills) {
        let mut child = ws.spawn_archiver();
        // The kill moment is random by design (not a wait for anything).
        std::thread::sleep(Duration::from_millis(rng.random_range(window.clone())));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Before any recovery: what does an outside reader see?
        check_raw(
            &mut seen,
            &raw_layout(raw_args),
            &format!("{label}, after kill {}", i + 1),
        );
        if seen.is_empty() {
            window = window.start..(window.end * 2).min(30_000).max(window.start + 1);
        }
        i += 1;
    }
    assert!(!seen.is_empty(), "{label}: nothing was ever published");
}

#[test]
fn kill_9_publishes_only_committed_files_on_a_local_directory() {
    let k = kinesis();
    let stream = unique("pub-local");
    let c = kinesis_client(&k.endpoint());
    rt().block_on(create_stream(&c, &stream, 2));
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        SMALL_FLUSHES,
        &[(&stream, "json")],
    );
    let producer = Producer::start(&k.endpoint(), &stream);
    let table = ws.archive.join(&stream);
    std::fs::create_dir_all(&table).unwrap();
    kill_loop(&ws, 20, 400..3000, &[table.to_str().unwrap()], "local");
    let puts = producer.finish();
    ws.ok(&["archive", "--once"]);
    let mut seen = BTreeMap::new();
    check_raw(
        &mut seen,
        &raw_layout(&[table.to_str().unwrap()]),
        "local, at the end",
    );
    let got = read_local("pyarrow", &table);
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "local, after 20 kill -9",
    );
    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));
}

#[test]
fn kill_9_publishes_only_committed_files_on_slow_s3() {
    let k = kinesis();
    let s3 = s3();
    let stream = unique("pub-s3");
    let bucket = unique("pub-s3");
    create_bucket(&s3, &bucket);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 2));
    // Every store request takes 15 ms more: kills land inside uploads,
    // commits and publications.
    let proxy = rt.block_on(Proxy::start(s3.port));
    proxy.set_delay(15);
    let loc = format!("s3://{bucket}/a");
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&loc),
        Some(&proxy.endpoint()),
        SMALL_FLUSHES,
        &[(&stream, "json")],
    );
    let producer = Producer::start(&k.endpoint(), &stream);
    let prefix = format!("a/{stream}");
    let raw_args = [
        "--s3-endpoint",
        &s3.endpoint(),
        "--bucket",
        &bucket,
        "--prefix",
        &prefix,
    ];
    kill_loop(&ws, 20, 1000..5000, &raw_args, "s3");
    let puts = producer.finish();
    proxy.set_delay(0);
    ws.ok(&["archive", "--once"]);
    let mut seen = BTreeMap::new();
    check_raw(&mut seen, &raw_layout(&raw_args), "s3, at the end");
    let got = read_archive("pyarrow", &raw_args);
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "s3, after 20 kill -9",
    );
    // Uploads that died with a process were aborted by the next holder.
    let out = Command::new(python())
        .arg("-c")
        .arg(format!(
            "import boto3\nfrom botocore.config import Config\ns3=boto3.client('s3',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='test',aws_secret_access_key='test',config=Config(s3={{'addressing_style':'path'}}))\nprint(len(s3.list_multipart_uploads(Bucket='{bucket}',Prefix='a/').get('Uploads',[])))",
            s3.endpoint()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "incomplete multipart uploads left: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));
}

/// Wait for `child` to exit within `timeout`; its exit code.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &std::process::Child, sig: libc::c_int) {
    // SAFETY: kill(2) on a child we own; no memory is shared.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// A one-shard stream with `n` records, a bucket behind a [`Proxy`], and a
/// workspace archiving the one into the other through the proxy.
struct ProxiedS3 {
    /// Kept alive for the test's duration.
    _k: Server,
    s3: Server,
    stream: String,
    bucket: String,
    c: aws_sdk_kinesis::Client,
    rt: tokio::runtime::Runtime,
    proxy: Proxy,
    ws: Workspace,
    puts: Vec<Put>,
}

impl ProxiedS3 {
    fn new(name: &str, n: usize, seed: u64) -> Self {
        let k = kinesis();
        let s3 = s3();
        let stream = unique(name);
        let bucket = unique(name);
        create_bucket(&s3, &bucket);
        let c = kinesis_client(&k.endpoint());
        let rt = rt();
        let puts = rt.block_on(async {
            create_stream(&c, &stream, 1).await;
            put_records(&c, &stream, &orders(n, seed)).await
        });
        let proxy = rt.block_on(Proxy::start(s3.port));
        let ws = Workspace::new(
            &k.endpoint(),
            Some(&format!("s3://{bucket}/a")),
            Some(&proxy.endpoint()),
            SMALL_FLUSHES,
            &[(&stream, "json")],
        );
        ProxiedS3 {
            _k: k,
            s3,
            stream,
            bucket,
            c,
            rt,
            proxy,
            ws,
            puts,
        }
    }

    /// Arguments of raw_layout.py / read_archive.py for the stream's table.
    fn raw_args(&self) -> Vec<String> {
        [
            "--s3-endpoint".to_string(),
            self.s3.endpoint(),
            "--bucket".into(),
            self.bucket.clone(),
            "--prefix".into(),
            format!("a/{}", self.stream),
        ]
        .to_vec()
    }
}

#[test]
fn a_paused_archiver_that_lost_its_lease_publishes_nothing_after_a_take_over() {
    let t = ProxiedS3::new("paused", 300, 41);
    let (rt, proxy, ws, puts) = (&t.rt, &t.proxy, &t.ws, &t.puts);
    // The first archiver is paused in the middle of uploading a flush.
    proxy.hold_next("PUT", "/_fluxcap/staging/");
    let mut first = ws.spawn_archiver();
    rt.block_on(proxy.wait_held(Duration::from_secs(60)));
    signal(&first, libc::SIGSTOP);

    // The second sees a lease nobody renews, takes it over and archives everything.
    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("archived"), "{err}");

    // The first one's upload lands late, then it resumes: it must not commit
    // or publish anything, and it stops (fenced).
    assert!(
        rt.block_on(proxy.release()) < 300,
        "the held upload reached the store"
    );
    signal(&first, libc::SIGCONT);
    let code = wait_exit(&mut first, Duration::from_secs(60));
    assert_eq!(code, Some(4), "the paused archiver stops as fenced");

    let args = t.raw_args();
    let raw_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut seen = BTreeMap::new();
    check_raw(&mut seen, &raw_layout(&raw_args), "after the take-over");
    let got = read_archive("duckdb", &raw_args);
    assert_same(
        &puts_multiset(puts),
        &archived_multiset(&got),
        "after the take-over",
    );
    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));
}

#[test]
fn a_dead_archivers_late_checkpoint_write_does_not_stop_its_successor() {
    let t = ProxiedS3::new("late", 200, 7);
    let (rt, proxy, ws, c, stream) = (&t.rt, &t.proxy, &t.ws, &t.c, &t.stream);
    let first_puts = t.puts.clone();
    // Generation 1 is the first archiver's take-over generation, 2 its first
    // commit: hold that one until the archiver is dead.
    let gen2 = "/_fluxcap/checkpoints/shardId-000000000000/00000000000000000002.json";
    proxy.hold_next("PUT", gen2);
    let mut first = ws.spawn_archiver();
    let held = rt.block_on(proxy.wait_held(Duration::from_secs(60)));
    assert!(held.contains(gen2), "{held}");
    first.kill().unwrap();
    first.wait().unwrap();

    // More traffic while nobody archives.
    let more = rt.block_on(put_records(c, stream, &orders(150, 8)));

    // The successor reads the state (generation 1); its own first checkpoint
    // write (its take-over generation 2) is held until the dead one's write
    // has landed, so the two collide.
    proxy.hold_next("PUT", gen2);
    let mut second = ws.cmd();
    second
        .args(["archive", "--once"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let second = second.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if proxy.held_count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the successor never wrote a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let late = rt.block_on(proxy.release());
    assert_eq!(
        late, 200,
        "the dead archiver's late write is accepted by the store"
    );
    rt.block_on(proxy.release());
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "successor failed ({}): {err}",
        out.status
    );
    assert!(
        err.contains("landed late"),
        "the late write is logged: {err}"
    );

    let args = t.raw_args();
    let raw_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut seen = BTreeMap::new();
    check_raw(&mut seen, &raw_layout(&raw_args), "after the late write");
    let all: Vec<Put> = first_puts.into_iter().chain(more).collect();
    let got = read_archive("pyarrow", &raw_args);
    assert_same(
        &puts_multiset(&all),
        &archived_multiset(&got),
        "after the late write",
    );
    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));
}

#[test]
fn failing_list_shards_never_interrupts_archiving() {
    let k = kinesis();
    let stream = unique("nolist");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(60, 61)).await
    });
    let proxy = rt.block_on(Proxy::start(k.port));
    let port = free_port();
    let ws = Workspace::new(
        &proxy.endpoint(),
        None,
        None,
        &format!(
            "[archive.flush]\nmax_age = \"200ms\"\n[archiver]\npoll_interval = \"100ms\"\nshard_discovery_interval = \"200ms\"\nmax_backoff = \"100ms\"\nmetrics_bind = \"127.0.0.1:{port}\""
        ),
        &[(&stream, "json")],
    );
    let mut child = ws.spawn_archiver();
    let wait_for = |n: usize, child: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while crate::fencing::metric(port, "fluxcap_records_archived_total") != Some(n as u64) {
            assert!(Instant::now() < deadline, "never archived {n} records");
            assert!(child.try_wait().unwrap().is_none(), "the archiver exited");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(puts.len(), &mut child);
    // From now on every ListShards fails, longer than one listing's own retries.
    proxy.fail_kinesis("ListShards", "InternalFailure", u32::MAX);
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(40, 62))));
    wait_for(puts.len(), &mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.injected() < 40 {
        assert!(
            Instant::now() < deadline,
            "the archiver stopped listing shards"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the archiver exited on a failing ListShards"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(20, 63))));
    wait_for(puts.len(), &mut child);
    assert!(crate::resharding::terminate(&mut child).success());
    let got = read_local("pyarrow", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "ListShards failing",
    );
}
