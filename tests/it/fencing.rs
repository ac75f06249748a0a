//! Two archivers on one stream: the second is refused; conditional writes
//! fence a writer that lost a race (checked on the moto S3 server, whose
//! conditional writes are atomic, and on the local directory).

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxcap::Error;
use fluxcap::archive::checkpoint::ShardCheckpoint;
use fluxcap::archive::layout::Layout;
use fluxcap::archive::store::Archive;
use fluxcap::config::ArchiveLocation;
use object_store::aws::AmazonS3Builder;

use crate::harness::*;
use crate::resharding::terminate;

#[test]
fn second_archiver_is_refused_while_the_first_runs() {
    let k = kinesis();
    let stream = unique("lease");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(40, 9)).await
    });
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archiver]\nmetrics_bind = \"\"",
        &[(&stream, "json")],
    );
    let mut first = ws
        .cmd()
        .arg("archive")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lease_dir = ws.archive.join(&stream).join("_fluxcap/lease");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lease_dir.exists() || std::fs::read_dir(&lease_dir).unwrap().count() == 0 {
        assert!(
            Instant::now() < deadline,
            "first archiver never took the lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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

    assert!(terminate(&mut first).success());
    // The lease was released: the next run starts at once and adds nothing twice.
    ws.ok(&["archive", "--once"]);
    let got = read_local("duckdb", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "after two archivers",
    );
}

async fn race(a: &Archive) {
    let mut one = ShardCheckpoint::open(a, "s", "shardId-000000000000", vec![], "one")
        .await
        .unwrap();
    let mut two = ShardCheckpoint::open(a, "s", "shardId-000000000000", vec![], "two")
        .await
        .unwrap();
    one.begin(&[]).await.unwrap();
    match two.begin(&[]).await {
        Err(Error::Fenced { object, .. }) => {
            assert!(object.contains("00000000000000000001.json"), "{object}")
        }
        other => panic!("second writer not fenced: {other:?}"),
    }
    // The winner goes on.
    one.commit(None, None, 0, 0, false).await.unwrap();
}

#[test]
fn checkpoint_writers_are_fenced_on_s3_and_local() {
    let s3 = s3();
    let bucket = unique("fence");
    let out = std::process::Command::new(python())
        .args(["-c", &format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{bucket}')",
            s3.endpoint()
        )])
        .output()
        .unwrap();
    assert!(out.status.success());
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
