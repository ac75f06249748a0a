//! Two archivers on one stream: the second is refused; conditional writes
//! fence a writer that lost a race, also one whose generation number was
//! garbage-collected (checked on the moto S3 server, whose conditional writes
//! are atomic, and on the local directory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxcap::Error;
use fluxcap::archive::checkpoint::{Commit, ShardCheckpoint, load_latest};
use fluxcap::archive::layout::Layout;
use fluxcap::archive::store::Archive;
use fluxcap::config::ArchiveLocation;
use object_store::aws::AmazonS3Builder;

use crate::harness::*;
use crate::resharding::terminate;

/// GET /metrics from the archiver and return the value of one sample.
pub fn metric(port: u16, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

#[test]
fn second_archiver_is_refused_and_sigterm_commits_the_buffer() {
    let k = kinesis();
    let stream = unique("lease");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(40, 9)).await
    });
    let port = free_port();
    // Files close only at shutdown: max_age and max_bytes are far away.
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        &format!(
            "[archive.flush]\nmax_age = \"1h\"\n[archiver]\nmetrics_bind = \"127.0.0.1:{port}\""
        ),
        &[(&stream, "json")],
    );
    let mut first = ws.spawn_archiver();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, "fluxcap_records_read_total") != Some(puts.len() as u64) {
        assert!(
            Instant::now() < deadline,
            "first archiver never read the records"
        );
        assert!(first.try_wait().unwrap().is_none(), "first archiver exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric(port, "fluxcap_records_archived_total"),
        Some(0),
        "nothing flushed yet"
    );
    assert!(read_local("duckdb", &ws.archive.join(&stream)).is_empty());

    let out = ws.run(&["archive", "--once"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("being archived by another process")
            && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );

    // SIGTERM: the buffer is flushed and committed before exit.
    assert!(terminate(&mut first).success());
    let got = read_local("duckdb", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "committed at shutdown",
    );
    // The lease was released: the next run starts at once and adds nothing twice.
    let out = ws.ok(&["archive", "--once"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("archived 0 records"));
}

async fn race(a: &Archive) {
    let shard = "shardId-000000000000";
    let mut one = ShardCheckpoint::open(a, "s", shard, vec![], "one", 1)
        .await
        .unwrap();
    // A second writer of the same epoch takes the next generation: the first is fenced.
    let mut two = ShardCheckpoint::open(a, "s", shard, vec![], "two", 1)
        .await
        .unwrap();
    match one.commit(Commit::default()).await {
        Err(Error::Fenced { object, .. }) => {
            assert!(object.contains("00000000000000000002.json"), "{object}")
        }
        other => panic!("first writer not fenced: {other:?}"),
    }
    // The winner goes on.
    two.commit(Commit::default()).await.unwrap();

    // A stale writer (epoch 1) whose next generation number was garbage
    // collected by the new holder (epoch 2) recreates it, but is fenced by
    // the higher generation it finds right after.
    let mut stale = ShardCheckpoint::open(a, "s", shard, vec![], "stale", 1)
        .await
        .unwrap();
    let g = stale.state().generation;
    let mut new = ShardCheckpoint::open(a, "s", shard, vec![], "new", 2)
        .await
        .unwrap();
    for _ in 0..3 {
        new.commit(Commit::default()).await.unwrap();
    }
    assert!(new.state().generation >= g + 4);
    match stale.commit(Commit::default()).await {
        Err(Error::Fenced { .. }) => {}
        other => panic!("stale writer not fenced: {other:?}"),
    }
    let latest = load_latest(a, "s", shard).await.unwrap().unwrap();
    assert_eq!(latest.generation, new.state().generation);
    assert_eq!(latest.epoch, 2);
    // An opener of an older epoch than the latest generation is fenced at once.
    assert!(matches!(
        ShardCheckpoint::open(a, "s", shard, vec![], "old", 1).await,
        Err(Error::Fenced { .. })
    ));
}

#[test]
fn checkpoint_writers_are_fenced_on_s3_and_local() {
    let s3 = s3();
    let bucket = unique("fence");
    create_bucket(&s3, &bucket);
    let store = AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_region("us-east-1")
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    let archive = Archive {
        store: Arc::new(store),
        location: ArchiveLocation::S3 {
            bucket: bucket.clone(),
            prefix: "p".into(),
        },
        layout: Layout::new("p"),
    };
    rt().block_on(race(&archive));

    let dir = tempfile::tempdir().unwrap();
    let local = Archive {
        store: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        location: ArchiveLocation::Local(dir.path().to_path_buf()),
        layout: Layout::new(""),
    };
    rt().block_on(race(&local));
}
