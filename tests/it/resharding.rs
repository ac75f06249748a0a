//! A multi-shard stream split and merged while the archiver runs: every
//! record archived exactly once, lineage respected at every moment, per-key
//! order intact.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::harness::*;

pub fn archived_count(ws: &Workspace, rt: &tokio::runtime::Runtime, stream: &str) -> u64 {
    let cfg = fluxcap::config::load(&fluxcap::config::Sources {
        file: Some(ws.config.clone()),
        ..Default::default()
    })
    .unwrap();
    rt.block_on(async {
        let a = fluxcap::archive::store::Archive::open(&cfg).await.unwrap();
        fluxcap::archive::checkpoint::load_all(&a, stream)
            .await
            .unwrap()
            .iter()
            .map(|c| c.records)
            .sum()
    })
}

pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    child.wait().unwrap()
}

#[test]
fn split_and_merge_while_archiving() {
    let k = kinesis();
    let stream = unique("reshard");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 2));
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archive.flush]\nmax_age = \"500ms\"\n[archiver]\nshard_discovery_interval = \"1s\"\npoll_interval = \"200ms\"\nmetrics_bind = \"127.0.0.1:0\"",
        &[(&stream, "json")],
    );
    let mut child = ws.spawn_archiver();

    let mut puts = Vec::new();
    let verify_lineage = |ws: &Workspace| {
        let out = ws.run(&["verify"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            !text.contains("lineage"),
            "lineage violated while running:\n{text}"
        );
    };
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(150, 1))));
    verify_lineage(&ws);
    // Split shard 0 in the middle of its hash range.
    rt.block_on(split_first_shard(&c, &stream));
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(150, 2))));
    verify_lineage(&ws);
    // Merge the two children back.
    rt.block_on(merge_split_children(&c, &stream));
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(150, 3))));

    let deadline = Instant::now() + Duration::from_secs(180);
    while archived_count(&ws, &rt, &stream) < puts.len() as u64 {
        verify_lineage(&ws);
        assert!(Instant::now() < deadline, "archiver did not catch up");
        assert!(child.try_wait().unwrap().is_none(), "archiver exited early");
        std::thread::sleep(Duration::from_millis(300));
    }
    let st = terminate(&mut child);
    assert!(st.success(), "archiver exit status after SIGTERM: {st}");
    ws.ok(&["verify"]);

    let got = read_local("duckdb", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "resharded archive",
    );

    assert_per_key_order(&c, &rt, &stream, &puts, &got, true);
}

/// Per-key order: the archive ordered by (lineage depth, sequence) gives
/// each key's records in the order they were put; `merged`: the stream's
/// lineage includes a merge.
pub fn assert_per_key_order(
    c: &aws_sdk_kinesis::Client,
    rt: &tokio::runtime::Runtime,
    stream: &str,
    puts: &[Put],
    got: &[Archived],
    merged: bool,
) {
    let shards = rt.block_on(async { c.list_shards().stream_name(stream).send().await.unwrap() });
    let parents: HashMap<String, Vec<String>> = shards
        .shards()
        .iter()
        .map(|s| {
            let mut p: Vec<String> = s
                .parent_shard_id()
                .into_iter()
                .map(str::to_string)
                .collect();
            p.extend(s.adjacent_parent_shard_id().map(str::to_string));
            (s.shard_id().to_string(), p)
        })
        .collect();
    fn depth(id: &str, parents: &HashMap<String, Vec<String>>) -> usize {
        parents.get(id).map_or(0, |ps| {
            ps.iter().map(|p| 1 + depth(p, parents)).max().unwrap_or(0)
        })
    }
    assert!(
        !merged || parents.values().any(|p| p.len() == 2),
        "a merge happened"
    );
    let mut arch = got.to_vec();
    arch.sort_by(|a, b| {
        (
            depth(&a.shard_id, &parents),
            fluxcap::record::Position::new(a.sequence_number.clone(), 0),
        )
            .cmp(&(
                depth(&b.shard_id, &parents),
                fluxcap::record::Position::new(b.sequence_number.clone(), 0),
            ))
    });
    let mut by_key_put: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
    for p in puts {
        by_key_put
            .entry(&p.partition_key)
            .or_default()
            .push(&p.data);
    }
    let mut by_key_arch: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
    for a in &arch {
        by_key_arch
            .entry(&a.partition_key)
            .or_default()
            .push(&a.data);
    }
    assert_eq!(by_key_put, by_key_arch, "per-key order");
}
