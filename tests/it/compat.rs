//! An archive written by the previous version (checkpoint format 1, files
//! written at their final paths, an interrupted flush's intent) keeps
//! working: `verify`, `sql` and `status` read it, and an archiver run
//! recovers it into the current protocol. The fixture in
//! `tests/fixtures/v1-archive/` was written by the previous landed version's
//! binary (see its README).

use std::path::Path;

use fluxcap::archive::checkpoint::{ShardCheckpoint, load_latest};
use fluxcap::archive::layout::Layout;
use fluxcap::archive::store::Archive;
use fluxcap::config::ArchiveLocation;

use crate::harness::*;

const STREAM: &str = "orders-v1";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

#[test]
fn an_archive_written_by_the_previous_version_keeps_working() {
    let fixture = root().join("tests/fixtures/v1-archive");
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[(STREAM, "json")]);
    copy_dir(&fixture.join(STREAM), &ws.archive.join(STREAM));
    let expected: usize = std::fs::read_to_string(fixture.join("committed-records"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let table = ws.archive.join(STREAM);
    let pending_files: Vec<String> = std::fs::read_to_string(fixture.join("pending-files"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        !pending_files.is_empty(),
        "the fixture has an interrupted flush"
    );

    // Read side: verify names the interrupted flush's files but is clean.
    let out = ws.ok(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no gaps, no duplicates"), "{text}");
    assert!(text.contains("uncommitted file"), "{text}");
    let n = ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{}", q(STREAM)));
    assert_eq!(n as usize, expected);

    // Write side: opening the shard recovers the version-1 intent (its files
    // go) and continues under format 2.
    let rt = rt();
    let archive = Archive {
        store: std::sync::Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(&ws.archive).unwrap(),
        ),
        location: ArchiveLocation::Local(ws.archive.clone()),
        layout: Layout::new(""),
    };
    let shard = "shardId-000000000000";
    let before = rt
        .block_on(load_latest(&archive, STREAM, shard))
        .unwrap()
        .unwrap();
    assert_eq!(before.version, 1);
    assert!(!before.pending.is_empty());
    let ck = rt
        .block_on(ShardCheckpoint::open(
            &archive,
            STREAM,
            shard,
            vec![],
            "test",
            1,
        ))
        .unwrap();
    assert_eq!(ck.state().version, 2);
    assert_eq!(ck.state().position, before.position);
    assert_eq!(ck.state().records, before.records);
    for f in &pending_files {
        assert!(!ws.archive.join(f).exists(), "{f} was not removed");
    }
    let out = ws.ok(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no gaps, no duplicates") && !text.contains("uncommitted"),
        "{text}"
    );
    let got = read_local("pyarrow", &table);
    assert_eq!(got.len(), expected);
}
