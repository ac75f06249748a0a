//! `fluxcap catalog`: the generated Hive DDL runs in a real Spark with Hive
//! support over an archive written by the archiver, and Spark's reader,
//! Hive's own Parquet reader, DuckDB and `fluxcap sql` give the same answers.

use std::process::Command;

use crate::harness::*;

/// JSON-lines rows as text cells, in the order of the compared query's columns.
fn rows_of(rows: &[serde_json::Value]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            ["dt", "hr", "shard_id", "n", "bytes", "first_ms", "pk"]
                .iter()
                .map(|c| r[*c].to_string().trim_matches('"').to_string())
                .collect()
        })
        .collect()
}

#[test]
fn hive_ddl_reads_the_archive_in_spark_and_hive_readers() {
    let k = ferrokinesis(false);
    let stream = unique("cat");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(300, 5)).await;
    });
    ws.ok(&["archive", "--once"]);
    let ddl = ws.ok(&["catalog", "hive", "--stream", &stream, "--database", "arch"]);
    let ddl_text = String::from_utf8(ddl.stdout).unwrap();
    assert!(ddl_text.contains("approximate_arrival_timestamp BIGINT"));
    // Partitions are added in batches, several per ALTER TABLE statement.
    assert!(
        ddl_text.contains("ADD IF NOT EXISTS\n  PARTITION (dt="),
        "{ddl_text}"
    );
    assert_eq!(ddl_text.matches("ALTER TABLE").count(), 1, "{ddl_text}");
    let ddl_file = ws.dir.path().join("hive.sql");
    std::fs::write(&ddl_file, &ddl_text).unwrap();
    let table = format!("arch.{}", fluxcap::cluster::catalog::table_name(&stream));
    let query = format!(
        "SELECT dt, hr, shard_id, count(*) AS n, sum(length(data)) AS bytes, \
         min(approximate_arrival_timestamp) AS first_ms, max(partition_key) AS pk \
         FROM {table} GROUP BY dt, hr, shard_id ORDER BY dt, hr, shard_id"
    );
    let out = Command::new(python())
        .arg(root().join("scripts/py/spark_hive.py"))
        .arg(&ddl_file)
        .arg(&query)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let norm = |rows: &serde_json::Value| -> Vec<Vec<String>> {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .collect()
            })
            .collect()
    };
    let spark = norm(&v["spark"][0]);
    let hive = norm(&v["hive"][0]);
    assert!(!spark.is_empty());
    assert_eq!(spark, hive, "Spark's and Hive's Parquet readers differ");

    // fluxcap sql over the same archive.
    let ours = ws.sql(&format!(
        "SELECT dt, hr, shard_id, count(*) AS n, sum(octet_length(data)) AS bytes, \
         min(CAST(approximate_arrival_timestamp AS BIGINT)) AS first_ms, max(partition_key) AS pk \
         FROM archive.{} GROUP BY dt, hr, shard_id ORDER BY dt, hr, shard_id",
        q(&stream)
    ));
    let ours = rows_of(&ours);
    assert_eq!(spark, ours, "Spark and fluxcap sql differ");
    let total: i64 = ours.iter().map(|r| r[3].parse::<i64>().unwrap()).sum();
    assert_eq!(total, 300);

    // DuckDB agrees as well.
    let duck = duckdb(
        &ws.archive.join(&stream),
        "SELECT dt, hr, shard_id, count(*) AS n, sum(octet_length(data)) AS bytes, \
         min(epoch_ms(approximate_arrival_timestamp)) AS first_ms, max(partition_key) AS pk \
         FROM t GROUP BY dt, hr, shard_id ORDER BY dt, hr, shard_id",
    );
    let duck = rows_of(&duck);
    assert_eq!(duck, ours, "DuckDB and fluxcap sql differ");

    // The archived files follow Drill's Parquet type rules (checked from the
    // files' metadata; the checker itself rejects a file that breaks them).
    let check = |dir: &std::path::Path| {
        Command::new(python())
            .arg(root().join("scripts/py/drill_types.py"))
            .arg(dir)
            .output()
            .unwrap()
    };
    let o = check(&ws.archive);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let bad_dir = ws.dir.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let mk = Command::new(python())
        .args([
            "-c",
            &format!(
                "import pyarrow as pa, pyarrow.parquet as pq\n\
                 t = pa.table({{'shard_id': ['a'], 'sequence_number': ['1'], 'subsequence_number': pa.array([0], pa.uint64()), \
                 'partition_key': ['k'], 'explicit_hash_key': [None], \
                 'approximate_arrival_timestamp': pa.array([0], pa.timestamp('ns')), 'data': [b'x']}})\n\
                 pq.write_table(t, '{}/f.parquet', compression='snappy')",
                bad_dir.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let o = check(&bad_dir);
    assert!(!o.status.success());
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("subsequence_number") && report.contains("ZSTD"),
        "{report}"
    );

    // Athena DDL uses partition projection; the Drill plugin is valid JSON.
    let athena = String::from_utf8(ws.ok(&["catalog", "athena"]).stdout).unwrap();
    assert!(athena.contains("'projection.enabled'='true'"));
    assert!(athena.contains("approximate_arrival_timestamp TIMESTAMP"));
    assert!(!athena.contains("ADD IF NOT EXISTS"));
    // The projection starts at the archive's first day, not at a fixed date.
    let first_day = std::fs::read_dir(ws.archive.join(&stream))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("dt=")
                .map(str::to_string)
        })
        .min()
        .unwrap();
    assert!(
        athena.contains(&format!("'projection.dt.range'='{first_day},NOW'")),
        "{athena}"
    );
    assert!(athena.contains("one statement per query"), "{athena}");
    let drill: serde_json::Value =
        serde_json::from_slice(&ws.ok(&["catalog", "drill"]).stdout).unwrap();
    assert_eq!(drill["type"], "file");
    assert_eq!(
        drill["workspaces"]["archive"]["location"],
        ws.archive.display().to_string()
    );
}

/// `catalog hive --live` in a real Spark with Hive support: the positions
/// table and the view `<t>_all` as generated, with the live table (EMR's
/// storage handler, which Spark cannot load) stood in by a Parquet table of
/// its shape holding every record of the stream. The view gives each record
/// once, as `fluxcap sql`'s `S` does.
#[test]
fn hive_live_view_in_spark_is_the_archive_plus_the_unarchived_tail_once_each() {
    let k = ferrokinesis(false);
    let stream = unique("catlive");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(200, 21)).await;
    });
    ws.ok(&["archive", "--once"]);
    rt.block_on(put_records(&c, &stream, &orders(100, 22)));
    let t = fluxcap::cluster::catalog::table_name(&stream);
    let live_dir = ws.dir.path().join("live");
    let out_file = live_dir.join("part-0.parquet");
    let dest = ["--out", out_file.to_str().unwrap()];
    assert_eq!(live_stand_in(&k.endpoint(), &stream, &dest), 300);

    let ddl = ws.ok(&[
        "catalog",
        "hive",
        "--live",
        "--stream",
        &stream,
        "--database",
        "arch",
    ]);
    let ddl = String::from_utf8(ddl.stdout).unwrap();
    // The live table as generated (Spark refuses STORED BY), then its stand-in.
    let start = ddl
        .find(&format!("CREATE TABLE IF NOT EXISTS arch.{t}_live ("))
        .unwrap_or_else(|| panic!("no live table in {ddl}"));
    let end = start + ddl[start..].find(");\n").unwrap() + 3;
    let live_ddl = &ddl[start..end];
    assert!(
        live_ddl.contains(fluxcap::cluster::live::STORAGE_HANDLER),
        "{live_ddl}"
    );
    let stand_in = live_ddl.split("STORED BY").next().unwrap().replacen(
        "CREATE TABLE",
        "CREATE EXTERNAL TABLE",
        1,
    ) + &format!(
        "STORED AS PARQUET LOCATION 'file://{}/';\n",
        live_dir.display()
    );
    let ddl = format!("{}{}{}", &ddl[..start], stand_in, &ddl[end..]);
    let ddl_file = ws.dir.path().join("hive-live.sql");
    std::fs::write(&ddl_file, &ddl).unwrap();
    let out = Command::new(python())
        .arg(root().join("scripts/py/spark_hive.py"))
        .arg(&ddl_file)
        .arg(format!(
            "SELECT shard_id, sequence_number, subsequence_number, dt, hr FROM arch.{t}_all"
        ))
        .arg(format!(
            "SELECT shard_id, sequence_number, finished FROM arch.{t}_positions"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spark failed: {}\n{ddl}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut spark: Vec<String> = v["spark"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let r = r.as_array().unwrap();
            format!("{}|{}|{}|{}|{}", r[0], r[1], r[2], r[3], r[4]).replace('"', "")
        })
        .collect();
    spark.sort();
    let mut ours: Vec<String> = ws
        .sql(&format!(
            "SELECT shard_id, sequence_number, subsequence_number, dt, hr FROM {}",
            q(&stream)
        ))
        .iter()
        .map(|r| {
            format!(
                "{}|{}|{}|{}|{}",
                r["shard_id"], r["sequence_number"], r["subsequence_number"], r["dt"], r["hr"]
            )
            .replace('"', "")
        })
        .collect();
    ours.sort();
    assert_eq!(ours.len(), 300);
    let mut distinct = spark.clone();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        spark.len(),
        "records twice in the Hive view"
    );
    assert_eq!(spark, ours, "the Hive view and S differ");
    assert_eq!(v["spark"][1].as_array().map(Vec::len), Some(2), "{v}");
}
