//! Bounded memory: `fluxcap archive` catching up a backlog of large records
//! stays within `archive.flush.memory_budget` plus a small constant, GetRecords
//! responses, encoder copies and upload buffers included (see
//! `src/archive/budget.rs`), and still archives every record exactly once.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use md5::Digest;

use crate::harness::*;

const MIB: u64 = 1024 * 1024;

/// Bytes that do not compress (xorshift): the Parquet files are as large as
/// the payloads, the worst case of the encoder's copies.
fn noise(seed: usize, len: usize) -> Vec<u8> {
    let mut x = (seed as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Identities and payload digests (the payloads themselves are large).
fn digests<I: IntoIterator<Item = (String, String, i64, Vec<u8>)>>(
    it: I,
) -> BTreeMap<(String, String, i64, Vec<u8>), usize> {
    multiset(
        it.into_iter()
            .map(|(s, q, n, d)| (s, q, n, md5::Md5::digest(&d).to_vec())),
    )
}

/// Run `fluxcap archive --once` in `ws` under a small forking wrapper
/// (scripts/py/bench_archive.py exec-measure): its peak RSS (wait4) and exit
/// code. Spawned directly, the child's ru_maxrss would start from this test
/// process's own peak (exec keeps the high-water mark of the image it
/// replaces), which holds the whole backlog.
fn archive_once_measured(ws: &Workspace) -> (i64, u64, String) {
    let json = ws.dir.path().join("rusage.json");
    let out = Command::new(python())
        .arg(root().join("scripts/py/bench_archive.py"))
        .args(["exec-measure", "--json"])
        .arg(&json)
        .args(["--timeout", "900", "--"])
        .arg(env!("CARGO_BIN_EXE_fluxcap"))
        .arg("--config")
        .arg(&ws.config)
        .args(["archive", "--once"])
        .current_dir(ws.dir.path())
        .env_remove("FLUXCAP_CONFIG")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("FLUXCAP_LOG", "fluxcap=info,warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exec-measure failed: {log}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (
        v["rc"].as_i64().unwrap(),
        v["maxrss_bytes"].as_u64().unwrap(),
        log,
    )
}

/// Old code held every shard's GetRecords response (10 MiB on Kinesis, all
/// of a shard's backlog on ferrokinesis), the SDK's copies of it, and each
/// flush's pages and file outside its budget: 235–260 MiB of peak RSS here
/// with a 32 MiB budget (the issue measured 121 MiB with small records).
#[test]
fn a_backlog_of_large_records_is_archived_within_the_memory_budget() {
    let k = ferrokinesis(false);
    let rt = rt();
    let c = kinesis_client(&k.endpoint());
    let stream = unique("mem");
    let budget = 32 * MIB;
    // 96 records of ~1 MB (the classic maximum) over 4 shards: a backlog of
    // three times the budget, answered in responses of many MiB.
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 4).await;
        let mut puts = Vec::new();
        for i in (0..96).step_by(4) {
            let recs: Vec<(String, Vec<u8>)> = (i..i + 4)
                .map(|j| (format!("key-{j}"), noise(j, 1_000_000)))
                .collect();
            puts.extend(put_records(&c, &stream, &recs).await);
        }
        puts
    });
    let shards: std::collections::BTreeSet<&str> =
        puts.iter().map(|p| p.shard_id.as_str()).collect();
    assert!(
        shards.len() >= 3,
        "the backlog is spread over the shards: {shards:?}"
    );
    let expected = digests(puts.iter().map(|p| {
        (
            p.shard_id.clone(),
            p.sequence_number.clone(),
            p.subsequence_number,
            p.data.clone(),
        )
    }));
    drop(puts);

    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        &format!("[archive.flush]\nmemory_budget = \"{}MiB\"\n", budget / MIB),
        &[(&stream, "binary")],
    );
    let (rc, peak, log) = archive_once_measured(&ws);
    assert_eq!(rc, 0, "fluxcap archive --once failed:\n{log}");
    assert!(log.contains("archived 96 records"), "{log}");
    eprintln!(
        "peak RSS {} MiB with a budget of {} MiB",
        peak / MIB,
        budget / MIB
    );

    // Every record exactly once (an independent reader).
    let got = read_local("duckdb", &ws.archive.join(&stream));
    assert_same(
        &expected,
        &digests(
            got.into_iter()
                .map(|a| (a.shard_id, a.sequence_number, a.subsequence_number, a.data)),
        ),
        "duckdb",
    );
    assert!(
        peak <= budget + 48 * MIB,
        "peak RSS {} MiB is above the budget of {} MiB + 48 MiB",
        peak / MIB,
        budget / MIB
    );
}
