//! Large replays and their resumes: a plain replay holds one piece of a
//! shard in memory (not the whole selection), a resume reads only what
//! comes after what was sent (not the archive again), and a target shard
//! that makes no progress holds back only its own records.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;
use crate::proxy::Proxy;
use crate::replay::decode_all;
use crate::replay_resume::{id_of, json, read_then_close, replay_dir, seq_of, wait_for_progress};

fn shard_id(s: usize) -> String {
    format!("shardId-{s:012}")
}

/// Write `files` flushes of `per_file` records into shard `s` of `stream`
/// (consecutive sequence numbers, an hour ago), payloads from `payload`,
/// keys `k<i % keys>`. The stream is not in Kinesis: a replay reads the archive.
fn ingest(
    dir: &Path,
    stream: &str,
    s: usize,
    files: usize,
    per_file: usize,
    keys: usize,
    payload: impl Fn(usize) -> Vec<u8>,
) -> Vec<String> {
    let archive = local_archive(dir);
    let shard: std::sync::Arc<str> = shard_id(s).into();
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let settings = fluxcap::archive::writer::ParquetSettings::default();
    let mut seqs = Vec::new();
    rt().block_on(async {
        for f in 0..files {
            let recs: Vec<fluxcap::record::Record> = (f * per_file..(f + 1) * per_file)
                .map(|i| fluxcap::record::Record {
                    shard_id: shard.clone(),
                    sequence_number: format!("4960{s:02}{:050}", i + 1).into(),
                    subsequence_number: 0,
                    partition_key: format!("k{}", i % keys),
                    explicit_hash_key: None,
                    arrival_ms: t0 + i as i64,
                    data: payload(i).into(),
                })
                .collect();
            seqs.extend(recs.iter().map(|r| r.sequence_number.to_string()));
            fluxcap::archive::ingest::write_flush(&archive, &settings, stream, &shard, &recs)
                .await
                .unwrap();
        }
    });
    seqs
}

/// Bytes that do not compress (xorshift), so Parquet sizes are payload sizes.
fn noise(seed: usize, len: usize) -> Vec<u8> {
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Old code sorted the whole selection at once: with no memory limit (the
/// default) its peak memory grew with the selection. Now it follows the
/// piece: a selection four times as large takes (about) no more memory.
#[test]
fn a_plain_replay_holds_one_piece_of_a_shard_in_memory() {
    let k = ferrokinesis(false);
    // Per shard: 4 or 16 files of 8 MiB of incompressible payloads.
    let (per_file, size) = (128, 64 * 1024);
    let peak = |files: usize| {
        let stream = unique("big");
        let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "binary")]);
        for s in 0..2 {
            ingest(&ws.archive, &stream, s, files, per_file, 50, |i| {
                noise(i * 7 + s, size)
            });
        }
        let out = ws.dir.path().join("plan.jsonl");
        let mut child = ws
            .cmd()
            .args([
                "replay",
                "--stream",
                &stream,
                "--to",
                &format!("file://{}", out.display()),
                "--dry-run",
                "--quiet",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut err, &mut s).unwrap();
            s
        });
        let (status, peak) = wait_with_peak_rss(child);
        let err = reader.join().unwrap();
        assert!(status.success(), "the dry run failed: {err}");
        let payload = (2 * files * per_file * size) as u64;
        eprintln!(
            "peak RSS {} MiB for {} MiB of payloads",
            peak >> 20,
            payload >> 20
        );
        (peak, payload)
    };
    let (small, small_payload) = peak(4);
    let (large, large_payload) = peak(16);
    assert!(
        large < small + (large_payload - small_payload) / 4,
        "peak RSS {} MiB for {} MiB of payloads, {} MiB for {} MiB: memory grows with the selection",
        small >> 20,
        small_payload >> 20,
        large >> 20,
        large_payload >> 20
    );
}

/// Wait for `child`; its exit status and peak resident set size (bytes).
fn wait_with_peak_rss(child: std::process::Child) -> (std::process::ExitStatus, u64) {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: plain FFI calls with valid pointers to locals; `child` is
    // our own child process, waited for exactly once (here).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    std::mem::forget(child);
    (
        std::process::ExitStatus::from_raw(status),
        usage.ru_maxrss as u64 * 1024,
    )
}

/// Old code resumed with an OFFSET over the whole selection: it read every
/// file of the archive again (and sorted it) to skip what was sent.
#[test]
fn a_resume_reads_only_what_comes_after_what_was_sent() {
    let k = kinesis();
    let s3 = s3();
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(s3.port));
    let bucket = unique("resume");
    create_bucket(&s3, &bucket);
    let stream = unique("res");
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&format!("s3://{bucket}")),
        Some(&proxy.endpoint()),
        "",
        &[(&stream, "json")],
    );
    // 3 shards × 3 flushes, written locally, then uploaded.
    let local = ws.dir.path().join("staging-archive");
    let body = |i: usize| format!(r#"{{"i":{i},"pad":"{}"}}"#, "p".repeat(100)).into_bytes();
    let mut want = Vec::new();
    for s in 0..3 {
        want.extend(ingest(&local, &stream, s, 3, 400, 20, body));
    }
    let up = aws_cli(&s3)
        .args(["s3", "cp", "--recursive", "--quiet"])
        .arg(&local)
        .arg(format!("s3://{bucket}/"))
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );

    // The reader stops 10 records into shard 2.
    let n = 2 * 3 * 400 + 10;
    let (got, code, err) = read_then_close(&ws, &["replay", "--stream", &stream, "--to", "-"], n);
    assert_eq!(code, 0, "{err}");
    assert_eq!(got.len(), n);
    let list = ws.ok(&["replay", "--list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_string();

    proxy.clear_requests();
    let o = ws.ok(&["replay", "--resume", &id]);
    let rest: Vec<String> = parse_json_lines(&o.stdout).iter().map(seq_of).collect();
    // Exactly the records not written through, in order.
    let sent = want.len() - rest.len();
    assert!(sent >= n, "{sent} < {n}");
    assert_eq!(rest, want[sent..]);
    let reads: Vec<String> = proxy
        .requests()
        .into_iter()
        .map(|r| r.line)
        .filter(|l| l.starts_with("GET ") && l.contains(".parquet") && !l.contains("_fluxcap"))
        .collect();
    assert!(
        reads.iter().any(|l| l.contains(&shard_id(2))),
        "the resume read no file of shard 2: {reads:?}"
    );
    for s in [0, 1] {
        assert!(
            !reads.iter().any(|l| l.contains(&shard_id(s))),
            "the resume read files of shard {s}, which was completely sent: {reads:?}"
        );
    }
}

/// Old code saved only the acknowledged prefix of the output order: behind
/// the first record of a target shard that made no progress, nothing else
/// was ever saved (here: `sent` stayed near 0 while seven shards took
/// thousands of records), so a resume sent all of those again.
#[test]
fn a_target_shard_that_makes_no_progress_holds_back_only_its_own_records() {
    let dst = ferrokinesis(false);
    let rt = rt();
    let proxy = rt.block_on(Proxy::start(dst.port));
    let (stream, target) = (unique("src"), unique("dst"));
    let checkpoint = 200;
    let ws = Workspace::new(
        &dst.endpoint(),
        None,
        None,
        &format!(
            "[replay]\ntarget_endpoint = \"{}\"\ncheckpoint_records = {checkpoint}\ncheckpoint_interval = \"1h\"\n",
            proxy.endpoint()
        ),
        &[(&stream, "json")],
    );
    let n = 16_000;
    let keys = 400;
    let body = |i: usize| format!(r#"{{"i":{i}}}"#).into_bytes();
    let want: BTreeSet<String> = ingest(&ws.archive, &stream, 0, 4, n / 4, keys, body)
        .into_iter()
        .collect();
    let cd = kinesis_client(&dst.endpoint());
    // The keys of the target's first shard (of eight) get no answer.
    let first_end: u128 = rt.block_on(async {
        create_stream(&cd, &target, 8).await;
        let shards = cd.list_shards().stream_name(&target).send().await.unwrap();
        shards
            .shards()
            .iter()
            .filter_map(|s| s.hash_key_range()?.ending_hash_key().parse::<u128>().ok())
            .min()
            .unwrap()
    });
    let stalled: Vec<String> = (0..keys)
        .map(|i| format!("k{i}"))
        .filter(|k| fluxcap::kinesis::writer::hash_key(k) <= first_end)
        .collect();
    assert!(!stalled.is_empty() && stalled.len() < keys);
    proxy.stall_keys(stalled.clone());

    let mut child = ws
        .cmd()
        .args([
            "replay",
            "--stream",
            &stream,
            "--to",
            &format!("kinesis://{target}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The reader stops once the first shard's queue is full (about 1,250
    // of its records in the output, some 10,000 records in all); the seven
    // other shards take theirs, and progress must say so although the
    // first shard takes nothing. (Old code: `sent` stayed near 0.)
    let goal = 5_000u64;
    let progress = wait_for_progress(&ws, &mut child, Duration::from_secs(50), |v| {
        v["sent"].as_u64().unwrap_or(0) >= goal
    });
    assert!(proxy.stalled() > 0);
    child.kill().unwrap();
    child.wait().unwrap();
    let saved = json(&progress);
    assert!(
        saved["targets"].as_array().is_some_and(|t| !t.is_empty()),
        "{saved}"
    );

    proxy.stall_keys(Vec::new());
    let id = id_of(&replay_dir(&ws));
    ws.ok(&["replay", "--resume", &id]);
    let got = rt.block_on(read_stream(&cd, &target));
    let mut count: HashMap<String, usize> = HashMap::new();
    for (a, _) in decode_all(&got) {
        *count.entry(a.unwrap().sequence_number).or_default() += 1;
    }
    let seen: BTreeSet<String> = count.keys().cloned().collect();
    assert_eq!(seen, want, "records lost or foreign");
    let dups: usize = count.values().map(|c| c - 1).sum();
    // The documented bound: records acknowledged since the last save
    // (fewer than checkpoint_records) plus one batch in flight per target
    // shard (the stalled shard's batch never reached the target).
    let bound = checkpoint + 7 * 500;
    assert!(dups <= bound, "{dups} records sent twice > bound {bound}");
}
