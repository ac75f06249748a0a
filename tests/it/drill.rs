//! A real Apache Drill 1.22.0 (assembled from Maven Central by
//! `scripts/setup`), a real ZooKeeper and S3A against the local S3 server:
//!
//! - the bootstrap action that `cluster upload-resources` generates runs as
//!   the unprivileged user `hadoop` (passwordless sudo, as on EMR), fetches
//!   the Drill tarball from S3 with `aws s3 cp`, refuses a wrong checksum,
//!   and returns before ZooKeeper exists; once ZooKeeper starts, Drill runs as
//!   `hadoop` under the bootstrap action's supervisor (the loop that stands in
//!   for its systemd unit here: no systemd on this machine), registers in
//!   ZooKeeper, has the generated plugins and answers `/status` and
//!   `/query.json`;
//! - Drill reads the archive the real archiver wrote, through S3A, and
//!   agrees with `fluxcap sql`; the staged files of an uncommitted flush do
//!   not change its answers; while Drill runs a query the bootstrap action
//!   touches EMR's idle auto-termination marker (`isbusy`), and not while it
//!   is idle;
//! - `replay --engine drill` sends, record for record and in order, what the
//!   local engine's replay with the same options sends; Drill's failures
//!   are errors with Drill's message; `--dry-run` writes nothing; the scratch
//!   table is removed when done and kept (and listed) on failure.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Everything one test's Drill needs; stops Drill (and ZooKeeper) on drop.
pub(crate) struct Stack {
    pub(crate) env: BootstrapEnv,
    zk: Option<ZooKeeper>,
    cluster_id: String,
    pub(crate) ws: Workspace,
    pub(crate) archive_bucket: String,
    /// The bootstrap action's arguments, as `launch` gives them.
    args: Vec<String>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.env.stop();
        self.zk.take();
    }
}

fn cluster_toml(res_bucket: &str, sha: &str, cluster_id: &str) -> String {
    format!(
        "[cluster]\nresources = \"s3://{res_bucket}/fluxcap\"\ndrill_sha256 = \"{sha}\"\n\
         name = \"{cluster_id}\"\ndrill_heap = \"1G\"\ndrill_direct_memory = \"1G\"\n\
         drill_code_cache = \"256M\"\n"
    )
}

/// The arguments `launch` gives the bootstrap action, as `upload-resources` prints them.
fn bootstrap_args(stderr: &str) -> Vec<String> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("bootstrap action: "))
        .unwrap_or_else(|| panic!("upload-resources did not print the bootstrap action: {stderr}"));
    line.split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// Upload the resources and the tarball to S3, run the bootstrap action as
/// `hadoop` (checking what must hold before ZooKeeper exists), then start
/// ZooKeeper and wait for Drill.
pub(crate) fn start_stack(s3: &Server, kinesis: &str, stream: &str) -> Stack {
    let (tar, sha) = drill_tarball();
    let res_bucket = unique("res");
    let archive_bucket = unique("arch");
    create_bucket(s3, &res_bucket);
    create_bucket(s3, &archive_bucket);
    let cluster_id = unique("fluxcap");
    let ws = Workspace::new(
        kinesis,
        Some(&format!("s3://{archive_bucket}/kinesis")),
        Some(&s3.endpoint()),
        &cluster_toml(&res_bucket, &sha, &cluster_id),
        &[(stream, "json")],
    );
    let o = ws.ok(&["cluster", "upload-resources"]);
    let args = bootstrap_args(&String::from_utf8_lossy(&o.stderr));
    let o = aws_cli(s3)
        .args(["s3", "cp", "--only-show-errors"])
        .arg(&tar)
        .arg(format!(
            "s3://{res_bucket}/fluxcap/apache-drill-1.22.0.tar.gz"
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let env = BootstrapEnv::new(ws.dir.path());
    // EMR copies the script from S3 and runs it as hadoop.
    let script = ws.dir.path().join("bootstrap-drill.sh");
    let o = aws_cli(s3)
        .args(["s3", "cp", "--only-show-errors"])
        .arg(format!("s3://{res_bucket}/fluxcap/bootstrap-drill.sh"))
        .arg(&script)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let started = Instant::now();
    let o = env.run_as_hadoop(s3, &script, &args);
    let mut stack = Stack {
        env,
        zk: None,
        cluster_id,
        ws,
        archive_bucket,
        args,
    };
    assert!(
        o.status.success(),
        "bootstrap action failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        stack.env.logs()
    );
    eprintln!(
        "bootstrap action returned in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("supervised by"), "{out}");
    // Bootstrap actions run before EMR installs ZooKeeper: nothing runs yet.
    assert!(
        stack.env.drillbits().is_empty(),
        "Drill started before ZooKeeper"
    );
    assert_eq!(http_status(&format!("{}/status", stack.env.url())), 0);
    stack.env.write_core_site(s3);
    let t0 = Instant::now();
    stack.zk = Some(ZooKeeper::start(stack.env.zk_port));
    let deadline = Instant::now() + Duration::from_secs(240);
    while http_status(&format!("{}/status", stack.env.url())) != 200 {
        assert!(
            Instant::now() < deadline,
            "Drill did not answer within 240 s of ZooKeeper's start:\n{}",
            stack.env.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "Drill answered {:.1} s after ZooKeeper started",
        t0.elapsed().as_secs_f64()
    );
    stack
}

/// A child process killed (and reaped) when the test ends, passing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Drill's running queries, from `/profiles.json` (what the busy loop reads).
fn running_queries(url: &str) -> Vec<serde_json::Value> {
    let o = Command::new("curl")
        .args(["-s", "--max-time", "10", &format!("{url}/profiles.json")])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "Drill's /profiles.json: {e}: {}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    v["runningQueries"].as_array().cloned().unwrap_or_default()
}

#[test]
fn drill_bootstrap_action_runs_as_hadoop_and_reads_the_archive_like_fluxcap_sql() {
    let s3 = s3();
    let k = ferrokinesis(false);
    let stream = unique("drl");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(200, 7)).await;
    });
    // Two arrival times at least: the emulator stamps whole seconds.
    let first = std::time::SystemTime::now();
    while first.elapsed().unwrap_or_default() < Duration::from_millis(1100) {
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.block_on(put_records(&c, &stream, &orders(200, 8)));
    let stack = start_stack(&s3, &k.endpoint(), &stream);
    let env = &stack.env;
    let url = env.url();

    // Drill runs as hadoop, from the instance-store directories, under the supervisor.
    let bits = env.drillbits();
    assert_eq!(bits.len(), 1, "{bits:?}");
    assert_eq!(bits[0].0, "hadoop", "{bits:?}");
    assert!(bits[0].1.contains("-Xmx1G") && bits[0].1.contains("-XX:MaxDirectMemorySize=1G"));
    assert!(env.log_dir.join("drillbit.log").exists());
    let conf = std::fs::read_to_string(env.base.join("drill/conf/drill-override.conf")).unwrap();
    // Every directory Drill writes is under the install root (the instance
    // store on EMR), none at Drill's /tmp defaults.
    let base = env.base.display().to_string();
    for path in conf.split('"').filter(|p| p.starts_with('/')) {
        assert!(path.starts_with(&base), "{path} is outside {base}: {conf}");
    }
    for key in [
        "drill.tmp-dir",
        "tmp.directories",
        "spill.directories",
        "udf.directory.root",
        "compile.code_dir",
    ] {
        assert!(conf.contains(key), "{key} not set: {conf}");
    }
    assert!(conf.contains(&format!(
        "spill.directories: [\"{}/spill\"]",
        env.base.display()
    )));
    let unit = std::fs::read_to_string(env.base.join("drillbit.service")).unwrap();
    for want in [
        "User=hadoop",
        "Restart=on-failure",
        "ExecStartPre=",
        "wait-for-zookeeper 127.0.0.1",
        "bin/drillbit.sh run",
    ] {
        assert!(unit.contains(want), "{want} not in the unit:\n{unit}");
    }
    // Registered in ZooKeeper (an ephemeral node of its cluster id) …
    let zk = stack.zk.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !zk.dump().contains(&format!("/drill/{}/", stack.cluster_id)) {
        assert!(
            Instant::now() < deadline,
            "no drillbit in ZooKeeper: {}",
            zk.dump()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // … and Drill knows itself from there.
    let cluster: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &Command::new("curl")
            .args(["-s", &format!("{url}/cluster.json")])
            .output()
            .unwrap()
            .stdout,
    ))
    .unwrap();
    assert_eq!(cluster["drillbits"][0]["state"], "ONLINE", "{cluster}");
    // The generated plugin is loaded.
    let plugin: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &Command::new("curl")
            .args(["-s", &format!("{url}/storage/archive.json")])
            .output()
            .unwrap()
            .stdout,
    ))
    .unwrap();
    assert_eq!(
        plugin["config"]["connection"],
        format!("s3a://{}", stack.archive_bucket)
    );
    assert_eq!(plugin["config"]["workspaces"]["scratch"]["writable"], true);

    // The real archiver writes the archive into S3; Drill reads it through S3A.
    let ws = &stack.ws;
    ws.ok(&["archive", "--once"]);
    let t = q(&stream);
    let d = format!("archive.archive.`{stream}`");
    let total = ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{t}"));
    assert_eq!(total, 400);

    let answers = |ws: &Workspace| -> BTreeMap<&'static str, Vec<String>> {
        let mut out = BTreeMap::new();
        let mut fx: Vec<String> = ws
            .sql(&format!(
                "SELECT dt, hr, count(*) AS n FROM archive.{t} GROUP BY dt, hr"
            ))
            .iter()
            .map(|r| {
                format!(
                    "dt={}|hr={}|{}",
                    r["dt"].as_str().unwrap(),
                    r["hr"].as_str().unwrap(),
                    r["n"]
                )
            })
            .collect();
        fx.sort();
        out.insert("partitions", fx);
        let mut fx: Vec<String> = ws
            .sql(&format!(
                "SELECT data->>'type' AS type, count(*) AS n FROM archive.{t} GROUP BY 1"
            ))
            .iter()
            .map(|r| format!("{}|{}", r["type"].as_str().unwrap(), r["n"]))
            .collect();
        fx.sort();
        out.insert("json group-by", fx);
        let mut fx: Vec<String> = ws
            .sql(&format!(
                "SELECT shard_id, sequence_number FROM archive.{t} WHERE partition_key = 'customer-5'"
            ))
            .iter()
            .map(|r| format!("{}|{}", r["shard_id"].as_str().unwrap(), r["sequence_number"].as_str().unwrap()))
            .collect();
        fx.sort();
        out.insert("point lookup", fx);
        out
    };
    let drill_answers = || -> BTreeMap<&'static str, Vec<String>> {
        let mut out = BTreeMap::new();
        let mut dr: Vec<String> = drill_rows(
            &url,
            &format!("SELECT dir0, dir1, COUNT(*) AS n FROM {d} GROUP BY dir0, dir1"),
        )
        .iter()
        .map(|r| {
            format!(
                "{}|{}|{}",
                r["dir0"].as_str().unwrap(),
                r["dir1"].as_str().unwrap(),
                r["n"]
            )
        })
        .collect();
        dr.sort();
        out.insert("partitions", dr);
        let mut dr: Vec<String> = drill_rows(
            &url,
            &format!(
                "SELECT t.j.type AS type, COUNT(*) AS n FROM \
                 (SELECT convert_from(data, 'JSON') AS j FROM {d}) t GROUP BY t.j.type"
            ),
        )
        .iter()
        .map(|r| format!("{}|{}", r["type"].as_str().unwrap(), r["n"]))
        .collect();
        dr.sort();
        out.insert("json group-by", dr);
        let mut dr: Vec<String> = drill_rows(
            &url,
            &format!(
                "SELECT shard_id, sequence_number FROM {d} WHERE partition_key = 'customer-5'"
            ),
        )
        .iter()
        .map(|r| {
            format!(
                "{}|{}",
                r["shard_id"].as_str().unwrap(),
                r["sequence_number"].as_str().unwrap()
            )
        })
        .collect();
        dr.sort();
        out.insert("point lookup", dr);
        out
    };
    let ours = answers(ws);
    assert!(ours.values().all(|v| !v.is_empty()), "{ours:?}");
    let theirs = drill_answers();
    assert_eq!(ours, theirs, "fluxcap sql and Drill differ");

    // The arrival-time filters: docs/cluster.md's last hour, and a split at the median arrival.
    let last_hour = drill_rows(
        &url,
        &format!(
            "SELECT COUNT(*) AS n FROM {d} WHERE approximate_arrival_timestamp > NOW() - INTERVAL '1' HOUR"
        ),
    );
    assert_eq!(
        last_hour[0]["n"],
        ws.sql_count(&format!(
            "SELECT count(*) AS n FROM archive.{t} WHERE approximate_arrival_timestamp > now() - INTERVAL '1 hour'"
        ))
    );
    let times: Vec<i64> = ws
        .sql(&format!(
            "SELECT CAST(approximate_arrival_timestamp AS BIGINT) AS ms FROM archive.{t} ORDER BY 1"
        ))
        .iter()
        .map(|r| r["ms"].as_i64().unwrap())
        .collect();
    let mut distinct = times.clone();
    distinct.dedup();
    assert!(distinct.len() > 1, "one arrival time only: {distinct:?}");
    let mid = distinct[distinct.len() / 2];
    let mid_ts = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(mid)
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S%.3f")
        .to_string();
    let ours_after = ws.sql_count(&format!(
        "SELECT count(*) AS n FROM archive.{t} WHERE approximate_arrival_timestamp >= TIMESTAMP '{mid_ts}'"
    ));
    let drill_after = drill_rows(
        &url,
        &format!(
            "SELECT COUNT(*) AS n FROM {d} WHERE approximate_arrival_timestamp >= TIMESTAMP '{mid_ts}'"
        ),
    );
    assert_eq!(drill_after[0]["n"], ours_after);
    assert!(
        ours_after > 0 && ours_after < total,
        "{ours_after} of {total}"
    );

    // An uncommitted flush: its files staged under <stream>/_fluxcap/staging/
    // (a copy of every published file) change neither engine's answers.
    let listed = aws_cli(&s3)
        .args(["s3", "ls", "--recursive"])
        .arg(format!("s3://{}/kinesis/{stream}/", stack.archive_bucket))
        .output()
        .unwrap();
    let keys: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .filter(|k| k.ends_with(".parquet") && !k.contains("/_fluxcap/"))
        .collect();
    assert!(!keys.is_empty());
    for key in &keys {
        let rel = key.trim_start_matches(&format!("kinesis/{stream}/"));
        let o = aws_cli(&s3)
            .args(["s3", "cp", "--only-show-errors"])
            .arg(format!("s3://{}/{key}", stack.archive_bucket))
            .arg(format!(
                "s3://{}/kinesis/{stream}/_fluxcap/staging/0000000099/{rel}",
                stack.archive_bucket
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(drill_answers(), theirs, "Drill read the staged files");
    assert_eq!(answers(ws), ours, "fluxcap sql read the staged files");

    // EMR's idle auto-termination does not see Drill: while Drill runs a query
    // the bootstrap action's busy loop touches EMR's isbusy marker (ISBUSY_FILE,
    // every BUSY_INTERVAL s), and leaves it alone when Drill is idle. The query:
    // a five-way self-join on shard_id (2 shards of 200 records, 6.4e11 rows),
    // which runs until it is cancelled.
    let interval = Duration::from_secs(BUSY_INTERVAL_SECS);
    let marker = env.isbusy.clone();
    let touched = || std::fs::metadata(&marker).and_then(|m| m.modified()).ok();
    let long_sql = format!(
        "SELECT COUNT(*) AS n FROM {d} a JOIN {d} b ON a.shard_id = b.shard_id \
         JOIN {d} c ON b.shard_id = c.shard_id JOIN {d} e ON c.shard_id = e.shard_id \
         JOIN {d} f ON e.shard_id = f.shard_id"
    );
    let mut long_query = KillOnDrop(spawn_drill_query(&url, &long_sql));
    let deadline = Instant::now() + Duration::from_secs(60);
    let query_id = loop {
        if let Some(r) = running_queries(&url)
            .into_iter()
            .find(|r| r["query"].as_str().unwrap_or_default().contains("JOIN"))
        {
            break r["queryId"].as_str().unwrap().to_string();
        }
        if let Some(status) = long_query.0.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(long_query.0.stdout.as_mut().unwrap(), &mut out).unwrap();
            panic!("the long query ended ({status}) before it was seen running: {out}");
        }
        assert!(Instant::now() < deadline, "the long query never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    let running_since = std::time::SystemTime::now();
    // Touched while it runs, and touched again (not once only).
    let mut seen = running_since;
    for what in ["touched", "touched again"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(t) = touched().filter(|t| *t > seen) {
                seen = t;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} not {what} within 30 s while Drill ran a query",
                marker.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            running_queries(&url)
                .iter()
                .any(|r| r["queryId"] == query_id.as_str()),
            "the long query ended before the marker was {what}"
        );
    }
    eprintln!(
        "isbusy touched twice while the query ran, the second time {:.1} s after it was seen running",
        seen.duration_since(running_since)
            .unwrap_or_default()
            .as_secs_f64()
    );
    // Cancelled, Drill is idle: the marker is not touched any more (a check
    // under way when the query ended may still touch it within an interval).
    let o = Command::new("curl")
        .args(["-s", &format!("{url}/profiles/cancel/{query_id}")])
        .output()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running_queries(&url).is_empty() || long_query.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the long query was not cancelled: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle_since = std::time::SystemTime::now();
    let idle_until = Instant::now() + interval * 5;
    while Instant::now() < idle_until {
        if let Some(t) = touched() {
            assert!(
                t <= idle_since + interval,
                "{} touched {:?} after Drill went idle",
                marker.display(),
                t.duration_since(idle_since).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The supervisor restarts Drill when it fails (Restart=on-failure).
    let pid = std::fs::read_to_string(env.base.join("run/drillbit.pid")).unwrap();
    Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(&format!("{url}/status")) == 200 {
        assert!(Instant::now() < deadline, "Drill did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    while http_status(&format!("{url}/status")) != 200 {
        assert!(
            Instant::now() < deadline,
            "Drill was not restarted:\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let restarted = std::fs::read_to_string(env.base.join("run/drillbit.pid")).unwrap();
    assert_ne!(restarted.trim(), pid.trim());
    assert_eq!(env.drillbits()[0].0, "hadoop");
    assert_eq!(drill_answers(), theirs);

    // A wrong checksum installs nothing; without the primary's name (no
    // job-flow.json, no ZK_HOST) it refuses instead of guessing.
    let bad_dir = ws.dir.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = BootstrapEnv::new(&bad_dir);
    let mut args = stack.args.clone();
    let i = args.iter().position(|a| a == "--sha256").unwrap();
    args[i + 1] = "0".repeat(64);
    let script = ws.dir.path().join("bootstrap-drill.sh");
    let o = bad.run_as_hadoop(&s3, &script, &args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!bad.base.join("drill").exists());
    assert!(!bad.base.join("apache-drill-1.22.0").exists());
    std::fs::remove_file(bad.info_dir.join("job-flow.json")).unwrap();
    let o = bad.run_as_hadoop(&s3, &script, &args);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot tell the primary node"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// What arrived in a one-shard target stream, in order.
fn arrived(c: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, Vec<u8>)> {
    rt().block_on(read_stream(c, stream))
        .into_iter()
        .map(|g| (g.partition_key, g.data))
        .collect()
}

fn scratch_keys(s3: &Server, bucket: &str) -> Vec<String> {
    let o = aws_cli(s3)
        .args(["s3", "ls", "--recursive"])
        .arg(format!("s3://{bucket}/kinesis/_fluxcap/drill-scratch/"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

#[test]
fn replay_on_drill_sends_what_the_local_engine_sends() {
    let s3 = s3();
    let k = ferrokinesis(false);
    let stream = unique("drs");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(300, 3)).await;
        put_records(&c, &stream, &orders(200, 4)).await;
    });
    let stack = start_stack(&s3, &k.endpoint(), &stream);
    let url = stack.env.url();
    let ws = &stack.ws;
    ws.ok(&["archive", "--once"]);
    // A fresh archive prefix: no scratch workspace until a CTAS needs it.
    let o = aws_cli(&s3)
        .args(["s3", "rm", "--only-show-errors", "--recursive"])
        .arg(format!(
            "s3://{}/kinesis/_fluxcap/drill-scratch/",
            stack.archive_bucket
        ))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(scratch_keys(&s3, &stack.archive_bucket).is_empty());

    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("plain", vec!["--where", "partition_key <> 'customer-3'"]),
        (
            "compacted",
            vec![
                "--compact",
                "--key",
                "CASE WHEN partition_key IN ('customer-1', 'customer-2') THEN NULL ELSE substr(partition_key, 1, 10) END",
                "--tombstone",
                "CAST(data AS VARCHAR) LIKE '%\"type\":\"cancelled\"%'",
            ],
        ),
        ("compacted by partition key", vec!["--compact"]),
        (
            "compacted, tombstones emitted",
            vec![
                "--compact",
                "--tombstone",
                "CAST(data AS VARCHAR) LIKE '%\"type\":\"cancelled\"%'",
                "--tombstones",
                "emit",
            ],
        ),
    ];
    for (name, opts) in &cases {
        let mut arrivals = Vec::new();
        let mut ordered = Vec::new();
        for engine in ["local", "drill"] {
            let replay = |to: &str, extra: &[&str]| {
                let mut args = vec!["replay", "--stream", &stream, "--to", to];
                args.extend(extra.iter().copied());
                args.extend(opts.iter().copied());
                if engine == "drill" {
                    args.extend(["--engine", "drill", "--drill-url", &url]);
                }
                let t0 = Instant::now();
                ws.ok(&args);
                eprintln!(
                    "{name}: {engine} replay to {to} took {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
            };
            // Into Kinesis, as the records are …
            let target = unique("tgt");
            rt.block_on(create_stream(&c, &target, 1));
            replay(&format!("kinesis://{target}"), &["--no-annotate"]);
            arrivals.push(arrived(&c, &target));
            // … and into a file, in the exact order they are sent.
            let out = ws.dir.path().join(format!("{engine}.jsonl"));
            replay(&format!("file://{}", out.display()), &[]);
            ordered.push(
                std::fs::read_to_string(&out)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                        v.as_object_mut().unwrap().remove("replay_id");
                        v
                    })
                    .collect::<Vec<_>>(),
            );
        }
        assert!(!ordered[0].is_empty(), "{name}: nothing replayed");
        // Record for record, in the same order (ties, NULL keys, tombstones).
        assert_eq!(ordered[0].len(), ordered[1].len(), "{name}: counts differ");
        if let Some(i) = (0..ordered[0].len()).find(|&i| ordered[0][i] != ordered[1][i]) {
            panic!(
                "{name}: Drill's replay differs from the local one at record {i} of {}:\n local: {}\n drill: {}",
                ordered[0].len(),
                ordered[0][i],
                ordered[1][i]
            );
        }
        // What arrived in Kinesis: the same records, each key in the same order
        // (the writer keeps the order of a key, not across keys).
        let per_key = |got: &[(String, Vec<u8>)]| {
            let mut m: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
            for (k, d) in got {
                m.entry(k.clone()).or_default().push(d.clone());
            }
            m
        };
        assert_eq!(arrivals[0].len(), ordered[0].len(), "{name}");
        assert!(
            per_key(&arrivals[0]) == per_key(&arrivals[1]),
            "{name}: the records that arrived in Kinesis differ"
        );
        // Done: the scratch table is gone, the workspace's marker stays.
        let left = scratch_keys(&s3, &stack.archive_bucket);
        assert_eq!(left.len(), 1, "{name}: {left:?}");
        assert!(left[0].ends_with("/.fluxcap-scratch"), "{left:?}");
    }
    // The compaction had NULL keys and tombstones to honour.
    let all = ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{}", q(&stream)));
    assert_eq!(all, 500);

    // A dry run counts on Drill and writes nothing.
    let o = ws.ok(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--compact",
        "--engine",
        "drill",
        "--drill-url",
        &url,
        "--dry-run",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    let keys = ws.sql_count(&format!(
        "SELECT count(DISTINCT partition_key) AS n FROM archive.{}",
        q(&stream)
    ));
    assert_eq!(v["records"], keys);
    assert_eq!(scratch_keys(&s3, &stack.archive_bucket).len(), 1);

    // Drill's failures name Drill's own message.
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--engine",
        "drill",
        "--drill-url",
        &url,
        "--where",
        "no_such_function(partition_key) = 1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("Drill at {url}")) && err.to_lowercase().contains("no_such_function"),
        "{err}"
    );
    assert!(err.contains("FAILED"), "{err}");
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--engine",
        "drill",
        "--drill-url",
        &url,
        "--drill-plugin",
        "no_such_plugin",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no_such_plugin"), "{err}");
    assert_eq!(scratch_keys(&s3, &stack.archive_bucket).len(), 1);

    // A replay that fails after Drill wrote the selection keeps it, and says where.
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "kinesis://no-such-target",
        "--engine",
        "drill",
        "--drill-url",
        &url,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let kept = scratch_keys(&s3, &stack.archive_bucket);
    assert!(kept.len() > 1, "{kept:?}");
    assert!(err.contains("is kept"), "{err}");
    let table_file = kept.iter().find(|k| k.ends_with(".parquet")).unwrap();
    assert!(err.contains(table_file.as_str()), "{err}");

    // Drill down: an error naming Drill's address.
    stack.env.stop();
    let o = ws.run(&[
        "replay",
        "--stream",
        &stream,
        "--to",
        "-",
        "--engine",
        "drill",
        "--drill-url",
        &url,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("Drill at {url}")), "{err}");
}
