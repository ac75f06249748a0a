//! Resuming a replay keeps its promises: records rejected before a crash
//! stay rejected (and the command says so), a reader that closes standard
//! output stops the replay cleanly, `--resume` names the options that differ
//! from the stored ones, and a resumed run selects exactly the records the
//! first run selected, whatever `now()` says by then.

use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::replay::walk;

const SHARD: &str = "shardId-000000000000";

/// Write records (arrival ms, JSON payload) of one shard straight into the
/// archive, sequence numbers in the given order; the stream is not in
/// Kinesis, so a replay reads the archive only.
fn ingest(dir: &Path, stream: &str, recs: &[(i64, String)]) -> Vec<fluxcap::record::Record> {
    use fluxcap::archive::layout::Layout;
    use fluxcap::archive::store::Archive;
    std::fs::create_dir_all(dir).unwrap();
    let archive = Archive {
        store: std::sync::Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap(),
        ),
        location: fluxcap::config::ArchiveLocation::Local(dir.to_path_buf()),
        layout: Layout::new(object_store::path::Path::default()),
    };
    let shard: std::sync::Arc<str> = SHARD.into();
    let recs: Vec<fluxcap::record::Record> = recs
        .iter()
        .enumerate()
        .map(|(i, (arrival_ms, data))| fluxcap::record::Record {
            shard_id: shard.clone(),
            sequence_number: format!("4960{:050}", i + 1).into(),
            subsequence_number: 0,
            partition_key: format!("k{}", i % 13),
            explicit_hash_key: None,
            arrival_ms: *arrival_ms,
            data: data.clone().into_bytes().into(),
        })
        .collect();
    let settings = fluxcap::archive::writer::ParquetSettings::default();
    rt().block_on(fluxcap::archive::ingest::write_flush(
        &archive, &settings, stream, SHARD, &recs,
    ))
    .unwrap();
    recs
}

/// A JSON payload of about 300 bytes.
fn body(i: usize) -> String {
    format!(r#"{{"i":{i},"pad":"{}"}}"#, "p".repeat(280))
}

pub(crate) fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The one replay's directory in the archive store.
pub(crate) fn replay_dir(ws: &Workspace) -> PathBuf {
    walk(&ws.archive)
        .into_iter()
        .find(|p| p.ends_with("manifest.json"))
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .expect("the replay has a manifest")
}

pub(crate) fn id_of(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().to_string()
}

/// Wait for `child` to exit (deadline 120 s).
pub(crate) fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "the replay did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until `child`'s replay saves a `progress.json` that `done` accepts
/// (at most `within`; the child must keep running); its path.
pub(crate) fn wait_for_progress(
    ws: &Workspace,
    child: &mut Child,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> PathBuf {
    let deadline = Instant::now() + within;
    let mut last = serde_json::Value::Null;
    loop {
        if let Some(p) = walk(&ws.archive)
            .into_iter()
            .find(|p| p.ends_with("progress.json"))
            && let Ok(b) = std::fs::read(&p)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
        {
            if done(&v) {
                return p;
            }
            last = v;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the replay ended: {last}"
        );
        assert!(
            Instant::now() < deadline,
            "the replay's progress was not there within {within:?}: {last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `fluxcap <args>` with standard output read by a reader that closes
/// it after `n` lines (as `| head -n n` does). The lines read, the exit
/// status and standard error.
pub(crate) fn read_then_close(
    ws: &Workspace,
    args: &[&str],
    n: usize,
) -> (Vec<String>, i32, String) {
    let mut child = ws
        .cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    {
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        for _ in 0..n {
            let mut l = String::new();
            if out.read_line(&mut l).unwrap() == 0 {
                break;
            }
            got.push(l);
        }
        // Dropping the reader closes the pipe.
    }
    let st = wait(&mut child);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (got, st.code().unwrap_or(-1), err)
}

pub(crate) fn seq_of(line: &serde_json::Value) -> String {
    line["sequence_number"].as_str().unwrap().to_string()
}

fn state_of(ws: &Workspace, id: &str) -> String {
    let o = ws.ok(&["replay", "--list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Old code: the write to the closed pipe failed with EPIPE, the command
/// printed an I/O error, exited 1 and left the replay "interrupted".
#[test]
fn replay_resume_after_the_reader_closed_the_output() {
    let k = ferrokinesis(false);
    let stream = unique("head");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    // ~900 KB of lines: more than the pipe and the replay's buffer hold.
    let recs: Vec<(i64, String)> = (0..3000).map(|i| (t0 + i as i64, body(i))).collect();
    let recs = ingest(&ws.archive, &stream, &recs);
    let want: Vec<String> = recs.iter().map(|r| r.sequence_number.to_string()).collect();

    let (got, code, err) = read_then_close(&ws, &["replay", "--stream", &stream, "--to", "-"], 5);
    assert_eq!(code, 0, "a closed output is a clean stop: {err}");
    assert!(!err.contains("error"), "{err}");
    let got: Vec<String> = got
        .iter()
        .map(|l| seq_of(&serde_json::from_str(l).unwrap()))
        .collect();
    assert_eq!(got, want[..5]);
    let dir = replay_dir(&ws);
    let id = id_of(&dir);
    assert_eq!(state_of(&ws, &id), "stopped (output closed)");
    let p = json(&dir.join("progress.json"));
    assert_eq!(p["phase"], "output_closed");
    assert!(p["error"].is_null(), "{p}");
    // Sent: the records written through to the pipe (the reader may not
    // have read the last of them).
    let sent = p["sent"].as_u64().unwrap() as usize;
    assert!((5..want.len()).contains(&sent), "{p}");

    // Resumable: the rest, from the first record not written.
    let o = ws.ok(&["replay", "--resume", &id]);
    let rest: Vec<String> = parse_json_lines(&o.stdout).iter().map(seq_of).collect();
    assert_eq!(rest, want[sent..]);
    assert_eq!(state_of(&ws, &id), "done");
}

/// Progress saved by the previous version has a count (`sent`) and no
/// positions: a resume skips that many records of the ordered selection.
#[test]
fn a_replay_saved_by_the_previous_version_resumes_by_its_count() {
    let k = ferrokinesis(false);
    let stream = unique("oldprog");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let recs: Vec<(i64, String)> = (0..3000).map(|i| (t0 + i as i64, body(i))).collect();
    let recs = ingest(&ws.archive, &stream, &recs);
    let want: Vec<String> = recs.iter().map(|r| r.sequence_number.to_string()).collect();
    let (_, code, err) = read_then_close(&ws, &["replay", "--stream", &stream, "--to", "-"], 5);
    assert_eq!(code, 0, "{err}");
    let dir = replay_dir(&ws);
    let id = id_of(&dir);
    // The previous version's progress.json: the same fields without the
    // positions this version adds.
    let mut p = json(&dir.join("progress.json"));
    assert!(p.get("through").is_some(), "{p}");
    // A position edited into something else is refused, not read as "from
    // the start" (which would send everything again).
    let mut bad = p.clone();
    bad["through"] = "not-a-position".into();
    std::fs::write(
        dir.join("progress.json"),
        serde_json::to_vec_pretty(&bad).unwrap(),
    )
    .unwrap();
    let o = ws.run(&["replay", "--resume", &id]);
    assert!(!o.status.success());
    assert!(o.stdout.is_empty(), "nothing is sent");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("progress.json"), "{err}");
    let o = p.as_object_mut().unwrap();
    o.remove("through");
    o.remove("targets");
    std::fs::write(
        dir.join("progress.json"),
        serde_json::to_vec_pretty(&p).unwrap(),
    )
    .unwrap();
    let sent = p["sent"].as_u64().unwrap() as usize;
    let o = ws.ok(&["replay", "--resume", &id]);
    let rest: Vec<String> = parse_json_lines(&o.stdout).iter().map(seq_of).collect();
    assert_eq!(rest, want[sent..]);
}

/// A compacted replay is one sorted query: its resume starts after the
/// saved position (a predicate before the sort), and sends exactly the
/// rest of the compacted state.
#[test]
fn a_compacted_replay_resumes_after_its_saved_position() {
    let k = ferrokinesis(false);
    let stream = unique("compres");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let recs: Vec<(i64, String)> = (0..3000).map(|i| (t0 + i as i64, body(i))).collect();
    let recs = ingest(&ws.archive, &stream, &recs);
    // Keys k0..k12 (i % 13): the last record of each key, in sequence order.
    let mut last: HashMap<String, String> = HashMap::new();
    for r in &recs {
        last.insert(r.partition_key.clone(), r.sequence_number.to_string());
    }
    let mut want: Vec<String> = last.into_values().collect();
    want.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    assert_eq!(want.len(), 13);
    let args = ["replay", "--stream", &stream, "--to", "-", "--compact"];
    let (got, code, err) = read_then_close(&ws, &args, 0);
    assert_eq!(code, 0, "{err}");
    assert!(got.is_empty());
    let dir = replay_dir(&ws);
    let id = id_of(&dir);
    // The whole state (the reader closed before the first line).
    let all = ws.ok(&["replay", "--resume", &id]);
    let first: Vec<String> = parse_json_lines(&all.stdout).iter().map(seq_of).collect();
    assert_eq!(first, want, "the whole compacted state, in order");
    let mut p = json(&dir.join("progress.json"));
    assert_eq!(p["phase"], "done", "{p}");
    // Back to a stop after 5 records, as a closed output saves it (the
    // position of the 5th, as this version writes positions).
    let through = p["through"].as_str().unwrap().to_string();
    assert!(!through.is_empty());
    let key5 = {
        let seq = &want[4];
        let shard = SHARD.as_bytes();
        let mut k = Vec::new();
        k.extend_from_slice(&0u32.to_be_bytes());
        k.extend_from_slice(shard);
        k.push(0);
        k.extend_from_slice(&(seq.len() as u16).to_be_bytes());
        k.extend_from_slice(seq.as_bytes());
        k.extend_from_slice(&(1u64 << 63).to_be_bytes());
        k.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let o = p.as_object_mut().unwrap();
    o.insert("phase".into(), "output_closed".into());
    o.insert("sent".into(), 5.into());
    o.insert("through".into(), key5.into());
    o.insert("total".into(), serde_json::Value::Null);
    std::fs::write(
        dir.join("progress.json"),
        serde_json::to_vec_pretty(&p).unwrap(),
    )
    .unwrap();
    let o = ws.ok(&["replay", "--resume", &id]);
    let rest: Vec<String> = parse_json_lines(&o.stdout).iter().map(seq_of).collect();
    assert_eq!(rest, want[5..]);
}

/// Old code refused every option given with `--resume` with one generic
/// message ("give only the id"), equal ones included, and ignored `--stream`.
#[test]
fn replay_resume_names_conflicting_options() {
    let k = ferrokinesis(false);
    let stream = unique("opts");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let recs: Vec<(i64, String)> = (0..3000).map(|i| (t0 + i as i64, body(i))).collect();
    let recs = ingest(&ws.archive, &stream, &recs);
    let pred = "json_get_int(data, 'i') % 2 = 0";
    let since = "2d";
    // Interrupted by its reader (whatever the exit status says).
    read_then_close(
        &ws,
        &[
            "replay", "--stream", &stream, "--to", "-", "--where", pred, "--since", since,
        ],
        5,
    );
    let dir = replay_dir(&ws);
    let id = id_of(&dir);
    let sent = json(&dir.join("progress.json"))["sent"].as_u64().unwrap() as usize;

    let o = ws.run(&[
        "replay",
        "--resume",
        &id,
        "--where",
        "TRUE",
        "--to",
        "file://x.jsonl",
        "--compact",
        "--stream",
        "other",
        "--engine",
        "drill",
        "--since",
        since,
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        format!("--where: stored {pred:?}, given \"TRUE\""),
        "--to: stored \"-\", given \"file://x.jsonl\"".to_string(),
        "--compact: stored off, given on".to_string(),
        format!("--stream: stored {stream:?}, given \"other\""),
        "--engine: only applies when a replay starts".to_string(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    // The same --since (relative to the replay's start) is no conflict.
    assert!(!err.contains("--since"), "{err}");
    // Nothing ran: the replay is where it was.
    assert_eq!(
        json(&dir.join("progress.json"))["sent"].as_u64().unwrap() as usize,
        sent
    );

    // Options equal to the stored ones, and another --rate, are accepted.
    let o = ws.ok(&[
        "replay", "--resume", &id, "--stream", &stream, "--to", "-", "--where", pred, "--since",
        since, "--rate", "100000",
    ]);
    let want: Vec<String> = recs
        .iter()
        .filter(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
            v["i"].as_i64().unwrap() % 2 == 0
        })
        .map(|r| r.sequence_number.to_string())
        .collect();
    let rest: Vec<String> = parse_json_lines(&o.stdout).iter().map(seq_of).collect();
    assert_eq!(rest, want[sent..]);
}

/// Old code evaluated `now()` when each run started, so a resumed run
/// selected records the first run had not (and skipped by OFFSET against a
/// different selection); and it accepted `random()`.
#[test]
fn replay_resume_pins_now_and_refuses_random() {
    let k = ferrokinesis(false);
    let stream = unique("now");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let now = chrono::Utc::now().timestamp_millis();
    // Three in four records arrived ten minutes ago; every fourth one
    // "arrives" 8 to 9 s from now (arrival times come from the writer's
    // clock and do not always increase).
    let future_from = now + 8_000;
    let recs: Vec<(i64, String)> = (0..3000)
        .map(|i| {
            let t = if i % 4 == 1 {
                future_from + (i as i64 % 1000)
            } else {
                now - 600_000 + i as i64
            };
            (t, body(i))
        })
        .collect();
    let recs = ingest(&ws.archive, &stream, &recs);
    let pred = "approximate_arrival_timestamp < now()";

    // Non-deterministic expressions are refused, in one or two lines.
    for args in [
        vec!["--where", "random() < 0.5"],
        vec!["--compact", "--key", "uuid()"],
    ] {
        let mut a = vec!["replay", "--stream", &stream, "--to", "-"];
        a.extend(args.iter().copied());
        let o = ws.run(&a);
        assert_eq!(o.status.code(), Some(2), "{a:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        let f = if args[0] == "--where" {
            "random()"
        } else {
            "uuid()"
        };
        assert!(
            err.contains(f) && err.contains(args[args.len() - 2]),
            "{err}"
        );
        assert!(err.trim().lines().count() <= 2, "{err}");
    }
    assert!(
        walk(&ws.archive)
            .iter()
            .all(|p| !p.ends_with("manifest.json"))
    );

    read_then_close(
        &ws,
        &["replay", "--stream", &stream, "--to", "-", "--where", pred],
        5,
    );
    let dir = replay_dir(&ws);
    let id = id_of(&dir);
    let as_of = json(&dir.join("manifest.json"))["as_of_ms"]
        .as_i64()
        .unwrap();
    assert!(
        as_of < future_from,
        "the replay started after the 'future' records' arrival: the machine is too slow for this test"
    );
    let p = json(&dir.join("progress.json"));
    assert_ne!(p["phase"], "done", "{p}");
    let sent = p["sent"].as_u64().unwrap() as usize;
    // What the replay selected at its start.
    let want: Vec<String> = recs
        .iter()
        .filter(|r| r.arrival_ms < as_of)
        .map(|r| r.sequence_number.to_string())
        .collect();
    assert_eq!(want.len(), 2250);
    assert!(sent < want.len());

    // Later, now() selects the "future" records too; the resumed run must not.
    while chrono::Utc::now().timestamp_millis() < future_from + 1_500 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = ws.ok(&["replay", "--resume", &id]);
    let rest: Vec<String> = parse_json_lines(&o.stdout).iter().map(seq_of).collect();
    assert_eq!(rest.len(), want.len() - sent);
    assert!(
        rest == want[sent..],
        "the resumed run selected other records"
    );
}

/// Old code kept the rejected list in memory and wrote it when the run
/// ended: after kill -9 the records rejected so far were forgotten, the
/// resumed run started a new list and exited 0.
#[test]
fn replay_resume_keeps_records_rejected_before_a_kill_9() {
    let src = ferrokinesis(false);
    let dst = ferrokinesis(true);
    let (stream, target) = (unique("src"), unique("dst"));
    let ws = Workspace::new(
        &src.endpoint(),
        None,
        None,
        &format!(
            "[replay]\ntarget_endpoint = \"{}\"\ncheckpoint_records = 100\ncheckpoint_interval = \"200ms\"\n",
            dst.endpoint()
        ),
        &[(&stream, "json")],
    );
    let (cs, cd) = (
        kinesis_client(&src.endpoint()),
        kinesis_client(&dst.endpoint()),
    );
    let rt = rt();
    let n = 3000;
    // Every hundredth record is larger than the target takes.
    let recs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let pad = if i % 100 == 50 { 600 } else { i % 20 };
            (
                format!("k{}", i % 30),
                format!(r#"{{"v":{i},"pad":"{}"}}"#, "x".repeat(pad)).into_bytes(),
            )
        })
        .collect();
    let puts = rt.block_on(async {
        create_stream(&cs, &stream, 1).await;
        create_stream(&cd, &target, 1).await;
        put_records(&cs, &stream, &recs).await
    });
    let big = |p: &Put| p.data.len() + p.partition_key.len() > 400;
    let oversized: BTreeSet<String> = puts
        .iter()
        .filter(|p| big(p))
        .map(|p| p.sequence_number.clone())
        .collect();
    assert_eq!(oversized.len(), 30);
    let args = [
        "replay",
        "--stream",
        &stream,
        "--to",
        &format!("kinesis://{target}"),
        "--no-annotate",
        "--set",
        "replay.max_record_size=400",
    ];
    // Paced at 1,000 records/s into one shard: about 3 s.
    let mut child = ws
        .cmd()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once progress shows rejected records, kill -9.
    let deadline = Instant::now() + Duration::from_secs(120);
    let progress = loop {
        if let Some(p) = walk(&ws.archive)
            .into_iter()
            .find(|p| p.ends_with("progress.json"))
            && let Ok(b) = std::fs::read(&p)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
            && v["rejected"].as_u64().unwrap_or(0) >= 3
            && v["sent"].as_u64().unwrap_or(0) >= 400
        {
            break p;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the replay ended too early"
        );
        assert!(Instant::now() < deadline, "no progress with rejections");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let dir = progress.parent().unwrap().to_path_buf();
    let id = id_of(&dir);
    let saved = json(&progress);
    let sent_before = saved["sent"].as_u64().unwrap() as usize;
    assert!(sent_before < n, "{saved}");
    // In the replay's order (one shard: sequence order), which listed
    // records lie in the window a resume sends again.
    let mut order: Vec<&Put> = puts.iter().collect();
    order.sort_by(|a, b| fluxcap::record::cmp_sequence(&a.sequence_number, &b.sequence_number));
    let index: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, p)| (p.sequence_number.as_str(), i))
        .collect();
    let listed_before =
        parse_json_lines(&std::fs::read(dir.join("rejected.jsonl")).unwrap_or_default());
    let in_window = listed_before
        .iter()
        .filter(|l| index[l["sequence_number"].as_str().unwrap()] >= sent_before)
        .count();
    eprintln!(
        "killed at sent={sent_before}: {} rejected listed, {in_window} of them in the re-sent window",
        listed_before.len()
    );

    let o = ws.run(&[
        "replay",
        "--resume",
        &id,
        "--set",
        "replay.max_record_size=400",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("30 record(s)"), "{err}");
    // Listed exactly once each, whichever run rejected them.
    let listed: Vec<String> = parse_json_lines(&std::fs::read(dir.join("rejected.jsonl")).unwrap())
        .iter()
        .map(seq_of)
        .collect();
    assert_eq!(listed.len(), oversized.len(), "{listed:?}");
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), oversized);
    let p = json(&dir.join("progress.json"));
    assert_eq!(p["phase"], "done");
    assert_eq!(p["rejected"], 30);
    // Everything else arrived (duplicates only from the window).
    let got = rt.block_on(read_stream(&cd, &target));
    let got: BTreeSet<Vec<u8>> = got.into_iter().map(|g| g.data).collect();
    for p in &puts {
        assert_eq!(got.contains(&p.data), !big(p), "{}", p.sequence_number);
    }
    // Finished, and still failed: a second look says the same.
    assert_eq!(state_of(&ws, &id), "done");
}

/// The replay's lease: a second run of the same replay is refused while the
/// first one renews it, even when the first one's progress looks like
/// another host's (the pid check cannot see it). Old code started a second,
/// concurrent run.
#[test]
fn replay_resume_is_refused_while_another_process_holds_the_replay() {
    let k = kinesis();
    let stream = unique("held");
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[replay]\ncheckpoint_interval = \"1h\"\ncheckpoint_records = 1000000\n[archiver]\nlease_ttl = \"3s\"",
        &[(&stream, "json")],
    );
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        let recs: Vec<(String, Vec<u8>)> = (0..200)
            .map(|i| (format!("k{i}"), body(i).into_bytes()))
            .collect();
        put_records(&c, &stream, &recs).await;
    });
    let target = unique("held-t");
    rt.block_on(create_stream(&c, &target, 1));
    // A slow replay: --rate 5 paces its writer (200 records take 40 s).
    let mut first = ws
        .cmd()
        .args(["replay", "--stream", &stream, "--rate", "5", "--to"])
        .arg(format!("kinesis://{target}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let progress = loop {
        if let Some(p) = walk(&ws.archive)
            .into_iter()
            .find(|p| p.ends_with("progress.json"))
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the replay never saved its progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let id = id_of(progress.parent().unwrap());
    // Make its progress look like another host's, long silent.
    let mut p = json(&progress);
    p["host"] = "elsewhere".into();
    p["updated_ms"] = 0.into();
    std::fs::write(&progress, serde_json::to_vec(&p).unwrap()).unwrap();

    let second = ws.run(&["replay", "--resume", &id]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(4), "{err}");
    assert!(err.contains("being run by another process"), "{err}");
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on");
    let _ = first.kill();
    let _ = first.wait();
}
