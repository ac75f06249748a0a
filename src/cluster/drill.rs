//! `fluxcap replay --engine drill`: the replay's selection (bounds, filter,
//! compaction) as Drill SQL, run on the cluster as a CTAS into the `scratch`
//! workspace of the archive plugin (`fluxcap catalog drill`), so a large
//! result never travels through Drill's REST API; the replay then sends those
//! Parquet files (`--from-parquet`), in the same order as the local engine.
//!
//! ```text
//!   selection ─▶ marker <archive>/_fluxcap/drill-scratch/.fluxcap-scratch (Drill drops a missing workspace)
//!             ─▶ CREATE TABLE <plugin>.scratch.`replay_<id>` AS SELECT … FROM <plugin>.archive.`<stream>`
//!             ─▶ POST <drill-url>/query.json (queryState must be COMPLETED; verbose errors asked per query)
//!             ─▶ <archive>/_fluxcap/drill-scratch/replay_<id>/*.parquet
//!             ─▶ replay --from-parquet (same order, annotation, pacing, resume)
//!             ─▶ done: the scratch table is deleted; failed: kept (to inspect, and to resume) and listed
//! ```
//!
//! Drill reads the archive's files only, so records not archived yet are not
//! replayed; `--where`, `--key` and `--tombstone` are Drill SQL here. Drill
//! skips files and directories whose names start with `_` or `.`, so the
//! staged files of an uncommitted flush (under `<stream>/_fluxcap/`) are never
//! read. `--dry-run` runs only a `SELECT COUNT(*)` of the selection.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::archive::store::Archive;
use crate::config::ArchiveLocation;
use crate::error::{Error, Result};
use crate::replay::state::Selection;

/// Drill's option that puts the error message in a failed query's answer
/// (without it Drill answers HTTP 200, `queryState: FAILED` and no message).
pub const VERBOSE_ERRORS: &str = "drill.exec.http.rest.errors.verbose";

fn drill_err(url: &str, m: impl Into<String>) -> Error {
    Error::Drill {
        url: url.to_string(),
        message: m.into(),
    }
}

/// A Drill identifier (back-quoted).
fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn ts(ms: i64) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
    format!("TIMESTAMP '{}'", t.format("%Y-%m-%d %H:%M:%S%.3f"))
}

/// `dir0` holds `dt=YYYY-MM-DD`: bounds on it let Drill prune whole days.
fn day(ms: i64) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
    lit(&format!("dt={}", t.format("%Y-%m-%d")))
}

fn seq_cmp(op: &str, seq: &str) -> String {
    let strict = if op == ">=" { ">" } else { "<" };
    let n = seq.len();
    format!(
        "(CHAR_LENGTH(sequence_number) {strict} {n} OR (CHAR_LENGTH(sequence_number) = {n} AND sequence_number {op} {}))",
        lit(seq)
    )
}

const COLUMNS: &str = "shard_id, sequence_number, subsequence_number, partition_key, explicit_hash_key, approximate_arrival_timestamp, data";

/// A shard's lineage depth (parents before children) as a Drill expression:
/// the first part of the local engine's position.
fn depth_expr(depth: &BTreeMap<String, u32>) -> String {
    if depth.values().all(|d| *d == 0) {
        return "0".into();
    }
    let mut e = "CASE shard_id".to_string();
    for (shard, d) in depth.iter().filter(|(_, d)| **d > 0) {
        e.push_str(&format!(" WHEN {} THEN {d}", lit(shard)));
    }
    e.push_str(" ELSE 0 END");
    e
}

/// The selection of `stream` as a Drill `SELECT` (unordered: the replay
/// orders the result by position). Compaction keeps each key's last record
/// by position (lineage depth, shard, sequence, sub-sequence — not arrival
/// time), drops keys whose last record is a tombstone unless the replay
/// emits tombstones, and leaves records whose key is NULL uncompacted;
/// `--where` filters the result — as the local engine does
/// ([`crate::replay::select`]). Unlike the local engine, Drill does not tell
/// replayed copies (records carrying a replay annotation) from originals.
pub fn selection_sql(
    plugin: &str,
    stream: &str,
    sel: &Selection,
    depth: &BTreeMap<String, u32>,
) -> String {
    let mut conds = vec!["TRUE".to_string()];
    if let Some(t) = sel.since_ms {
        conds.push(format!("dir0 >= {}", day(t)));
        conds.push(format!("approximate_arrival_timestamp >= {}", ts(t)));
    }
    if let Some(t) = sel.until_ms {
        conds.push(format!("dir0 <= {}", day(t)));
        conds.push(format!("approximate_arrival_timestamp < {}", ts(t)));
    }
    for (shard, seq) in &sel.from_sequence {
        conds.push(format!(
            "(shard_id <> {} OR {})",
            lit(shard),
            seq_cmp(">=", seq)
        ));
    }
    for (shard, seq) in &sel.to_sequence {
        conds.push(format!(
            "(shard_id <> {} OR {})",
            lit(shard),
            seq_cmp("<=", seq)
        ));
    }
    let conds = conds.join(" AND ");
    let source = format!("{}.archive.{}", ident(plugin), ident(stream));
    let predicate = sel
        .predicate
        .as_deref()
        .map(|p| format!("({p})"))
        .unwrap_or_else(|| "TRUE".into());
    if !sel.compact {
        return format!("SELECT {COLUMNS} FROM {source} WHERE {conds} AND {predicate}");
    }
    let key = sel
        .key
        .as_deref()
        .map(|k| format!("({k})"))
        .unwrap_or_else(|| "partition_key".into());
    let tomb = sel
        .tombstone
        .as_deref()
        .map(|t| format!("COALESCE(({t}), FALSE)"))
        .unwrap_or_else(|| "FALSE".into());
    // Tombstones are sent (the key's last record) when the replay emits them.
    let (deleted, deleted_raw) = if sel.emit_tombstones {
        ("FALSE".to_string(), "FALSE".to_string())
    } else {
        ("__tomb".to_string(), tomb.clone())
    };
    let depth = depth_expr(depth);
    let mut parts = vec![format!(
        "SELECT {COLUMNS} FROM (\
           SELECT {COLUMNS}, __tomb, ROW_NUMBER() OVER (PARTITION BY __key ORDER BY \
             __depth DESC, shard_id DESC, CHAR_LENGTH(sequence_number) DESC, \
             sequence_number DESC, subsequence_number DESC) AS __rn \
           FROM (\
             SELECT {COLUMNS}, {key} AS __key, {tomb} AS __tomb, {depth} AS __depth \
             FROM {source} WHERE {conds}\
           ) AS s WHERE __key IS NOT NULL\
         ) AS r WHERE __rn = 1 AND NOT {deleted}"
    )];
    if sel.key.is_some() {
        // Records without a key are not compacted.
        parts.push(format!(
            "SELECT {COLUMNS} FROM {source} WHERE {conds} AND ({key}) IS NULL AND NOT {deleted_raw}"
        ));
    }
    format!(
        "SELECT {COLUMNS} FROM ({}) AS c WHERE {predicate}",
        parts.join(" UNION ALL ")
    )
}

/// The CTAS that materialises the selection of `stream` as `table` in the
/// plugin's scratch workspace.
pub fn replay_sql(
    plugin: &str,
    stream: &str,
    table: &str,
    sel: &Selection,
    depth: &BTreeMap<String, u32>,
) -> String {
    format!(
        "CREATE TABLE {}.scratch.{} AS {}",
        ident(plugin),
        ident(table),
        selection_sql(plugin, stream, sel, depth)
    )
}

/// The count a `--dry-run` asks Drill for (no CTAS, nothing written).
pub fn count_sql(
    plugin: &str,
    stream: &str,
    sel: &Selection,
    depth: &BTreeMap<String, u32>,
) -> String {
    format!(
        "SELECT COUNT(*) AS n FROM ({}) AS q",
        selection_sql(plugin, stream, sel, depth)
    )
}

/// The body of Drill's `POST /query.json`: the query, and the option that
/// makes a failed query's answer carry Drill's message.
pub fn query_body(sql: &str) -> String {
    serde_json::json!({
        "queryType": "SQL",
        "query": sql,
        "options": {
            VERBOSE_ERRORS: "true",
            // Drill 1.22's asynchronous Parquet page reader fails
            // intermittently through S3A ("Stream is closed!").
            "store.parquet.reader.pagereader.async": "false"
        }
    })
    .to_string()
}

/// Drill's answer to `/query.json`: its rows when `queryState` is
/// `COMPLETED`, else an error with Drill's own message.
pub fn answer(url: &str, status: u16, body: &[u8]) -> Result<Vec<serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
        drill_err(
            url,
            format!("HTTP {status}, not a query answer ({e}): {text}"),
        )
    })?;
    let state = v.get("queryState").and_then(|s| s.as_str());
    if status == 200 && state == Some("COMPLETED") {
        return Ok(v["rows"].as_array().cloned().unwrap_or_default());
    }
    let message = v
        .get("errorMessage")
        .and_then(|m| m.as_str())
        .map(|m| m.lines().next().unwrap_or(m).trim().to_string())
        .unwrap_or_else(|| "no message (is drill.exec.http.rest.errors.verbose refused?)".into());
    Err(drill_err(
        url,
        format!(
            "query {} (HTTP {status}): {message}",
            state.unwrap_or("failed")
        ),
    ))
}

/// Run `sql` on Drill at `url` (`http://host:port`, e.g. through `fluxcap
/// cluster tunnel`); the answer's rows.
pub async fn run(url: &str, sql: &str) -> Result<Vec<serde_json::Value>> {
    let u = url::Url::parse(url).map_err(|e| Error::Usage(format!("--drill-url {url:?}: {e}")))?;
    if u.scheme() != "http" {
        return Err(Error::Usage(format!(
            "--drill-url {url:?}: expected http://host:8047 (use `fluxcap cluster tunnel` for a remote cluster)"
        )));
    }
    let host = u.host_str().unwrap_or("localhost").to_string();
    let port = u.port().unwrap_or(8047);
    let body = query_body(sql);
    let req = format!(
        "POST /query.json HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let io = |e: std::io::Error| drill_err(url, e.to_string());
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| drill_err(url, "connection timed out"))?
    .map_err(io)?;
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(io)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| drill_err(url, "malformed HTTP answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| drill_err(url, "malformed HTTP status"))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(|| drill_err(url, "malformed chunked answer"))?;
    }
    answer(url, status, &body)
}

fn dechunk(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        let chunk = rest.get(eol + 2..eol + 2 + size)?;
        out.extend_from_slice(chunk);
        rest = rest.get((eol + 4 + size).min(rest.len())..)?;
    }
    Some(out)
}

/// The scratch table of replay `id`.
pub fn scratch_table(id: &str) -> String {
    format!("replay_{id}")
}

fn scratch_dir(archive: &Archive, table: &str) -> object_store::path::Path {
    crate::cluster::resources::SCRATCH_DIR
        .split('/')
        .fold(archive.layout.root().clone(), |p, part| p.join(part))
        .join(table)
}

/// Where Drill writes `table` of the scratch workspace, as `--from-parquet` takes it.
pub fn scratch_location(archive: &Archive, table: &str) -> String {
    let dir = scratch_dir(archive, table);
    match &archive.location {
        ArchiveLocation::Local(root) => root.join(dir.as_ref()).display().to_string(),
        ArchiveLocation::S3 { bucket, .. } => format!("s3://{bucket}/{dir}"),
    }
}

/// Materialise the selection on Drill: make sure the scratch workspace
/// exists, then run the CTAS into `table`; where the result is.
pub async fn materialise(
    archive: &Archive,
    url: &str,
    plugin: &str,
    stream: &str,
    table: &str,
    sel: &Selection,
    depth: &BTreeMap<String, u32>,
) -> Result<String> {
    crate::cluster::resources::ensure_scratch(archive).await?;
    let sql = replay_sql(plugin, stream, table, sel, depth);
    tracing::info!(%url, "running the selection on Drill: {sql}");
    let rows = run(url, &sql).await?;
    let written: i64 = rows
        .iter()
        .filter_map(|r| r.get("Number of records written").and_then(|n| n.as_i64()))
        .sum();
    tracing::info!("Drill wrote {written} records into the scratch table {table}");
    Ok(scratch_location(archive, table))
}

/// The number of records the selection holds, asked of Drill (`--dry-run`).
pub async fn count(
    url: &str,
    plugin: &str,
    stream: &str,
    sel: &Selection,
    depth: &BTreeMap<String, u32>,
) -> Result<u64> {
    let rows = run(url, &count_sql(plugin, stream, sel, depth)).await?;
    rows.first()
        .and_then(|r| r.get("n"))
        .and_then(|n| {
            n.as_u64()
                .or_else(|| n.as_str().and_then(|s| s.parse().ok()))
        })
        .ok_or_else(|| drill_err(url, format!("no count in Drill's answer: {rows:?}")))
}

/// After a replay whose source is the scratch table of replay `id` at
/// `location`: when it is done, delete the table; when it failed, keep it (to
/// inspect it, and for `--resume`) and say which files are kept.
pub async fn after_replay(archive: &Archive, id: &str, location: &str, done: bool) {
    let table = scratch_table(id);
    if scratch_location(archive, &table) != location {
        return;
    }
    let dir = scratch_dir(archive, &table);
    let files = match archive.list(&dir).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot list Drill's scratch table {location}: {e}");
            return;
        }
    };
    if !done {
        let names: Vec<String> = files
            .iter()
            .map(|f| archive.describe(&f.location))
            .collect();
        eprintln!(
            "Drill's result for replay {id} is kept (to inspect, and for --resume {id}): {}",
            names.join(" ")
        );
        return;
    }
    for f in &files {
        if let Err(e) = archive.delete_with_leftovers(&f.location).await {
            tracing::warn!("cannot delete Drill's scratch file: {e}");
            return;
        }
    }
    if let ArchiveLocation::Local(root) = &archive.location {
        let _ = std::fs::remove_dir(root.join(dir.as_ref()));
    }
    tracing::info!(
        "deleted Drill's scratch table {location} ({} files)",
        files.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctas_of_a_bounded_filtered_selection() {
        let sel = Selection {
            since_ms: Some(1_764_000_000_000),
            until_ms: Some(1_764_003_600_000),
            predicate: Some("shard_id = 'shardId-000000000001'".into()),
            ..Default::default()
        };
        let q = replay_sql("archive", "orders-v2", "replay_r-1", &sel, &BTreeMap::new());
        assert!(q.starts_with("CREATE TABLE `archive`.scratch.`replay_r-1` AS SELECT shard_id,"));
        assert!(q.contains("FROM `archive`.archive.`orders-v2` WHERE"));
        assert!(q.contains("dir0 >= 'dt=2025-11-24'"), "{q}");
        assert!(q.contains("approximate_arrival_timestamp >= TIMESTAMP '2025-11-24 16:00:00.000'"));
        assert!(q.contains("approximate_arrival_timestamp < TIMESTAMP '2025-11-24 17:00:00.000'"));
        assert!(q.ends_with("AND (shard_id = 'shardId-000000000001')"));
    }

    #[test]
    fn ctas_of_a_compaction_with_tombstones_null_keys_and_lineage() {
        let sel = Selection {
            compact: true,
            key: Some("substr(partition_key, 1, 3)".into()),
            tombstone: Some("t.op = 'del'".into()),
            ..Default::default()
        };
        let depth = BTreeMap::from([("shardId-0".to_string(), 0), ("shardId-2".to_string(), 1)]);
        let q = replay_sql("archive", "orders", "replay_x", &sel, &depth);
        assert!(q.contains(
            "ROW_NUMBER() OVER (PARTITION BY __key ORDER BY __depth DESC, shard_id DESC"
        ));
        assert!(q.contains("(substr(partition_key, 1, 3)) AS __key"));
        assert!(q.contains("CASE shard_id WHEN 'shardId-2' THEN 1 ELSE 0 END AS __depth"));
        assert!(q.contains("COALESCE((t.op = 'del'), FALSE) AS __tomb"));
        assert!(q.contains("WHERE __rn = 1 AND NOT __tomb"));
        assert!(q.contains("WHERE __key IS NOT NULL"));
        assert!(
            q.contains("UNION ALL SELECT"),
            "records without a key are kept: {q}"
        );
        let c = count_sql("archive", "orders", &sel, &depth);
        assert!(c.starts_with("SELECT COUNT(*) AS n FROM (SELECT"));
    }

    #[test]
    fn rest_body_asks_for_verbose_errors() {
        let b: serde_json::Value =
            serde_json::from_str(&query_body("SELECT 1")).unwrap_or_default();
        assert_eq!(b["queryType"], "SQL");
        assert_eq!(b["query"], "SELECT 1");
        assert_eq!(b["options"][VERBOSE_ERRORS], "true");
    }

    #[test]
    fn only_a_completed_query_is_an_answer() {
        let ok = br#"{"queryId":"q","rows":[{"n":3}],"queryState":"COMPLETED"}"#;
        let rows = answer("http://d:8047", 200, ok).unwrap_or_default();
        assert_eq!(rows.len(), 1);
        let failed = br#"{"queryId":"q","errorMessage":"VALIDATION ERROR: Schema [x] is not valid\n\nmore","queryState":"FAILED"}"#;
        let e = answer("http://d:8047", 200, failed)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("VALIDATION ERROR: Schema [x] is not valid") && e.contains("FAILED"),
            "{e}"
        );
        assert!(!e.contains("more"), "{e}");
        let silent = br#"{"queryId":"q","queryState":"FAILED"}"#;
        assert!(answer("http://d:8047", 200, silent).is_err());
        assert!(answer("http://d:8047", 500, b"<html>").is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n5;x=1\r\npedia\r\n0\r\n\r\n").unwrap_or_default(),
            b"Wikipedia".to_vec()
        );
    }
}
