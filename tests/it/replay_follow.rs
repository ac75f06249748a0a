//! `replay --follow`: backfill from the archive, then follow the live
//! stream — the hand-over under a running archiver and a running writer,
//! across a kill -9 and `--resume`.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::*;
use crate::replay::walk;

/// The complete lines written so far (a line being written is left out).
fn complete_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    parse_json_lines(&bytes[..end])
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

#[test]
fn follow_hands_over_from_archive_to_live_without_loss_or_duplicates() {
    let k = kinesis();
    let stream = unique("follow");
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archive.flush]\nmax_age = \"300ms\"\n[archiver]\npoll_interval = \"100ms\"\nmetrics_bind = \"\"\n\
         [replay]\ncheckpoint_interval = \"200ms\"\ncheckpoint_records = 50",
        &[(&stream, "json")],
    );
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 2));

    // A writer that keeps going: key k{i % 10}, value i (increasing).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, endpoint, stream) = (stop.clone(), k.endpoint(), stream.clone());
        std::thread::spawn(move || {
            let rt = crate::harness::rt();
            let c = kinesis_client(&endpoint);
            let mut puts = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let batch: Vec<(String, Vec<u8>)> = (i..i + 20)
                    .map(|v| {
                        (
                            format!("k{}", v % 10),
                            format!(r#"{{"v":{v}}}"#).into_bytes(),
                        )
                    })
                    .collect();
                i += 20;
                puts.extend(rt.block_on(put_records(&c, &stream, &batch)));
                std::thread::sleep(Duration::from_millis(20));
            }
            puts
        })
    };
    let mut archiver = ws.spawn_archiver();
    // Some history before the replay starts, part of it archived.
    wait_until(60, "archived history", || {
        walk(&ws.archive)
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "parquet"))
    });

    let out = ws.dir.path().join("follow.jsonl");
    let spawn = |args: &[&str]| {
        ws.cmd()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let to = format!("file://{}", out.display());
    let mut replay = spawn(&["replay", "--stream", &stream, "--follow", "--to", &to]);
    // Past the hand-over: the follow has forwarded records and saved its place.
    let progress = || -> Option<serde_json::Value> {
        let p = walk(&ws.archive)
            .into_iter()
            .find(|p| p.ends_with("progress.json"))?;
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    wait_until(60, "the follow to save positions", || {
        progress().is_some_and(|p| p["selection_done"] == true && p["follow"].is_object())
    });
    let lines_before_kill = complete_lines(&out).len();
    signal(&replay, libc::SIGKILL);
    let _ = replay.wait();
    let id = progress()
        .and_then(|_| {
            walk(&ws.archive)
                .into_iter()
                .find(|p| p.ends_with("manifest.json"))
        })
        .and_then(|p| p.parent()?.file_name()?.to_str().map(String::from))
        .unwrap();

    // Resumed while the writer and the archiver go on.
    let replay = spawn(&["replay", "--resume", &id]);
    let grown = lines_before_kill + 200;
    wait_until(60, "the resumed follow to forward new records", || {
        complete_lines(&out).len() >= grown
    });
    stop.store(true, Ordering::SeqCst);
    let puts = writer.join().unwrap();
    wait_until(60, "every record to be forwarded", || {
        complete_lines(&out).len() >= puts.len()
    });
    signal(&replay, libc::SIGINT);
    let done = replay.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "a stopped follow ends cleanly: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(String::from_utf8_lossy(&done.stderr).contains("stopped following"));
    signal(&archiver, libc::SIGTERM);
    let _ = archiver.wait();

    // Every record exactly once, each key in write order.
    let got = complete_lines(&out);
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for g in &got {
        let shard = g["shard_id"].as_str().unwrap().to_string();
        let seq = g["sequence_number"].as_str().unwrap().to_string();
        *seen.entry((shard, seq)).or_default() += 1;
        let v: serde_json::Value = serde_json::from_str(g["data"].as_str().unwrap()).unwrap();
        per_key
            .entry(g["partition_key"].as_str().unwrap().to_string())
            .or_default()
            .push(v["v"].as_i64().unwrap());
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "sent twice: {dups:?}");
    let want: BTreeMap<(String, String), usize> = puts
        .iter()
        .map(|p| ((p.shard_id.clone(), p.sequence_number.clone()), 1))
        .collect();
    let missing = want.keys().filter(|k| !seen.contains_key(*k)).count();
    assert_eq!(missing, 0, "records missing from the follow");
    assert_eq!(seen.len(), want.len());
    for (k, vs) in &per_key {
        assert!(
            vs.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {vs:?}"
        );
    }
}
