//! `fluxcap archive --once` end to end against kinesis-mock, into a local
//! directory and into the moto S3 server; the result read back by pyarrow
//! and DuckDB must equal what was put, exactly once, across re-runs.

use crate::harness::*;

fn mixed_records(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut recs = orders(n, seed);
    // Payloads that are not JSON in a json stream: archived like any other.
    recs.push(("odd".into(), b"this is not json {".to_vec()));
    recs.push(("odd".into(), vec![0, 159, 146, 150, 255]));
    recs
}

#[test]
fn archive_once_local_exactly_once_across_runs() {
    let k = kinesis();
    let stream = unique("orders");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 3).await;
        let mut recs = mixed_records(300, 1);
        // A large record (900 KiB, under the default 1 MiB limit).
        recs.push((
            "big".into(),
            (0..900 * 1024).map(|i| (i % 241) as u8).collect(),
        ));
        put_records(&c, &stream, &recs).await
    });
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archive.flush]\nmax_bytes = \"64KiB\"\n[status]\nretention_warning = \"30h\"",
        &[(&stream, "json")],
    );
    // Nothing archived yet: with a 30h threshold on a 24h stream, every shard warns.
    let out = ws.ok(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("WARNING: stream").count(), 3, "{text}");
    assert!(text.contains("retention"), "{text}");
    let out = ws.ok(&["archive", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("archived {} records", puts.len())),
        "{err}"
    );
    assert!(err.contains("3 payloads were not valid JSON"), "{err}");
    let table = ws.archive.join(&stream);
    for engine in ["duckdb", "pyarrow"] {
        assert_same(
            &puts_multiset(&puts),
            &archived_multiset(&read_local(engine, &table)),
            engine,
        );
    }

    // A second run with nothing new adds nothing.
    let out = ws.ok(&["archive", "--once"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("archived 0 records"));

    // More traffic, another run: everything exactly once.
    puts.extend(rt.block_on(put_records(&c, &stream, &mixed_records(120, 2))));
    ws.ok(&["archive", "--once"]);
    let got = read_local("duckdb", &table);
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "after second batch",
    );
    // Hive partitions follow the arrival time (UTC).
    for a in &got {
        let (dt, hr) = fluxcap::archive::layout::partition_of(a.arrival_ms);
        assert_eq!((a.dt.clone(), a.hr.clone()), (dt, hr));
    }

    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));

    let out = ws.ok(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shards = v["streams"][0]["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    let archived: u64 = shards
        .iter()
        .map(|s| s["records_archived"].as_u64().unwrap())
        .sum();
    assert_eq!(archived as usize, puts.len());
    for s in shards {
        assert_eq!(s["state"], "open");
        assert!(s["checkpoint_sequence"].is_string());
        assert_eq!(s["warning"], false, "caught up: no retention risk");
    }
}

#[test]
fn verify_detects_a_deleted_file_and_a_duplicate() {
    let k = kinesis();
    let stream = unique("v");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 1).await;
    });
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    // Three separate runs → three flushes → three files.
    for seed in 0..3 {
        rt.block_on(put_records(&c, &stream, &orders(20, seed)));
        ws.ok(&["archive", "--once"]);
    }
    ws.ok(&["verify"]);
    let mut files: Vec<_> = walk(&ws.archive.join(&stream))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    // Duplicate: the same file copied into another partition.
    let other = ws.archive.join(&stream).join("dt=2001-01-01").join("hr=00");
    std::fs::create_dir_all(&other).unwrap();
    let copy = other.join(files[0].file_name().unwrap());
    std::fs::copy(&files[0], &copy).unwrap();
    let out = ws.run(&["verify"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("duplicate record"));
    std::fs::remove_file(&copy).unwrap();
    ws.ok(&["verify"]);
    // Gap: remove the middle file.
    let mut by_seq = files.clone();
    by_seq.sort_by_key(|p| {
        fluxcap::archive::layout::parse_data_file_name(p.file_name().unwrap().to_str().unwrap())
            .unwrap()
            .first
    });
    std::fs::remove_file(&by_seq[1]).unwrap();
    let out = ws.run(&["verify"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("gap"), "{text}");
}

pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn archive_once_to_s3() {
    let k = kinesis();
    let s3 = s3();
    let stream = unique("s3orders");
    let bucket = unique("bkt");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &mixed_records(200, 3)).await
    });
    let loc = format!("s3://{bucket}/archive/v1");
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&loc),
        Some(&s3.endpoint()),
        "",
        &[(&stream, "json")],
    );
    // Missing bucket: a clear error naming the location.
    let out = ws.run(&["archive", "--once"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&loc) && err.contains("bucket does not exist"),
        "{err}"
    );

    create_bucket(&s3, &bucket);
    ws.ok(&["archive", "--once"]);
    ws.ok(&["verify"]);
    let ep = s3.endpoint();
    let got = read_archive(
        "duckdb",
        &[
            "--s3-endpoint",
            &ep,
            "--bucket",
            &bucket,
            "--prefix",
            &format!("archive/v1/{stream}"),
        ],
    );
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "s3 archive",
    );
}
