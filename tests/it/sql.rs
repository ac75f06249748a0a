//! `fluxcap sql` end to end: the unified view over archive and live records
//! (also while an archiver commits), JSON and binary payloads, pruning seen in
//! the physical plan, read-only enforcement and error messages, and DuckDB as
//! an independent oracle over the same files.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;

use crate::harness::*;

const H: i64 = 3_600_000;
/// 2026-11-20T22:00:00Z
const T0: i64 = 1_795_212_000_000;

fn b64(v: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

/// Every record of table `t` (identity and payload) equals what was put, exactly once.
fn assert_table_holds(ws: &Workspace, t: &str, puts: &[Put], what: &str) {
    let all = ws.sql(&format!(
        "SELECT shard_id, sequence_number, subsequence_number, data FROM {t}"
    ));
    assert_same(&puts_multiset(puts), &rows_multiset(&all), what);
}

fn rows_multiset(rows: &[serde_json::Value]) -> BTreeMap<(String, String, i64, Vec<u8>), usize> {
    multiset(rows.iter().map(|r| {
        (
            r["shard_id"].as_str().unwrap().to_string(),
            r["sequence_number"].as_str().unwrap().to_string(),
            r["subsequence_number"].as_i64().unwrap(),
            b64(&r["data"]),
        )
    }))
}

#[test]
fn unified_view_is_archive_plus_live_exactly_once() {
    let k = kinesis();
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let orders_s = unique("orders");
    let blobs_s = unique("blobs");
    let blobs: Vec<(String, Vec<u8>)> = (0..60u32)
        .map(|i| {
            let len = (i as usize * 37) % 300;
            (
                format!("dev-{}", i % 5),
                (0..len).map(|j| (j as u32 * 7 + i) as u8).collect(),
            )
        })
        .collect();
    let (mut puts, blob_puts) = rt.block_on(async {
        create_stream(&c, &orders_s, 3).await;
        create_stream(&c, &blobs_s, 1).await;
        let mut first = orders(200, 1);
        first.push(("odd".into(), vec![0, 159, 146, 150, 255]));
        (
            put_records(&c, &orders_s, &first).await,
            put_records(&c, &blobs_s, &blobs).await,
        )
    });
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "",
        &[(&orders_s, "json"), (&blobs_s, "binary")],
    );
    ws.ok(&["archive", "--once"]);
    let archived = puts.len() as i64;
    // More records after the archive run: only in the stream.
    let later = rt.block_on(put_records(&c, &orders_s, &orders(150, 2)));
    puts.extend(later);
    let t = q(&orders_s);

    assert_table_holds(&ws, &t, &puts, "unified view");
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{t}")),
        archived
    );
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) AS n FROM live.{t}")),
        150
    );

    // A lower time bound on the live side (read from AT_TIMESTAMP when that
    // skips records) keeps exactly the records at or after it.
    let first_live = ws.sql(&format!(
        "SELECT min(CAST(approximate_arrival_timestamp AS BIGINT)) AS m FROM live.{t}"
    ))[0]["m"]
        .as_i64()
        .unwrap();
    let iso = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    assert_eq!(
        ws.sql_count(&format!(
            "SELECT count(*) AS n FROM live.{t} WHERE approximate_arrival_timestamp >= '{}'",
            iso(first_live)
        )),
        150
    );
    assert_eq!(
        ws.sql_count(&format!(
            "SELECT count(*) AS n FROM {t} WHERE approximate_arrival_timestamp > '{}'",
            iso(chrono::Utc::now().timestamp_millis() + 3_600_000)
        )),
        0
    );

    // Live rows carry dt/hr derived from their arrival time, like the archive.
    for r in ws.sql(&format!(
        "SELECT dt, hr, CAST(approximate_arrival_timestamp AS BIGINT) AS ms FROM live.{t}"
    )) {
        let (dt, hr) = fluxcap::archive::layout::partition_of(r["ms"].as_i64().unwrap());
        assert_eq!(
            (r["dt"].as_str().unwrap(), r["hr"].as_str().unwrap()),
            (&*dt, &*hr)
        );
    }

    // JSON functions straight on the binary payload, over archive and live.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut customer3 = 0;
    for p in &puts {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.data) {
            *expected
                .entry(v["type"].as_str().unwrap().to_string())
                .or_default() += 1;
            customer3 += i64::from(v["customer"] == "customer-3");
        }
    }
    let got: BTreeMap<String, i64> = ws
        .sql(&format!(
            "SELECT json_get_str(data, 'type') AS t, count(*) AS n FROM {t} \
             WHERE json_get_str(data, 'type') IS NOT NULL GROUP BY 1"
        ))
        .iter()
        .map(|r| {
            (
                r["t"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        ws.sql_count(&format!(
            "SELECT count(*) AS n FROM {t} WHERE data->>'customer' = 'customer-3'"
        )),
        customer3
    );
    // The payload that is not UTF-8 gives NULL, not an error; text() shows it lossily.
    let odd = ws.sql(&format!(
        "SELECT json_get_str(data, 'type') AS t, text(data) AS s FROM {t} WHERE partition_key = 'odd'"
    ));
    assert_eq!(odd.len(), 1);
    assert!(odd[0]["t"].is_null());
    assert!(odd[0]["s"].as_str().unwrap().contains('\u{fffd}'));
    let one = ws.sql(&format!(
        "SELECT text(data) AS s, data FROM {t} WHERE partition_key = 'customer-5' LIMIT 1"
    ));
    assert_eq!(
        one[0]["s"].as_str().unwrap().as_bytes(),
        b64(&one[0]["data"])
    );

    // A binary stream queried by payload length and partition key.
    let b = q(&blobs_s);
    let got: BTreeMap<String, (i64, i64)> = ws
        .sql(&format!(
            "SELECT partition_key, count(*) AS n, sum(octet_length(data)) AS bytes FROM {b} \
             WHERE octet_length(data) > 100 GROUP BY partition_key"
        ))
        .iter()
        .map(|r| {
            (
                r["partition_key"].as_str().unwrap().to_string(),
                (r["n"].as_i64().unwrap(), r["bytes"].as_i64().unwrap()),
            )
        })
        .collect();
    let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for p in blob_puts.iter().filter(|p| p.data.len() > 100) {
        let e = want.entry(p.partition_key.clone()).or_default();
        e.0 += 1;
        e.1 += p.data.len() as i64;
    }
    assert_eq!(got, want);
}

#[test]
fn queries_during_archiving_never_double_count() {
    let k = kinesis();
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let stream = unique("busy");
    let mut total = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(300, 1)).await.len() as i64
    });
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archive.flush]\nmax_age = \"300ms\"\n[archiver]\npoll_interval = \"100ms\"\nmetrics_bind = \"\"",
        &[(&stream, "json")],
    );
    let mut archiver = ws.spawn_archiver();
    let t = q(&stream);
    let mut archived_seen = BTreeSet::new();
    for round in 0..25u64 {
        // Every put has completed before the query starts, so the unified view
        // must hold exactly `total` distinct records.
        let rows = ws.sql(&format!(
            "SELECT count(*) AS n, count(DISTINCT concat(shard_id, '/', sequence_number, '/', \
             CAST(subsequence_number AS VARCHAR))) AS d FROM {t}"
        ));
        let (n, d) = (
            rows[0]["n"].as_i64().unwrap(),
            rows[0]["d"].as_i64().unwrap(),
        );
        assert_eq!((n, d), (total, total), "round {round}");
        archived_seen.insert(ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{t}")));
        if archived_seen.len() >= 4 && round >= 5 {
            break;
        }
        total += rt
            .block_on(put_records(&c, &stream, &orders(40, round + 2)))
            .len() as i64;
    }
    let _ = archiver.kill();
    let _ = archiver.wait();
    // The archive grew while the queries ran (so both sides were exercised).
    assert!(
        archived_seen.len() >= 3,
        "archive counts seen: {archived_seen:?}"
    );
}

/// Hour partitions named in a physical plan.
fn hours_in_plan(ws: &Workspace, sql: &str) -> BTreeSet<String> {
    let plan = physical_plan(ws, sql);
    assert!(!plan.contains("..."), "plan lists are truncated: {plan}");
    let mut out = BTreeSet::new();
    let mut rest = plan.as_str();
    while let Some(i) = rest.find("dt=") {
        out.insert(rest[i..i + 19].to_string());
        rest = &rest[i + 19..];
    }
    out
}

#[test]
fn pruning_by_time_and_partition_and_uncommitted_files() {
    // No Kinesis needed for archive.* queries: the endpoint is never called.
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("ev", "json")]);
    let hours: Vec<i64> = (0..6).map(|i| T0 + i * H).collect(); // 20T22 .. 21T03
    let recs = ingest_hours(&ws.archive, "ev", 2, &hours, 10);
    assert_eq!(
        ws.sql_count("SELECT count(*) AS n FROM archive.ev"),
        recs.len() as i64
    );

    // A file of a flush that never committed (it starts after the checkpoint)
    // is not part of the archive.
    let dir = ws.archive.join("ev/dt=2026-11-20/hr=23");
    let committed = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(
        &committed,
        dir.join(format!(
            "shardId-000000000000_4960009{:049}_0_10.parquet",
            0
        )),
    )
    .unwrap();
    assert_eq!(
        ws.sql_count("SELECT count(*) AS n FROM archive.ev"),
        recs.len() as i64
    );

    let one_hour = "approximate_arrival_timestamp >= '2026-11-21T01:00:00Z' \
                    AND approximate_arrival_timestamp < '2026-11-21T02:00:00Z'";
    assert_eq!(
        hours_in_plan(
            &ws,
            &format!("SELECT count(*) FROM archive.ev WHERE {one_hour}")
        ),
        BTreeSet::from(["dt=2026-11-21/hr=01".to_string()])
    );
    assert_eq!(
        ws.sql_count(&format!(
            "SELECT count(*) AS n FROM archive.ev WHERE {one_hour}"
        )),
        20
    );
    // Across midnight, with BETWEEN.
    let across =
        "approximate_arrival_timestamp BETWEEN '2026-11-20T23:30:00Z' AND '2026-11-21T00:29:59Z'";
    assert_eq!(
        hours_in_plan(&ws, &format!("SELECT * FROM archive.ev WHERE {across}")),
        BTreeSet::from([
            "dt=2026-11-20/hr=23".to_string(),
            "dt=2026-11-21/hr=00".to_string()
        ])
    );
    let want = recs
        .iter()
        .filter(|r| r.arrival_ms >= T0 + H + H / 2 && r.arrival_ms < T0 + 2 * H + H / 2)
        .count() as i64;
    assert_eq!(
        ws.sql_count(&format!(
            "SELECT count(*) AS n FROM archive.ev WHERE {across}"
        )),
        want
    );
    // Predicates on the partition columns themselves.
    assert_eq!(
        hours_in_plan(
            &ws,
            "SELECT * FROM archive.ev WHERE dt = '2026-11-21' AND hr IN ('02', '03')"
        ),
        BTreeSet::from([
            "dt=2026-11-21/hr=02".to_string(),
            "dt=2026-11-21/hr=03".to_string()
        ])
    );
    assert_eq!(
        ws.sql_count("SELECT count(*) AS n FROM archive.ev WHERE dt = '2026-11-20'"),
        40
    );
}

#[test]
fn read_only_errors_and_output_files() {
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("ev", "json")]);
    let recs = ingest_hours(&ws.archive, "ev", 1, &[T0, T0 + H], 20);
    let fail = |args: &[&str], code: i32, needle: &str| {
        let out = ws.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
    };
    let target = ws.dir.path().join("copy.parquet");
    for sql in [
        "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/tmp'".to_string(),
        format!("COPY (SELECT * FROM archive.ev) TO '{}'", target.display()),
        "INSERT INTO archive.ev SELECT * FROM archive.ev".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
        "DROP TABLE archive.ev".to_string(),
    ] {
        fail(&["sql", &sql], 2, "read-only");
    }
    assert!(!target.exists(), "COPY must not write");
    fail(&["sql", "SELEC 1"], 2, "Line: 1, Column");
    fail(
        &["sql", "SELECT * FROM nope"],
        2,
        "available tables: archive.ev, live.ev, ev",
    );
    fail(&["sql", "--format", "parquet", "SELECT 1"], 2, "-o FILE");

    // Results to files: Parquet read back by pyarrow, CSV with a header.
    let pq = ws.dir.path().join("out.parquet");
    let out = ws.ok(&[
        "sql",
        "-o",
        pq.to_str().unwrap(),
        "SELECT partition_key, data FROM archive.ev",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{} rows in", recs.len())));
    let check = std::process::Command::new(python())
        .args([
            "-c",
            "import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); \
             print(t.num_rows, t.schema.field('data').type)",
            pq.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&check.stdout).trim(),
        format!("{} binary", recs.len()),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let csv = ws.dir.path().join("out.csv");
    ws.ok(&[
        "sql",
        "-o",
        csv.to_str().unwrap(),
        "SELECT dt, hr, count(*) AS n FROM archive.ev GROUP BY dt, hr ORDER BY hr",
    ]);
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        "dt,hr,n\n2026-11-20,22,20\n2026-11-20,23,20\n"
    );
    // Statements from a file, and the aligned table.
    let f = ws.dir.path().join("q.sql");
    write_file(
        &f,
        "SELECT count(*) AS n FROM archive.ev;\nSELECT 'x' AS y;\n",
    );
    let out = ws.ok(&["sql", "--format", "table", "-f", f.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("| n  |") && text.contains("| 40 |") && text.contains("| y |"),
        "{text}"
    );

    // A corrupt data file is named in the error.
    let dir = ws.archive.join("ev/dt=2026-11-20/hr=23");
    let victim = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let len = std::fs::metadata(&victim).unwrap().len() as usize;
    std::fs::write(&victim, vec![b'x'; len]).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    fail(
        &["sql", "SELECT sum(octet_length(data)) FROM archive.ev"],
        1,
        &name,
    );
}

/// Rows as canonical strings (numbers rounded), sorted, for comparing engines.
fn canonical(rows: &[serde_json::Value]) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| {
            r.as_object()
                .unwrap()
                .values()
                .map(|v| match v {
                    serde_json::Value::Number(n) => format!("{:.4}", n.as_f64().unwrap()),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    out.sort();
    out
}

#[test]
fn same_answers_as_duckdb() {
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("ev", "json")]);
    let hours: Vec<i64> = (0..4).map(|i| T0 + i * H).collect();
    ingest_hours(&ws.archive, "ev", 3, &hours, 50);
    let dir = ws.archive.join("ev");
    let last_per_key = "SELECT partition_key, data FROM (SELECT partition_key, data, row_number() OVER \
         (PARTITION BY partition_key ORDER BY approximate_arrival_timestamp DESC, shard_id DESC, \
         sequence_number DESC) AS rn FROM {T}) WHERE rn = 1";
    let pairs: Vec<(String, String)> = vec![
        (
            "SELECT dt, hr, count(*) AS n FROM {T} GROUP BY dt, hr".into(),
            "SELECT dt, hr, count(*) AS n FROM t GROUP BY dt, hr".into(),
        ),
        (
            "SELECT json_get_str(data, 'type') AS ty, count(*) AS n, sum(json_get_float(data, 'amount')) AS total FROM {T} GROUP BY 1".into(),
            "SELECT json_extract_string(decode(data), '$.type') AS ty, count(*) AS n, sum(CAST(json_extract(decode(data), '$.amount') AS DOUBLE)) AS total FROM t GROUP BY 1".into(),
        ),
        (
            "SELECT sequence_number, data FROM {T} WHERE partition_key = 'customer-7' AND dt = '2026-11-21'".into(),
            "SELECT sequence_number, data FROM t WHERE partition_key = 'customer-7' AND dt = '2026-11-21'".into(),
        ),
        (last_per_key.into(), last_per_key.replace("{T}", "t")),
        (
            "SELECT count(*) AS n FROM {T} WHERE json_get_float(data, 'amount') > 250 AND data->>'type' = 'paid'".into(),
            "SELECT count(*) AS n FROM t WHERE CAST(json_extract(decode(data), '$.amount') AS DOUBLE) > 250 AND json_extract_string(decode(data), '$.type') = 'paid'".into(),
        ),
        (
            "SELECT shard_id, sum(octet_length(data)) AS bytes, min(CAST(approximate_arrival_timestamp AS BIGINT)) AS first FROM {T} GROUP BY shard_id".into(),
            "SELECT shard_id, sum(octet_length(data)) AS bytes, min(epoch_ms(approximate_arrival_timestamp)) AS first FROM t GROUP BY shard_id".into(),
        ),
    ];
    for (ours, theirs) in pairs {
        let ours = ours.replace("{T}", "archive.ev");
        let a = canonical(&ws.sql(&ours));
        let b = canonical(&duckdb(&dir, &theirs));
        assert!(!a.is_empty(), "{ours}: no rows");
        assert_eq!(a, b, "fluxcap and DuckDB differ on {ours}");
    }
}

/// Several JSON getters in a filter and its aggregate parse each payload
/// once: the physical plan calls one function on `data` (`json_multi`), and
/// the rows are DuckDB's and those of the unfused plan
/// (`FLUXCAP_JSON_FUSION=off`).
#[test]
fn json_getters_share_one_parse_per_row() {
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("ev", "json")]);
    let hours: Vec<i64> = (0..2).map(|i| T0 + i * H).collect();
    ingest_hours(&ws.archive, "ev", 2, &hours, 60);
    let ours = "SELECT json_get_str(data, 'type') AS ty, count(*) AS n, \
                sum(json_get_int(data, 'items', 0, 'qty')) AS q FROM archive.ev \
                WHERE json_get_float(data, 'amount') > 100 AND data->>'customer' <> 'customer-3' \
                GROUP BY 1";
    let theirs = "SELECT json_extract_string(decode(data), '$.type') AS ty, count(*) AS n, \
                  sum(CAST(json_extract(decode(data), '$.items[0].qty') AS BIGINT)) AS q FROM t \
                  WHERE CAST(json_extract(decode(data), '$.amount') AS DOUBLE) > 100 \
                  AND json_extract_string(decode(data), '$.customer') <> 'customer-3' GROUP BY 1";
    let fused = canonical(&ws.sql(ours));
    assert!(fused.len() > 1, "{fused:?}");
    assert_eq!(fused, canonical(&duckdb(&ws.archive.join("ev"), theirs)));
    let unfused = |sql: &str| {
        let out = ws
            .cmd()
            .env("FLUXCAP_JSON_FUSION", "off")
            .args(["sql", "--format", "json", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_json_lines(&out.stdout)
    };
    assert_eq!(fused, canonical(&unfused(ours)));
    let physical = |rows: Vec<serde_json::Value>| -> String {
        rows.iter()
            .filter(|r| r["plan_type"] == "physical_plan")
            .map(|r| r["plan"].as_str().unwrap().to_string())
            .collect()
    };
    let plan = physical(ws.sql(&format!("EXPLAIN {ours}")));
    assert_eq!(plan.matches("(data@").count(), 1, "{plan}");
    assert_eq!(plan.matches("json_multi(data@").count(), 1, "{plan}");
    let plan = physical(unfused(&format!("EXPLAIN {ours}")));
    assert!(plan.matches("(data@").count() >= 2, "{plan}");
    assert!(!plan.contains("json_multi"), "{plan}");
}

#[test]
fn sql_over_an_s3_archive() {
    let k = kinesis();
    let s3 = s3();
    let stream = unique("s3sql");
    let bucket = unique("bkt");
    create_bucket(&s3, &bucket);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        put_records(&c, &stream, &orders(120, 4)).await
    });
    let ws = Workspace::new(
        &k.endpoint(),
        Some(&format!("s3://{bucket}/archive/v1")),
        Some(&s3.endpoint()),
        "",
        &[(&stream, "json")],
    );
    ws.ok(&["archive", "--once"]);
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(30, 5))));
    let t = q(&stream);
    assert_table_holds(&ws, &t, &puts, "unified view on S3");
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) AS n FROM archive.{t}")),
        120
    );
    // A time filter in the past opens no archive file at all.
    let plan = hours_in_plan(
        &ws,
        &format!(
            "SELECT * FROM archive.{t} WHERE approximate_arrival_timestamp < '2001-01-01T00:00:00Z'"
        ),
    );
    assert!(plan.is_empty(), "{plan:?}");
}

#[test]
fn interactive_prompt_runs_multi_line_statements_and_keeps_history() {
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("ev", "json")]);
    ingest_hours(&ws.archive, "ev", 1, &[T0], 25);
    let steps = serde_json::json!([
        ["expect", "fluxcap> "],
        ["send", "SELECT count(*)\r"],
        ["expect", "      -> "],
        ["send", "  AS n FROM archive.ev;\r"],
        ["expect", "| 25 |"],
        ["expect", "fluxcap> "],
        ["send", "SELECT * FROM nope;\r"],
        ["expect", "available tables: archive.ev"],
        ["expect", "fluxcap> "],
        ["send", "\\q\r"],
    ]);
    let cmd = ws.cmd();
    let mut c = std::process::Command::new(python());
    c.arg(root().join("scripts/py/pty_session.py"))
        .arg(steps.to_string())
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .arg("sql")
        .current_dir(ws.dir.path())
        .env("HOME", ws.dir.path())
        .env_remove("XDG_STATE_HOME");
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history =
        std::fs::read_to_string(ws.dir.path().join(".local/state/fluxcap/sql_history")).unwrap();
    assert!(history.contains("AS n FROM archive.ev;"), "{history}");
}

#[test]
fn unified_view_across_a_split() {
    let k = kinesis();
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let stream = unique("split");
    let mut puts = rt.block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(80, 1)).await
    });
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    ws.ok(&["archive", "--once"]);
    // Records after the archive run, then a split, then records on the children.
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(30, 2))));
    rt.block_on(split_first_shard(&c, &stream));
    puts.extend(rt.block_on(put_records(&c, &stream, &orders(60, 3))));
    let t = q(&stream);
    assert_table_holds(&ws, &t, &puts, "across a split");
    let shards: BTreeSet<String> = ws
        .sql(&format!("SELECT DISTINCT shard_id FROM live.{t}"))
        .iter()
        .map(|r| r["shard_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        shards.len(),
        3,
        "parent remainder and both children: {shards:?}"
    );
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) AS n FROM live.{t}")),
        90
    );
}
