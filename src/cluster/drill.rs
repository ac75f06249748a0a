//! `fluxcap replay --engine drill`: the replay's selection (bounds, filter,
//! compaction) as Drill SQL, run on the cluster as a CTAS into the `scratch`
//! workspace of the archive plugin (`fluxcap catalog drill`), so a large
//! result never travels through Drill's REST API; the replay then sends those
//! Parquet files (`--from-parquet`).
//!
//! ```text
//!   selection ─▶ CREATE TABLE <plugin>.scratch.`replay_<id>` AS SELECT … FROM <plugin>.archive.`<stream>`
//!             ─▶ POST <drill-url>/query.json ─▶ <archive>/_fluxcap/drill-scratch/replay_<id>/*.parquet
//!             ─▶ replay --from-parquet (same order, annotation, pacing, resume)
//! ```
//!
//! Drill reads the archive's files only, so records not archived yet are not
//! replayed; `--where`, `--key` and `--tombstone` are Drill SQL here.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::replay::state::Selection;

fn drill_err(m: impl Into<String>) -> Error {
    Error::Query {
        message: format!("Drill: {}", m.into()),
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

/// The CTAS that materialises the selection of `stream` as `table` in the
/// plugin's scratch workspace.
pub fn replay_sql(plugin: &str, stream: &str, table: &str, sel: &Selection) -> String {
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
    let source = format!("{}.archive.{}", ident(plugin), ident(stream));
    let target = format!("{}.scratch.{}", ident(plugin), ident(table));
    let predicate = sel
        .predicate
        .as_deref()
        .map(|p| format!("({p})"))
        .unwrap_or_else(|| "TRUE".into());
    let select = if sel.compact {
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
        format!(
            "SELECT {COLUMNS} FROM (\
               SELECT {COLUMNS}, __tomb, ROW_NUMBER() OVER (PARTITION BY __key ORDER BY \
                 approximate_arrival_timestamp DESC, shard_id DESC, CHAR_LENGTH(sequence_number) DESC, \
                 sequence_number DESC, subsequence_number DESC) AS __rn FROM (\
                 SELECT {COLUMNS}, {key} AS __key, {tomb} AS __tomb FROM {source} WHERE {conds}\
               ) AS s\
             ) AS r WHERE __rn = 1 AND NOT __tomb AND {predicate}",
            conds = conds.join(" AND ")
        )
    } else {
        format!(
            "SELECT {COLUMNS} FROM {source} WHERE {} AND {predicate}",
            conds.join(" AND ")
        )
    };
    format!("CREATE TABLE {target} AS {select}")
}

/// The body of Drill's `POST /query.json`.
pub fn query_body(sql: &str) -> String {
    serde_json::json!({ "queryType": "SQL", "query": sql }).to_string()
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
    let io = |e: std::io::Error| drill_err(format!("{url}: {e}"));
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| drill_err(format!("{url}: connection timed out")))?
    .map_err(io)?;
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(io)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| drill_err("malformed HTTP answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| drill_err("malformed HTTP status"))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .map_err(|_| drill_err("malformed chunked answer"))?;
            if size == 0 || rest.len() < eol + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[(eol + 4 + size).min(rest.len())..];
        }
        body = out;
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| drill_err(format!("HTTP {status}, not JSON ({e})")))?;
    if status != 200 || v.get("errorMessage").is_some() {
        return Err(drill_err(format!(
            "HTTP {status}: {}",
            v.get("errorMessage")
                .and_then(|m| m.as_str())
                .unwrap_or("query failed")
        )));
    }
    Ok(v["rows"].as_array().cloned().unwrap_or_default())
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
        let q = replay_sql("archive", "orders-v2", "replay_r-1", &sel);
        assert!(q.starts_with("CREATE TABLE `archive`.scratch.`replay_r-1` AS SELECT shard_id,"));
        assert!(q.contains("FROM `archive`.archive.`orders-v2` WHERE"));
        assert!(q.contains("dir0 >= 'dt=2025-11-24'"), "{q}");
        assert!(q.contains("approximate_arrival_timestamp >= TIMESTAMP '2025-11-24 16:00:00.000'"));
        assert!(q.contains("approximate_arrival_timestamp < TIMESTAMP '2025-11-24 17:00:00.000'"));
        assert!(q.ends_with("AND (shard_id = 'shardId-000000000001')"));
    }

    #[test]
    fn ctas_of_a_compaction_with_tombstones() {
        let sel = Selection {
            compact: true,
            tombstone: Some("t.op = 'del'".into()),
            ..Default::default()
        };
        let q = replay_sql("archive", "orders", "replay_x", &sel);
        assert!(q.contains(
            "ROW_NUMBER() OVER (PARTITION BY __key ORDER BY approximate_arrival_timestamp DESC"
        ));
        assert!(q.contains("partition_key AS __key"));
        assert!(q.contains("COALESCE((t.op = 'del'), FALSE) AS __tomb"));
        assert!(q.contains("WHERE __rn = 1 AND NOT __tomb"));
    }

    #[test]
    fn rest_body_is_drills_query_json() {
        let b: serde_json::Value =
            serde_json::from_str(&query_body("SELECT 1")).unwrap_or_default();
        assert_eq!(b["queryType"], "SQL");
        assert_eq!(b["query"], "SELECT 1");
    }
}
