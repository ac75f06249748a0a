//! The cluster twin of `S` on a real Drill (the stack of `drill.rs`): the
//! view `archive.views.<stream>` that `cluster upload-resources` writes =
//! archived records ∪ live records after each shard's published position.
//!
//! EMR's Kinesis storage handler cannot run here, so the live side is stood
//! in by a table of the live table's shape, written by boto3 + pyarrow from
//! every record of the real stream (archived ones included), and served by a
//! file plugin with the Hive plugin's name, `streams`. The view must give
//! each record exactly once, equal to `fluxcap sql`'s `S`, before and after
//! the archiver commits more; the positions table is read by Drill too; and
//! the statements `catalog drill --views` prints run in Drill as printed.

use std::collections::BTreeMap;

use crate::drill::start_stack;
use crate::harness::*;

/// `(shard_id, sequence_number, subsequence_number)` → how many times.
fn ids(rows: &[serde_json::Value]) -> BTreeMap<(String, String, String), usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        let k = (
            r["shard_id"].as_str().unwrap_or_default().to_string(),
            r["sequence_number"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            match &r["subsequence_number"] {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            },
        );
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// `dt|hr|n` lines of a count per partition.
fn per_hour(rows: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}|{}|{}",
                r["dt"].as_str().unwrap_or_default(),
                r["hr"].as_str().unwrap_or_default(),
                r["n"]
            )
        })
        .collect();
    v.sort();
    v
}

fn post_json(url: &str, body: &serde_json::Value) -> String {
    let out = spawn_post_json(url, body).wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_drill_view_is_the_archive_plus_the_unarchived_tail_once_each() {
    let s3 = s3();
    let k = ferrokinesis(false);
    let stream = unique("dv");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(200, 11)).await;
    });
    let stack = start_stack(&s3, &k.endpoint(), &stream);
    let (ws, url, bucket) = (&stack.ws, stack.env.url(), stack.archive_bucket.clone());

    // The registration step wrote the view's definition into the views workspace.
    let listed = aws_cli(&s3)
        .args(["s3", "ls", "--recursive"])
        .arg(format!("s3://{bucket}/kinesis/_fluxcap/drill-views/"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains(&format!("{stream}.view.drill")), "{listed}");

    // 200 archived, then 100 more put: the unarchived tail.
    ws.ok(&["archive", "--once"]);
    rt.block_on(put_records(&c, &stream, &orders(100, 12)));

    // The live side: every record of the stream, in the live table's shape.
    let t = fluxcap::cluster::catalog::table_name(&stream);
    let live_key = format!("live/kinesis_archive/{t}_live/part-0.parquet");
    let s3_dest = [
        "--s3-endpoint",
        &s3.endpoint(),
        "--bucket",
        &bucket,
        "--key",
        &live_key,
    ];
    assert_eq!(live_stand_in(&k.endpoint(), &stream, &s3_dest), 300);
    let answer = post_json(
        &format!("{url}/storage/streams.json"),
        &serde_json::json!({
            "name": "streams",
            "config": {
                "type": "file",
                "enabled": true,
                "connection": format!("s3a://{bucket}"),
                "workspaces": {
                    "kinesis_archive": {
                        "location": "/live/kinesis_archive",
                        "writable": false,
                        "defaultInputFormat": "parquet"
                    }
                },
                "formats": { "parquet": { "type": "parquet" } }
            }
        }),
    );
    assert!(answer.contains("uccess"), "{answer}");

    let view = format!("archive.views.`{stream}`");
    let s = q(&stream);
    let check = |when: &str| {
        let drill = ids(&drill_rows(
            &url,
            &format!("SELECT shard_id, sequence_number, subsequence_number FROM {view}"),
        ));
        let ours = ids(&ws.sql(&format!(
            "SELECT shard_id, sequence_number, subsequence_number FROM {s}"
        )));
        assert_eq!(ours.len(), 300, "{when}: fluxcap sql's S");
        assert!(ours.values().all(|n| *n == 1), "{when}: S has duplicates");
        assert_eq!(drill.len(), 300, "{when}: Drill's view");
        let twice: Vec<_> = drill.iter().filter(|(_, n)| **n != 1).collect();
        assert!(
            twice.is_empty(),
            "{when}: records more than once in the view: {twice:?}"
        );
        assert_eq!(drill, ours, "{when}: the view and S differ");
        let drill_hours = per_hour(&drill_rows(
            &url,
            &format!("SELECT dt, hr, COUNT(*) AS n FROM {view} GROUP BY dt, hr"),
        ));
        let our_hours = per_hour(&ws.sql(&format!(
            "SELECT dt, hr, count(*) AS n FROM {s} GROUP BY dt, hr"
        )));
        assert_eq!(drill_hours, our_hours, "{when}: records per hour");
    };
    check("200 archived, 100 live");

    // The archiver commits between queries: all 300 archived now.
    ws.ok(&["archive", "--once"]);
    check("300 archived");

    // Drill reads the positions table: each shard's last archived record.
    let positions = drill_rows(
        &url,
        &format!(
            "SELECT shard_id, sequence_number, finished FROM archive.archive.`fluxcap-positions/{stream}`"
        ),
    );
    assert_eq!(positions.len(), 2, "{positions:?}");
    for p in &positions {
        let shard = p["shard_id"].as_str().unwrap();
        let last = ws.sql(&format!(
            "SELECT sequence_number FROM archive.{s} WHERE shard_id = '{shard}' \
             ORDER BY length(sequence_number) DESC, sequence_number DESC LIMIT 1"
        ));
        assert_eq!(p["sequence_number"], last[0]["sequence_number"], "{shard}");
    }

    // What `catalog drill --views` prints runs in Drill as it is, and answers the same.
    let out = ws.ok(&["catalog", "drill", "--views", "--stream", &stream]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let statements: Vec<String> = text
        .split(";\n\n")
        .map(|s| {
            s.lines()
                .filter(|l| !l.starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_string()
        })
        .filter(|s| !s.trim().is_empty())
        .collect();
    assert_eq!(statements.len(), 1, "{text}");
    assert!(
        statements[0].starts_with("CREATE OR REPLACE VIEW"),
        "{text}"
    );
    drill_rows(&url, &statements[0]);
    rt.block_on(put_records(&c, &stream, &orders(50, 13)));
    assert_eq!(live_stand_in(&k.endpoint(), &stream, &s3_dest), 350);
    let drill = ids(&drill_rows(
        &url,
        &format!("SELECT shard_id, sequence_number, subsequence_number FROM {view}"),
    ));
    let ours = ids(&ws.sql(&format!(
        "SELECT shard_id, sequence_number, subsequence_number FROM {s}"
    )));
    assert_eq!(ours.len(), 350);
    assert_eq!(drill, ours, "the printed view and S differ");
}
