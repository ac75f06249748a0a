//! Several archivers on one stream (`fluxcap archive --shared`): shards
//! balanced across them, taken over when one dies or stops, lineage across
//! archivers, every record exactly once, per-key order intact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::resharding::{archived_count, assert_per_key_order, terminate};

/// Latest claim of each shard of the local archive `archive`: shard key →
/// holder (an archiver id, `free` or `done`), read as any tool could.
fn claims(rt: &tokio::runtime::Runtime, archive: &Path, stream: &str) -> BTreeMap<String, String> {
    claims_in(rt, &local_archive(archive), stream)
}

/// Archiver id of the shared archiver with process id `pid` (from its heartbeat).
fn archiver_id(archive: &Path, stream: &str, pid: u32) -> Option<String> {
    let dir = archive.join(stream).join("_fluxcap/workers");
    for w in std::fs::read_dir(&dir).ok()?.flatten() {
        for f in std::fs::read_dir(w.path()).ok()?.flatten() {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(f.path()).ok()?).ok()?;
            if v["pid"].as_u64() == Some(u64::from(pid)) {
                return Some(w.file_name().to_string_lossy().to_string());
            }
        }
    }
    None
}

/// Open shards of the stream (no ending sequence number).
fn open_shards(
    rt: &tokio::runtime::Runtime,
    c: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Vec<String> {
    rt.block_on(async {
        let r = c.list_shards().stream_name(stream).send().await.unwrap();
        r.shards()
            .iter()
            .filter(|s| {
                s.sequence_number_range()
                    .unwrap()
                    .ending_sequence_number()
                    .is_none()
            })
            .map(|s| s.shard_id().to_string())
            .collect()
    })
}

/// Wait until every open shard is held by one of `holders`; returns how
/// long that took. Fails after `limit`, naming who holds what.
fn wait_held_by(
    ws: &Workspace,
    rt: &tokio::runtime::Runtime,
    c: &aws_sdk_kinesis::Client,
    stream: &str,
    holders: &BTreeSet<String>,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let open = open_shards(rt, c, stream);
    loop {
        let cl = claims(rt, &ws.archive, stream);
        if open
            .iter()
            .all(|s| cl.get(s).is_some_and(|h| holders.contains(h)))
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "open shards {open:?} not all held by {holders:?} after {limit:?}: {cl:?}"
        );
        // Polling the store for a condition, with a deadline.
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids(archive: &Path, stream: &str, children: &[&Child]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    children
        .iter()
        .map(|ch| {
            loop {
                if let Some(id) = archiver_id(archive, stream, ch.id()) {
                    break id;
                }
                assert!(Instant::now() < deadline, "no heartbeat of pid {}", ch.id());
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .collect()
}

#[test]
fn three_shared_archivers_split_a_resharded_stream_and_survive_kill_9_and_sigterm() {
    let k = kinesis();
    let stream = unique("shared");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 16));
    let ttl = Duration::from_secs(4);
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archive.flush]\nmax_age = \"500ms\"\n[archiver]\nshared = true\nlease_ttl = \"4s\"\nshard_discovery_interval = \"1s\"\npoll_interval = \"200ms\"\nmetrics_bind = \"\"",
        &[(&stream, "json")],
    );
    let mut a = ws.spawn_archiver();
    let mut b = ws.spawn_archiver();
    let mut cc = ws.spawn_archiver();
    let id = ids(&ws.archive, &stream, &[&a, &b, &cc]);
    let all: BTreeSet<String> = id.iter().cloned().collect();

    // The 16 shards end up spread over the three archivers.
    wait_held_by(&ws, &rt, &c, &stream, &all, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cl = claims(&rt, &ws.archive, &stream);
        let per: Vec<usize> = id
            .iter()
            .map(|w| cl.values().filter(|h| *h == w).count())
            .collect();
        if per.iter().sum::<usize>() == 16
            && per.iter().max() <= Some(&(per.iter().min().unwrap_or(&0) + 1))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not balanced: {per:?} {cl:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // `fluxcap status` says who holds each shard.
    let st: serde_json::Value =
        serde_json::from_slice(&ws.ok(&["status", "--format", "json"]).stdout).unwrap();
    for sh in st["streams"][0]["shards"].as_array().unwrap() {
        let held = sh["held_by"].as_str().unwrap_or_default();
        assert!(
            id.iter()
                .any(|w| held.starts_with(&format!("archiver {w} (host "))),
            "{sh}"
        );
    }

    let mut puts = Vec::new();
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(400, 1))));
    rt.block_on(split_first_shard(&c, &stream));
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(400, 2))));
    rt.block_on(merge_split_children(&c, &stream));
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(400, 3))));
    // The children of the split and of the merge are taken too.
    wait_held_by(&ws, &rt, &c, &stream, &all, Duration::from_secs(60));

    // SIGKILL one: the others hold every open shard within 2 × the ttl.
    let rc = unsafe { libc::kill(a.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0);
    a.wait().unwrap();
    let rest: BTreeSet<String> = id[1..].iter().cloned().collect();
    let took = wait_held_by(&ws, &rt, &c, &stream, &rest, 2 * ttl);
    eprintln!("after SIGKILL, every open shard was held by the others in {took:?}");
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(400, 4))));

    // SIGTERM another: it commits, frees its shards, and the last one takes them.
    let st = terminate(&mut b);
    assert!(st.success(), "SIGTERM exit status: {st}");
    let last: BTreeSet<String> = id[2..].iter().cloned().collect();
    let took = wait_held_by(&ws, &rt, &c, &stream, &last, 2 * ttl);
    eprintln!("after SIGTERM, every open shard was held by the last one in {took:?}");
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(400, 5))));

    let deadline = Instant::now() + Duration::from_secs(180);
    while archived_count(&ws, &rt, &stream) < puts.len() as u64 {
        assert!(Instant::now() < deadline, "the archivers did not catch up");
        assert!(cc.try_wait().unwrap().is_none(), "archiver exited early");
        std::thread::sleep(Duration::from_millis(300));
    }
    let st = terminate(&mut cc);
    assert!(st.success(), "SIGTERM exit status: {st}");
    // Every archiver gone: no heartbeat left but the killed one's (removed
    // by whoever took its shards), every claim free or done.
    let cl = claims(&rt, &ws.archive, &stream);
    assert!(
        cl.values().all(|h| h == "free" || h == "done"),
        "claims after every archiver stopped: {cl:?}"
    );
    ws.ok(&["verify"]);

    let got = read_local("duckdb", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "archive of three shared archivers",
    );
    assert_per_key_order(&c, &rt, &stream, &puts, &got, true);
    // The positions table, written by all three, names every shard's last record.
    let rows = duckdb(
        &ws.archive.join(&stream),
        &format!(
            "SELECT shard_id, sequence_number FROM read_parquet('{}/fluxcap-positions/{stream}/positions.parquet')",
            ws.archive.display()
        ),
    );
    let mut last: BTreeMap<String, fluxcap::record::Position> = BTreeMap::new();
    for g in &got {
        let p = fluxcap::record::Position::new(g.sequence_number.clone(), 0);
        let e = last.entry(g.shard_id.clone()).or_insert(p.clone());
        if p > *e {
            *e = p;
        }
    }
    let table: BTreeMap<String, String> = rows
        .iter()
        .map(|r| {
            (
                r["shard_id"].as_str().unwrap_or_default().to_string(),
                r["sequence_number"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for (shard, p) in &last {
        assert_eq!(
            table.get(shard),
            Some(&p.sequence_number),
            "positions row of {shard}: {table:?}"
        );
    }
}

#[test]
fn single_and_shared_archivers_refuse_each_other() {
    let k = kinesis();
    let stream = unique("modes");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 2));
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archiver]\nlease_ttl = \"4s\"\nmetrics_bind = \"\"",
        &[(&stream, "json")],
    );
    let lease_dir = ws.archive.join(&stream).join("_fluxcap/lease");
    let workers_dir = ws.archive.join(&stream).join("_fluxcap/workers");
    let has_objects = |d: &Path| {
        walk_files(d)
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "json"))
    };

    let mut single = ws.spawn_archiver();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_objects(&lease_dir) {
        assert!(
            Instant::now() < deadline,
            "the single archiver took no lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = ws.run(&["archive", "--once", "--shared"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("a single archiver"), "{err}");
    assert!(terminate(&mut single).success());

    let mut shared = ws.cmd();
    let mut shared = shared
        .args(["archive", "--shared"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_objects(&workers_dir) {
        assert!(
            Instant::now() < deadline,
            "the shared archiver has no heartbeat"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = ws.run(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("shared archivers") && err.contains("--shared"),
        "{err}"
    );
    assert!(terminate(&mut shared).success());
    // Its heartbeat is gone with it: a single archiver may start again.
    assert!(!has_objects(&workers_dir));
    let puts = rt.block_on(put_records(&c, &stream, &orders(50, 7)));
    ws.ok(&["archive", "--once"]);
    let got = read_local("pyarrow", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "after both modes",
    );
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Latest claim holder of each shard, read through the store (S3 or local).
fn claims_in(
    rt: &tokio::runtime::Runtime,
    a: &fluxcap::archive::store::Archive,
    stream: &str,
) -> BTreeMap<String, String> {
    rt.block_on(async {
        let dir = a.layout.owners_dir(stream);
        let mut latest: BTreeMap<String, object_store::path::Path> = BTreeMap::new();
        for o in a.list(&dir).await.unwrap() {
            let Some(rel) = o.location.prefix_match(&dir) else {
                continue;
            };
            let parts: Vec<String> = rel.map(|p| p.as_ref().to_string()).collect();
            if parts.len() == 2 && latest.get(&parts[0]).is_none_or(|p| *p < o.location) {
                latest.insert(parts[0].clone(), o.location.clone());
            }
        }
        let mut out = BTreeMap::new();
        for (k, p) in latest {
            // Replaced and removed since the listing: the caller looks again.
            let Ok(b) = a.get_bytes(&p).await else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            out.insert(k, v["holder"].as_str().unwrap_or_default().to_string());
        }
        out
    })
}

#[test]
fn a_paused_shared_archiver_on_s3_is_taken_over_and_stops_when_it_wakes_up() {
    let k = kinesis();
    let s3 = s3();
    let stream = unique("paused");
    let bucket = unique("paused-bucket");
    create_bucket(&s3, &bucket);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 4));
    let ttl = Duration::from_secs(4);
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&format!("s3://{bucket}/arch")),
        Some(&s3.endpoint()),
        "[archive.flush]\nmax_age = \"500ms\"\n[archiver]\nshared = true\nlease_ttl = \"4s\"\nshard_discovery_interval = \"1s\"\npoll_interval = \"200ms\"\nmetrics_bind = \"\"",
        &[(&stream, "json")],
    );
    let store = s3_archive(&s3.endpoint(), &bucket, "arch");
    let mut a = ws.cmd();
    let a = a
        .arg("archive")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut b = ws.spawn_archiver();
    let mut puts = rt.block_on(put_records(&c, &stream, &orders(300, 11)));
    // Both hold two shards.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ida, idb) = loop {
        let cl = claims_in(&rt, &store, &stream);
        let mut holders: BTreeMap<&String, usize> = BTreeMap::new();
        for h in cl.values() {
            *holders.entry(h).or_default() += 1;
        }
        if cl.len() == 4 && holders.len() == 2 && holders.values().all(|n| *n == 2) {
            // Which is which: the heartbeat objects name their pids.
            let hb = rt
                .block_on(store.list(&store.layout.workers_dir(&stream)))
                .unwrap();
            let mut by_pid = BTreeMap::new();
            for o in hb {
                let v: serde_json::Value =
                    serde_json::from_slice(&rt.block_on(store.get_bytes(&o.location)).unwrap())
                        .unwrap();
                by_pid.insert(
                    v["pid"].as_u64().unwrap_or(0),
                    v["owner"].as_str().unwrap_or("").to_string(),
                );
            }
            let ida = by_pid[&u64::from(a.id())].clone();
            let idb = by_pid[&u64::from(b.id())].clone();
            break (ida, idb);
        }
        assert!(Instant::now() < deadline, "not two each: {cl:?}");
        std::thread::sleep(Duration::from_millis(200));
    };

    // Pause A (as a long GC pause or a frozen VM would): B, which cannot
    // tell a stopped process from a slow one, takes its shards over after
    // watching its heartbeat go unrenewed, within 2 × the ttl.
    assert_eq!(
        unsafe { libc::kill(a.id() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    let paused = Instant::now();
    loop {
        let cl = claims_in(&rt, &store, &stream);
        if cl.len() == 4 && cl.values().all(|h| *h == idb) {
            break;
        }
        assert!(
            paused.elapsed() < 2 * ttl + Duration::from_secs(2),
            "B did not take A's shards over in time: {cl:?} (A = {ida})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "B held every shard {:?} after A was paused",
        paused.elapsed()
    );
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(300, 12))));

    // A wakes up: its heartbeat is gone, so it stops (exit 4) without
    // committing anything over B's work.
    assert_eq!(
        unsafe { libc::kill(a.id() as libc::pid_t, libc::SIGCONT) },
        0
    );
    let out = output_after_exit(a, Duration::from_secs(60));
    assert_eq!(out.0.code(), Some(4), "A after waking up: {}", out.1);
    assert!(out.1.contains("fenced"), "{}", out.1);

    let deadline = Instant::now() + Duration::from_secs(120);
    let archived = || -> u64 {
        rt.block_on(fluxcap::archive::checkpoint::load_all(&store, &stream))
            .unwrap()
            .iter()
            .map(|c| c.records)
            .sum()
    };
    while archived() < puts.len() as u64 {
        assert!(Instant::now() < deadline, "B did not catch up");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(terminate(&mut b).success());
    let got = read_archive(
        "duckdb",
        &[
            "--s3-endpoint",
            &s3.endpoint(),
            "--bucket",
            &bucket,
            "--prefix",
            &format!("arch/{stream}"),
        ],
    );
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "archive after a pause",
    );
}

/// Wait for `child` to exit (within `limit`, else kill it and fail);
/// its status and standard error.
fn output_after_exit(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}
