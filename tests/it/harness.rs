//! Shared test harness: starts real local servers (kinesis-mock, the moto S3
//! server) on free loopback ports, gives each test its own stream/bucket and
//! temp directory, runs the real `fluxcap` binary, and reads archives back
//! with independent readers (pyarrow, DuckDB) through scripts/py.
//!
//! Servers are child processes killed on drop. `scripts/setup` must have
//! installed them (scripts/test does).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use base64::Engine as _;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> PathBuf {
    let p = root().join(".local/venv/bin/python");
    assert!(
        p.exists(),
        "missing {}: run scripts/setup first",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until a TCP connect to the port succeeds (the server is listening).
fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before listening: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 60s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server child process, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(script: &str, what: &str) -> Server {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let (_, logpath) = log.keep().unwrap();
    let mut child = Command::new(root().join("scripts").join(script))
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&logpath).unwrap())
        .stderr(std::fs::File::create(logpath.with_extension("err")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} (run scripts/setup): {e}"));
    wait_listening(port, &mut child, what);
    Server { child, port }
}

/// A fresh kinesis-mock server.
pub fn kinesis() -> Server {
    start("kinesis-mock", "kinesis-mock")
}

/// A fresh moto S3 server.
pub fn s3() -> Server {
    start("s3-server", "moto S3 server")
}

/// A unique name for a test's stream or bucket.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn kinesis_client(endpoint: &str) -> Client {
    let creds = aws_sdk_kinesis::config::Credentials::new("test", "test", None, None, "test");
    let conf = aws_sdk_kinesis::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        // A request the emulator never answers fails (and is retried by the
        // SDK) instead of hanging the test.
        .timeout_config(
            aws_sdk_kinesis::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .build();
    Client::from_conf(conf)
}

pub async fn create_stream(c: &Client, name: &str, shards: i32) {
    c.create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    wait_active(c, name).await;
}

pub async fn wait_active(c: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = c
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .unwrap();
        let st = d
            .stream_description_summary()
            .unwrap()
            .stream_status()
            .clone();
        if st == aws_sdk_kinesis::types::StreamStatus::Active {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} not ACTIVE: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Split the first listed shard of `stream` in the middle of its hash range
/// and wait until the stream is active again.
pub async fn split_first_shard(c: &Client, stream: &str) {
    let shards = c.list_shards().stream_name(stream).send().await.unwrap();
    let s0 = &shards.shards()[0];
    let r = s0.hash_key_range().unwrap();
    let start: u128 = r.starting_hash_key().parse().unwrap();
    let end: u128 = r.ending_hash_key().parse().unwrap();
    c.split_shard()
        .stream_name(stream)
        .shard_to_split(s0.shard_id())
        .new_starting_hash_key(((start + end) / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(c, stream).await;
}

/// Merge the two open children of the one split of `stream` back into one
/// shard and wait until the stream is active again.
pub async fn merge_split_children(c: &Client, stream: &str) {
    let shards = c.list_shards().stream_name(stream).send().await.unwrap();
    let open: Vec<_> = shards
        .shards()
        .iter()
        .filter(|s| {
            s.sequence_number_range()
                .unwrap()
                .ending_sequence_number()
                .is_none()
                && s.parent_shard_id().is_some()
        })
        .collect();
    assert_eq!(open.len(), 2, "two children after the split");
    c.merge_shards()
        .stream_name(stream)
        .shard_to_merge(open[0].shard_id())
        .adjacent_shard_to_merge(open[1].shard_id())
        .send()
        .await
        .unwrap();
    wait_active(c, stream).await;
}

/// A record as put, with where Kinesis placed it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Put {
    pub shard_id: String,
    pub sequence_number: String,
    pub subsequence_number: i64,
    pub partition_key: String,
    pub data: Vec<u8>,
}

/// Put records (partition key, data) in batches of up to 500, retrying failed entries in order.
pub async fn put_records(c: &Client, stream: &str, recs: &[(String, Vec<u8>)]) -> Vec<Put> {
    let mut out = Vec::with_capacity(recs.len());
    for chunk in recs.chunks(250) {
        let mut pending: Vec<usize> = (0..chunk.len()).collect();
        while !pending.is_empty() {
            let entries: Vec<_> = pending
                .iter()
                .map(|&i| {
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .partition_key(&chunk[i].0)
                        .data(Blob::new(chunk[i].1.clone()))
                        .build()
                        .unwrap()
                })
                .collect();
            let resp = c
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
                .unwrap();
            let mut retry = Vec::new();
            for (k, r) in resp.records().iter().enumerate() {
                let i = pending[k];
                match (r.shard_id(), r.sequence_number()) {
                    (Some(s), Some(q)) if r.error_code().is_none() => out.push(Put {
                        shard_id: s.into(),
                        sequence_number: q.into(),
                        subsequence_number: 0,
                        partition_key: chunk[i].0.clone(),
                        data: chunk[i].1.clone(),
                    }),
                    _ => retry.push(i),
                }
            }
            pending = retry;
        }
    }
    out
}

/// Realistic JSON order events.
pub fn orders(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let id = seed * 1_000_000 + i as u64;
            let key = format!("customer-{}", id % 37);
            let body = format!(
                r#"{{"order_id":"o-{id}","customer":"{key}","type":"{}","amount":{}.{:02},"items":[{{"sku":"sku-{}","qty":{}}}],"ts":"2026-11-25T12:00:00Z"}}"#,
                ["created", "paid", "shipped", "cancelled"][i % 4],
                (id * 7) % 500,
                id % 100,
                id % 91,
                1 + id % 4
            );
            (key, body.into_bytes())
        })
        .collect()
}

/// A test workspace: temp dir + config file for the `fluxcap` binary.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub archive: PathBuf,
}

impl Workspace {
    /// Config with the given Kinesis endpoint, an archive location (None: a local
    /// directory inside the workspace), extra TOML, and streams.
    pub fn new(
        kinesis: &str,
        location: Option<&str>,
        s3: Option<&str>,
        extra: &str,
        streams: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        let loc = location
            .map(str::to_string)
            .unwrap_or_else(|| archive.display().to_string());
        let mut t = format!(
            "[aws]\nregion = \"us-east-1\"\nkinesis_endpoint = \"{kinesis}\"\n{}\n[archive]\nlocation = \"{loc}\"\n{extra}\n",
            s3.map(|e| format!("s3_endpoint = \"{e}\""))
                .unwrap_or_default()
        );
        for (name, format) in streams {
            t.push_str(&format!(
                "\n[[streams]]\nname = \"{name}\"\nformat = \"{format}\"\n"
            ));
        }
        let config = dir.path().join("fluxcap.toml");
        std::fs::write(&config, t).unwrap();
        Workspace {
            dir,
            config,
            archive,
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fluxcap"));
        c.arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env_remove("FLUXCAP_CONFIG")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("FLUXCAP_LOG", "fluxcap=info,warn")
            .stdin(Stdio::null());
        c
    }

    /// Start `fluxcap archive` (continuous) in the background, output discarded.
    pub fn spawn_archiver(&self) -> Child {
        self.cmd()
            .arg("archive")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Start `fluxcap archive` in the background, its stderr in a log file
    /// of the workspace (returned, to show when a test fails).
    pub fn spawn_archiver_logged(&self) -> (Child, PathBuf) {
        let log = self.dir.path().join("archiver.log");
        let child = self
            .cmd()
            .arg("archive")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    }

    /// Run `fluxcap <args>` to completion (within [`COMMAND_LIMIT`]).
    pub fn run(&self, args: &[&str]) -> Output {
        output_within(self.cmd().args(args), COMMAND_LIMIT)
    }

    /// Run and require success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "fluxcap {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// A record read back from an archive by an independent reader.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Archived {
    pub shard_id: String,
    pub sequence_number: String,
    pub subsequence_number: i64,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub arrival_ms: i64,
    pub data: Vec<u8>,
    pub dt: String,
    pub hr: String,
}

/// How long one command a test runs may take before the test fails. No
/// command of the suite needs a tenth of it; it turns a hang (a server that
/// stopped answering, a retry loop) into a failure that shows the command's
/// output so far, instead of a suite that never ends.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Run `cmd` to completion like `Command::output`, but kill it (SIGTERM, then
/// SIGKILL 10 s later) and panic with what it printed once it ran for `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let mut termed: Option<Instant> = None;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        match termed {
            None if started.elapsed() > limit => {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                termed = Some(Instant::now());
            }
            Some(t) if t.elapsed() > Duration::from_secs(10) => {
                let _ = child.kill();
            }
            _ => {}
        }
        // A watchdog's poll, not a synchronisation: the command's end is
        // what the loop waits for.
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if termed.is_some() {
        panic!(
            "{cmd:?} still ran after {limit:?} and was stopped ({status}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Read `<dir>` (one stream's table directory) with pyarrow or duckdb.
pub fn read_archive(engine: &str, args: &[&str]) -> Vec<Archived> {
    let out = output_within(
        Command::new(python())
            .arg(root().join("scripts/py/read_archive.py"))
            .arg("--engine")
            .arg(engine)
            .args(args),
        COMMAND_LIMIT,
    );
    assert!(
        out.status.success(),
        "read_archive.py {engine} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Archived {
                shard_id: v["shard_id"].as_str().unwrap().into(),
                sequence_number: v["sequence_number"].as_str().unwrap().into(),
                subsequence_number: v["subsequence_number"].as_i64().unwrap(),
                partition_key: v["partition_key"].as_str().unwrap().into(),
                explicit_hash_key: v["explicit_hash_key"].as_str().map(str::to_string),
                arrival_ms: v["approximate_arrival_timestamp"].as_i64().unwrap(),
                data: base64::engine::general_purpose::STANDARD
                    .decode(v["data_b64"].as_str().unwrap())
                    .unwrap(),
                dt: v["dt"].as_str().unwrap().into(),
                hr: v["hr"].as_str().unwrap().into(),
            }
        })
        .collect()
}

pub fn read_local(engine: &str, dir: &Path) -> Vec<Archived> {
    read_archive(engine, &[dir.to_str().unwrap()])
}

/// Multiset of identities+payloads, for exactly-once comparisons.
pub fn multiset<I: IntoIterator<Item = (String, String, i64, Vec<u8>)>>(
    it: I,
) -> BTreeMap<(String, String, i64, Vec<u8>), usize> {
    let mut m = BTreeMap::new();
    for k in it {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

pub fn puts_multiset(p: &[Put]) -> BTreeMap<(String, String, i64, Vec<u8>), usize> {
    multiset(p.iter().map(|p| {
        (
            p.shard_id.clone(),
            p.sequence_number.clone(),
            p.subsequence_number,
            p.data.clone(),
        )
    }))
}

pub fn archived_multiset(a: &[Archived]) -> BTreeMap<(String, String, i64, Vec<u8>), usize> {
    multiset(a.iter().map(|p| {
        (
            p.shard_id.clone(),
            p.sequence_number.clone(),
            p.subsequence_number,
            p.data.clone(),
        )
    }))
}

/// Compare multisets and explain the first differences.
pub fn assert_same(
    expected: &BTreeMap<(String, String, i64, Vec<u8>), usize>,
    got: &BTreeMap<(String, String, i64, Vec<u8>), usize>,
    what: &str,
) {
    if expected == got {
        return;
    }
    let mut msg = String::new();
    let mut n = 0;
    for (k, v) in expected {
        let g = got.get(k).copied().unwrap_or(0);
        if g != *v && n < 10 {
            n += 1;
            msg.push_str(&format!(
                "  {}:{}:{} expected {v}, got {g}\n",
                k.0, k.1, k.2
            ));
        }
    }
    for (k, v) in got {
        if !expected.contains_key(k) && n < 20 {
            n += 1;
            msg.push_str(&format!("  {}:{}:{} unexpected ×{v}\n", k.0, k.1, k.2));
        }
    }
    let total_e: usize = expected.values().sum();
    let total_g: usize = got.values().sum();
    panic!("{what}: expected {total_e} records, got {total_g}\n{msg}");
}

pub fn write_file(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Create a bucket on the S3 server with an independent client (boto3).
pub fn create_bucket(s3: &Server, bucket: &str) {
    let out = Command::new(python())
        .args([
            "-c",
            &format!(
                "import boto3; boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
                 aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{bucket}')",
                s3.endpoint()
            ),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "create_bucket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stream name as SQL must write it (test names contain `-`).
pub fn q(name: &str) -> String {
    format!("\"{name}\"")
}

impl Workspace {
    /// Run `fluxcap sql --format json <sql>` and parse the JSON lines.
    pub fn sql(&self, sql: &str) -> Vec<serde_json::Value> {
        let out = self.ok(&["sql", "--format", "json", sql]);
        parse_json_lines(&out.stdout)
    }

    /// One integer cell of a one-row result.
    pub fn sql_count(&self, sql: &str) -> i64 {
        let rows = self.sql(sql);
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        let obj = rows[0].as_object().unwrap();
        assert_eq!(obj.len(), 1, "{sql}: {rows:?}");
        obj.values().next().unwrap().as_i64().unwrap()
    }
}

pub fn parse_json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Rows of `sql` run by DuckDB over one stream's archive directory (view `t`).
pub fn duckdb(dir: &Path, sql: &str) -> Vec<serde_json::Value> {
    let out = output_within(
        Command::new(python())
            .arg(root().join("scripts/py/duckdb_query.py"))
            .arg(dir)
            .arg(sql),
        COMMAND_LIMIT,
    );
    assert!(
        out.status.success(),
        "duckdb_query.py failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json_lines(&out.stdout)
}

/// Write `per_hour` JSON order events per shard into each of `hours` (epoch
/// ms of hour starts, ascending) through the library's commit protocol, one
/// flush per shard. Returns the records written.
/// An archive in the local directory `dir` (created), for the ingest API.
pub fn local_archive(dir: &Path) -> fluxcap::archive::store::Archive {
    std::fs::create_dir_all(dir).unwrap();
    fluxcap::archive::store::Archive {
        store: std::sync::Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap(),
        ),
        location: fluxcap::config::ArchiveLocation::Local(dir.to_path_buf()),
        layout: fluxcap::archive::layout::Layout::new(object_store::path::Path::default()),
    }
}

/// The archive under `prefix` in `bucket` of the S3 server at `endpoint`,
/// as the library sees it (for the ingest API).
pub fn s3_archive(endpoint: &str, bucket: &str, prefix: &str) -> fluxcap::archive::store::Archive {
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_copy_if_not_exists(object_store::aws::S3CopyIfNotExists::Multipart)
        .build()
        .unwrap();
    fluxcap::archive::store::Archive {
        store: std::sync::Arc::new(store),
        location: fluxcap::config::ArchiveLocation::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        },
        layout: fluxcap::archive::layout::Layout::new(prefix),
    }
}

pub fn ingest_hours(
    dir: &Path,
    stream: &str,
    shards: usize,
    hours: &[i64],
    per_hour: usize,
) -> Vec<fluxcap::record::Record> {
    use fluxcap::archive::layout::Layout;
    use fluxcap::archive::store::Archive;
    let archive = Archive {
        store: std::sync::Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix({
                std::fs::create_dir_all(dir).unwrap();
                dir
            })
            .unwrap(),
        ),
        location: fluxcap::config::ArchiveLocation::Local(dir.to_path_buf()),
        layout: Layout::new(object_store::path::Path::default()),
    };
    let settings = fluxcap::archive::writer::ParquetSettings::default();
    let mut all = Vec::new();
    rt().block_on(async {
        for s in 0..shards {
            let shard: std::sync::Arc<str> = format!("shardId-{s:012}").into();
            let events = orders(hours.len() * per_hour, s as u64 + 1);
            let recs: Vec<fluxcap::record::Record> = events
                .into_iter()
                .enumerate()
                .map(|(i, (key, data))| {
                    let hour = hours[i / per_hour];
                    let within = (i % per_hour) as i64 * (3_600_000 / per_hour as i64);
                    fluxcap::record::Record {
                        shard_id: shard.clone(),
                        sequence_number: format!("4960{s:02}{:050}", i + 1).into(),
                        subsequence_number: 0,
                        partition_key: key,
                        explicit_hash_key: None,
                        arrival_ms: hour + within,
                        data: data.into(),
                    }
                })
                .collect();
            fluxcap::archive::ingest::write_flush(&archive, &settings, stream, &shard, &recs)
                .await
                .unwrap();
            all.extend(recs);
        }
    });
    all
}

/// Like `start`, with extra environment variables for the script.
fn start_with_env(script: &str, what: &str, env: &[(&str, &str)]) -> Server {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let (_, logpath) = log.keep().unwrap();
    let mut child = Command::new(root().join("scripts").join(script))
        .arg(port.to_string())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&logpath).unwrap())
        .stderr(std::fs::File::create(logpath.with_extension("err")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} (run scripts/setup): {e}"));
    wait_listening(port, &mut child, what);
    Server { child, port }
}

/// A fresh ferrokinesis server (scripts/ferrokinesis). With `enforce_limits` it
/// throttles writes like real Kinesis (1 MiB/s and 1000 records/s per shard,
/// ProvisionedThroughputExceededException beyond); kinesis-mock never does.
pub fn ferrokinesis(enforce_limits: bool) -> Server {
    let enforce = if enforce_limits { "true" } else { "false" };
    start_with_env(
        "ferrokinesis",
        "ferrokinesis",
        &[("FERROKINESIS_ENFORCE_LIMITS", enforce)],
    )
}

/// A record read back from a target stream.
#[derive(Debug, Clone)]
pub struct Got {
    pub partition_key: String,
    pub data: Vec<u8>,
}

/// Every record of `stream`, shard by shard in sequence order (parents first
/// when the shard ids are in creation order, as on the emulators).
pub async fn read_stream(c: &aws_sdk_kinesis::Client, stream: &str) -> Vec<Got> {
    let shards = c
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap()
        .shards()
        .to_vec();
    let mut out = Vec::new();
    for s in shards {
        let mut it = c
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(s.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator()
            .map(str::to_string);
        while let Some(i) = it {
            let r = c
                .get_records()
                .shard_iterator(i)
                .limit(10000)
                .send()
                .await
                .unwrap();
            if r.records().is_empty() {
                break;
            }
            for rec in r.records() {
                out.push(Got {
                    partition_key: rec.partition_key().to_string(),
                    data: rec.data().as_ref().to_vec(),
                });
            }
            it = r.next_shard_iterator().map(str::to_string);
        }
    }
    out
}

// ---- Drill, ZooKeeper and the bootstrap action (tests/it/drill.rs) ----

/// A file `scripts/setup` installs under `.local/`; a missing one fails the
/// test with the command that installs it (never a skip).
pub fn local_tool(rel: &str) -> PathBuf {
    let p = root().join(".local").join(rel);
    assert!(
        p.exists(),
        "missing {}: run scripts/setup (it installs Drill, ZooKeeper and the AWS CLI into .local/)",
        p.display()
    );
    p
}

/// Ask a ZooKeeper four-letter word; the answer.
pub fn zk_word(port: u16, word: &str) -> Option<String> {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(word.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A real ZooKeeper server (Maven Central's 3.9.3, `.local/zookeeper`) on
/// 127.0.0.1, killed on drop.
pub struct ZooKeeper {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl ZooKeeper {
    /// Start it on `port` and wait until it answers `ruok`.
    pub fn start(port: u16) -> ZooKeeper {
        let jars = local_tool("zookeeper/jars");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("zoo.cfg");
        write_file(
            &cfg,
            &format!(
                "tickTime=2000\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=ruok,dump,srvr\n",
                dir.path().join("data").display()
            ),
        );
        let log = std::fs::File::create(dir.path().join("zk.log")).unwrap();
        let child = Command::new("java")
            .arg("-Xmx256m")
            .arg("-cp")
            .arg(format!("{}/*", jars.display()))
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("java (ZooKeeper runs on the JVM)");
        let mut zk = ZooKeeper {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while zk_word(port, "ruok").as_deref() != Some("imok") {
            if let Ok(Some(st)) = zk.child.try_wait() {
                panic!("ZooKeeper exited before answering: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "ZooKeeper did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        zk
    }

    /// `dump`: sessions and their ephemeral nodes (where drillbits register).
    pub fn dump(&self) -> String {
        zk_word(self.port, "dump").unwrap_or_default()
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unprivileged user EMR runs bootstrap actions as, with passwordless
/// sudo. Created here when the tests run as root (as CI does); otherwise it
/// must exist already.
pub fn hadoop_user() -> &'static str {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let ready = READY.get_or_init(|| {
        let works = || {
            Command::new("sudo")
                .args(["-n", "-u", "hadoop", "sudo", "-n", "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if works() {
            return Ok(());
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root {
            return Err("the bootstrap-action tests run the script as user `hadoop` with \
                passwordless sudo, as EMR does: run them as root (as CI does), or create the user: \
                useradd --create-home hadoop && echo 'hadoop ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/hadoop"
                .into());
        }
        let exists = Command::new("id")
            .arg("hadoop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !exists {
            let o = Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/bash", "hadoop"])
                .output()
                .map_err(|e| format!("useradd: {e}"))?;
            if !o.status.success() {
                return Err(format!("useradd hadoop: {}", String::from_utf8_lossy(&o.stderr)));
            }
        }
        let sudoers = Path::new("/etc/sudoers.d/fluxcap-test-hadoop");
        std::fs::write(sudoers, "hadoop ALL=(ALL) NOPASSWD:ALL\n").map_err(|e| e.to_string())?;
        Command::new("chmod")
            .args(["0440", "/etc/sudoers.d/fluxcap-test-hadoop"])
            .status()
            .map_err(|e| e.to_string())?;
        if works() {
            Ok(())
        } else {
            Err("user hadoop cannot run `sudo -n true` (is sudo installed? scripts/setup installs it)".into())
        }
    });
    if let Err(e) = ready {
        panic!("{e}");
    }
    "hadoop"
}

/// A free port whose successor is free too (Drill's data port is its control port + 1).
pub fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        if p < 65535 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// A directory with an `aws` that the user `hadoop` can run: `.local/awscli/bin`,
/// or — when the checkout is not readable by other users (under /root, say)
/// — a copy of the same pinned CLI in a venv under /var/tmp, made once.
pub fn aws_cli_for_hadoop() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let runs = |aws: &Path| {
            Command::new("sudo")
                .args(["-n", "-u", hadoop_user()])
                .arg(aws)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let local = local_tool("awscli/bin");
        if runs(&local.join("aws")) {
            return local;
        }
        let pin = std::fs::read_to_string(root().join(".local/awscli/.fluxcap-stamp"))
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "awscli==1.46.2".into());
        let dir = PathBuf::from(format!("/var/tmp/fluxcap-{}", pin.replace("==", "-")));
        if !runs(&dir.join("bin/aws")) {
            let ok = Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success())
                && Command::new(dir.join("bin/python"))
                    .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", &pin])
                    .status()
                    .is_ok_and(|s| s.success())
                && Command::new("chmod")
                    .args(["-R", "a+rX"])
                    .arg(&dir)
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(
                ok && runs(&dir.join("bin/aws")),
                "user hadoop can run neither {} nor {}: run scripts/setup from a checkout other users can read",
                local.display(),
                dir.display()
            );
        }
        dir.join("bin")
    })
    .clone()
}

/// Run the AWS CLI (`.local/awscli`) against the local S3 server.
pub fn aws_cli(s3: &Server) -> Command {
    let mut c = Command::new(local_tool("awscli/bin/aws"));
    c.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", s3.endpoint())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .stdin(Stdio::null());
    c
}

/// The Drill tarball `scripts/setup` assembled, and its SHA-256.
pub fn drill_tarball() -> (PathBuf, String) {
    let tar = local_tool("drill/apache-drill-1.22.0.tar.gz");
    let sum = std::fs::read_to_string(local_tool("drill/apache-drill-1.22.0.tar.gz.sha256"))
        .unwrap()
        .trim()
        .to_string();
    (tar, sum)
}

/// How often the bootstrap action's busy loop looks for running Drill queries
/// in the tests (`BUSY_INTERVAL`; a minute on EMR).
pub const BUSY_INTERVAL_SECS: u64 = 2;

/// The environment the bootstrap action gets in the tests, beside EMR's
/// defaults: directories under `base`, loopback ports, the local S3 server.
pub struct BootstrapEnv {
    pub base: PathBuf,
    pub log_dir: PathBuf,
    pub info_dir: PathBuf,
    /// EMR's idle auto-termination marker (`ISBUSY_FILE`, `/emr/metricscollector/isbusy` on EMR).
    pub isbusy: PathBuf,
    pub zk_port: u16,
    pub http_port: u16,
    pub user_port: u16,
    pub bit_port: u16,
}

impl BootstrapEnv {
    /// Directories under `dir` (made traversable for `hadoop`), fresh ports,
    /// and EMR's node description naming 127.0.0.1 as the primary node.
    pub fn new(dir: &Path) -> BootstrapEnv {
        Command::new("chmod").arg("755").arg(dir).status().unwrap();
        let info_dir = dir.join("info");
        std::fs::create_dir_all(&info_dir).unwrap();
        write_file(
            &info_dir.join("job-flow.json"),
            "{\"jobFlowId\": \"j-TEST\", \"masterPrivateDnsName\": \"127.0.0.1\"}\n",
        );
        write_file(&info_dir.join("instance.json"), "{\"isMaster\": true}\n");
        let bit_port = free_port_pair();
        BootstrapEnv {
            base: dir.join("mnt/drill"),
            log_dir: dir.join("mnt/var/log/drill"),
            info_dir,
            isbusy: dir.join("mnt/drill/isbusy"),
            zk_port: free_port(),
            http_port: free_port(),
            user_port: free_port(),
            bit_port,
        }
    }

    /// `sudo -u hadoop env … bash <script> <args>`, as EMR runs a bootstrap action.
    pub fn run_as_hadoop(&self, s3: &Server, script: &Path, args: &[String]) -> Output {
        let user = hadoop_user();
        let path = format!(
            "{}:/usr/local/bin:/usr/bin:/bin",
            aws_cli_for_hadoop().display()
        );
        let mut c = Command::new("sudo");
        c.args(["-n", "-u", user, "env"])
            .arg(format!("PATH={path}"))
            .arg("AWS_ACCESS_KEY_ID=test")
            .arg("AWS_SECRET_ACCESS_KEY=test")
            .arg("AWS_DEFAULT_REGION=us-east-1")
            .arg(format!("AWS_ENDPOINT_URL={}", s3.endpoint()))
            .arg("AWS_EC2_METADATA_DISABLED=true")
            .arg(format!("DRILL_BASE={}", self.base.display()))
            .arg(format!("DRILL_LOG_DIR={}", self.log_dir.display()))
            .arg(format!("EMR_INFO_DIR={}", self.info_dir.display()))
            .arg(format!("ZK_PORT={}", self.zk_port))
            .arg("ZK_WAIT_SECS=600")
            .arg("DRILL_BIND_ADDR=127.0.0.1")
            .arg("DRILL_ALLOW_LOOPBACK=true")
            .arg(format!("DRILL_HTTP_PORT={}", self.http_port))
            .arg(format!("DRILL_USER_PORT={}", self.user_port))
            .arg(format!("DRILL_BIT_PORT={}", self.bit_port))
            .arg(format!("ISBUSY_FILE={}", self.isbusy.display()))
            .arg(format!("BUSY_INTERVAL={BUSY_INTERVAL_SECS}"));
        if let Ok(j) = std::env::var("JAVA_HOME") {
            c.arg(format!("JAVA_HOME={j}"));
        }
        c.arg("bash").arg(script).args(args);
        output_within(c.stdin(Stdio::null()), Duration::from_secs(900))
    }

    /// The test-only `core-site.xml`: S3A to the local S3 server (path-style,
    /// plain HTTP, test credentials). On EMR Drill's S3A uses the instance role.
    pub fn write_core_site(&self, s3: &Server) {
        write_file(
            &self.base.join("drill/conf/core-site.xml"),
            &format!(
                "<?xml version=\"1.0\"?>\n<configuration>\n\
                 <property><name>fs.s3a.endpoint</name><value>{}</value></property>\n\
                 <property><name>fs.s3a.path.style.access</name><value>true</value></property>\n\
                 <property><name>fs.s3a.connection.ssl.enabled</name><value>false</value></property>\n\
                 <property><name>fs.s3a.endpoint.region</name><value>us-east-1</value></property>\n\
                 <property><name>fs.s3a.access.key</name><value>test</value></property>\n\
                 <property><name>fs.s3a.secret.key</name><value>test</value></property>\n\
                 <property><name>fs.s3a.aws.credentials.provider</name>\
                 <value>org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider</value></property>\n\
                 </configuration>\n",
                s3.endpoint()
            ),
        );
    }

    /// Drill's REST address.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The end of Drill's logs, to explain a failure.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for f in ["supervise.log", "drillbit.out", "drillbit.log"] {
            let text = std::fs::read_to_string(self.log_dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {f}\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Users and command lines of the Drillbit processes of this installation.
    pub fn drillbits(&self) -> Vec<(String, String)> {
        let o = Command::new("ps")
            .args(["-eo", "user:20,args", "--no-headers", "-ww"])
            .output()
            .unwrap();
        let base = self.base.display().to_string();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("org.apache.drill.exec.server.Drillbit") && l.contains(&base))
            .map(|l| {
                let (u, a) = l.trim().split_once(' ').unwrap_or((l, ""));
                (u.to_string(), a.trim().to_string())
            })
            .collect()
    }

    /// Stop the supervisor (and with it Drill): its process group.
    pub fn stop(&self) {
        let pid = std::fs::read_to_string(self.base.join("run/supervise.pid")).unwrap_or_default();
        let pid = pid.trim();
        if pid.is_empty() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pid}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.drillbits().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
    }
}

/// POST `body` as JSON to `url` with curl (an independent client), without
/// waiting for the answer (curl's stdout, piped).
pub fn spawn_post_json(url: &str, body: &serde_json::Value) -> std::process::Child {
    let mut child = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ])
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.to_string().as_bytes())
        .unwrap();
    child
}

/// POST a query to Drill's REST API with curl (an independent client),
/// without waiting for the answer (curl's stdout, piped).
pub fn spawn_drill_query(url: &str, sql: &str) -> std::process::Child {
    let body = serde_json::json!({
        "queryType": "SQL", "query": sql,
        "options": {"drill.exec.http.rest.errors.verbose": "true"}
    });
    spawn_post_json(&format!("{url}/query.json"), &body)
}

/// POST a query to Drill's REST API with curl (an independent client); the answer.
pub fn drill_query(url: &str, sql: &str) -> serde_json::Value {
    let out = spawn_drill_query(url, sql).wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "Drill's answer to {sql}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The rows of a query that must complete.
pub fn drill_rows(url: &str, sql: &str) -> Vec<serde_json::Value> {
    let v = drill_query(url, sql);
    assert_eq!(v["queryState"], "COMPLETED", "{sql}: {v}");
    v["rows"].as_array().cloned().unwrap_or_default()
}

/// HTTP status of a GET (0 when nothing answers).
pub fn http_status(url: &str) -> u16 {
    let o = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Every record of `stream` (from its trim horizon, read with boto3), written
/// by pyarrow as one Parquet file of the live table's shape
/// (`scripts/py/positions.py live`) to `dest` (`--out PATH`, or
/// `--s3-endpoint URL --bucket B --key K`); the number of records.
pub fn live_stand_in(kinesis: &str, stream: &str, dest: &[&str]) -> usize {
    let o = output_within(
        Command::new(python())
            .arg(root().join("scripts/py/positions.py"))
            .args(["live", "--kinesis-endpoint", kinesis, "--stream", stream])
            .args(dest),
        COMMAND_LIMIT,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// Poll until `f` holds (or fail after `secs`).
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The physical plan `EXPLAIN <sql>` prints (fails when there is none).
pub fn physical_plan(ws: &Workspace, sql: &str) -> String {
    let rows = ws.sql(&format!("EXPLAIN {sql}"));
    let plan: String = rows
        .iter()
        .filter(|r| r["plan_type"] == "physical_plan")
        .map(|r| r["plan"].as_str().unwrap().to_string())
        .collect();
    assert!(!plan.is_empty(), "no physical plan in {rows:?}");
    plan
}
