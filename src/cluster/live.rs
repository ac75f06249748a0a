//! Live records on a cluster: the Hive table over each stream (EMR's Kinesis
//! storage handler), the stream's positions table as a Hive table, and the
//! unified view — archived records ∪ live records after each shard's
//! published position — for Drill and for Hive: the cluster twin of
//! `fluxcap sql`'s `S`, with its columns and its exactly-once rule.
//!
//! ```text
//!   <db>.<t>            the archive (catalog hive)            Drill: archive.archive.`<stream>`
//!   <db>.<t>_positions  <root>/fluxcap-positions/<stream>/    Drill: archive.archive.`fluxcap-positions/<stream>`
//!   <db>.<t>_live       STORED BY KinesisStorageHandler       Drill: streams.<db>.`<t>_live`  (plugin `streams`)
//!
//!   view = archive
//!          ∪ live l LEFT JOIN positions p ON l.shard_id = p.shard_id
//!            WHERE p has no row for the shard
//!               OR (NOT p.finished AND (p names no record OR (l.seq, l.sub) > (p.seq, p.sub)))
//! ```
//!
//! Positions compare as `(lpad(sequence_number, 129, '0'), subsequence_number)`
//! (the table's `sequence_key` is the padded form): neither Drill nor Hive
//! has decimals wide enough for Kinesis sequence numbers. A live row whose
//! shard id or sequence number is NULL is left out, so a live table that
//! does not fill them gives the archive alone, never a record twice.
//!
//! The storage handler is EMR's own: its documented table properties are
//! [`HANDLER_PROPERTIES`]; it reads each shard with GetRecords from the trim
//! horizon on every query (it has no documented start position), so the view
//! filters by position instead of skipping what is archived.

use crate::cluster::catalog::{ident, quote, root_url, table_name};
use crate::config::{ArchiveLocation, StreamConfig};

/// EMR's Hive storage handler for Kinesis streams.
pub const STORAGE_HANDLER: &str = "com.amazon.emr.kinesis.hive.KinesisStorageHandler";

/// The storage handler's table and session properties as EMR documents them
/// (Amazon EMR Release Guide, "Kinesis", and the EMR–Kinesis connector FAQ).
/// The generated DDL uses no other.
pub const HANDLER_PROPERTIES: &[&str] = &[
    "kinesis.stream.name",
    "kinesis.endpoint.region",
    "kinesis.accessKey",
    "kinesis.secretKey",
    "kinesis.nodata.timeout",
    "kinesis.iteration.timeout",
    "kinesis.records.batchsize",
    "kinesis.checkpoint.enabled",
    "kinesis.checkpoint.metastore.table.name",
    "kinesis.checkpoint.metastore.hash.key.name",
    "kinesis.checkpoint.metastore.range.key.name",
    "kinesis.checkpoint.logical.name",
    "kinesis.checkpoint.iteration.no",
    "kinesis.rerun.iteration.without.wait",
];

/// The name Drill's Hive plugin has (the cluster's metastore).
pub const HIVE_PLUGIN: &str = "streams";

/// Drill's workspace (of the `archive` plugin) that holds the views.
pub const VIEWS_WORKSPACE: &str = "views";

/// Where the views workspace lives under the archive root.
pub const VIEWS_DIR: &str = "_fluxcap/drill-views";

/// Width of the padded sequence number (see `archive::positions`).
const W: usize = crate::archive::positions::SEQUENCE_KEY_WIDTH;

/// The record columns of the archive, in `S`'s order (without `dt`, `hr`).
const RECORD_COLUMNS: [&str; 7] = [
    "shard_id",
    "sequence_number",
    "subsequence_number",
    "partition_key",
    "explicit_hash_key",
    "approximate_arrival_timestamp",
    "data",
];

/// The live-side condition: live row `l` is not archived by positions row `p`.
fn unarchived(lpad: &str) -> String {
    let key = format!("{lpad}(l.sequence_number, {W}, '0')");
    format!(
        "l.shard_id IS NOT NULL AND l.sequence_number IS NOT NULL\n  \
         AND (p.shard_id IS NULL\n    \
           OR (NOT p.finished AND (p.sequence_key IS NULL\n      \
             OR {key} > p.sequence_key\n      \
             OR ({key} = p.sequence_key AND l.subsequence_number > p.subsequence_number))))"
    )
}

/// Hive: the live table, the positions table and the unified view of each
/// stream, for `catalog hive --live` and the cluster's registration step.
pub fn hive_live_ddl(
    region: &str,
    streams: &[StreamConfig],
    database: &str,
    loc: &ArchiveLocation,
) -> String {
    let root = root_url(loc);
    let db = ident(database);
    let mut out = String::new();
    out.push_str(
        "-- Live records (EMR only: the storage handler is EMR's emr-kinesis component, installed with Hive).\n\
         -- The handler reads every shard from its trim horizon with GetRecords on each query: its reads\n\
         -- count against each shard's 5 calls and 2 MiB per second, beside the archiver's share.\n",
    );
    for s in streams {
        let t = table_name(&s.name);
        let archive = format!("{db}.{}", ident(&t));
        let positions = format!("{db}.{}", ident(&format!("{t}_positions")));
        let live = format!("{db}.{}", ident(&format!("{t}_live")));
        let view = format!("{db}.{}", ident(&format!("{t}_all")));
        out.push_str(&format!(
            "\nCREATE EXTERNAL TABLE IF NOT EXISTS {positions} (\n  \
               stream STRING,\n  stream_arn STRING,\n  stream_created_ms BIGINT,\n  \
               shard_id STRING,\n  sequence_number STRING,\n  subsequence_number BIGINT,\n  \
               sequence_key STRING,\n  finished BOOLEAN,\n  records BIGINT,\n  updated_at_ms BIGINT\n)\n\
             STORED AS PARQUET\n\
             LOCATION {};\n",
            quote(&format!("{root}/{}/{}/", crate::archive::layout::POSITIONS_DIR, s.name))
        ));
        let mut props = vec![("kinesis.stream.name", s.name.clone())];
        if !region.is_empty() {
            props.push(("kinesis.endpoint.region", region.to_string()));
        }
        out.push_str(&format!(
            "\nCREATE TABLE IF NOT EXISTS {live} (\n  \
               shard_id STRING,\n  sequence_number STRING,\n  subsequence_number BIGINT,\n  \
               partition_key STRING,\n  explicit_hash_key STRING,\n  \
               approximate_arrival_timestamp BIGINT COMMENT 'arrival time, epoch milliseconds UTC',\n  \
               data BINARY\n)\n\
             STORED BY {}\n\
             TBLPROPERTIES ({});\n",
            quote(STORAGE_HANDLER),
            props
                .iter()
                .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let cols = RECORD_COLUMNS.join(", ");
        let lcols = RECORD_COLUMNS
            .iter()
            .map(|c| format!("l.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "\n-- archived records + live records after each shard's published position, once each\n\
             CREATE OR REPLACE VIEW {view} AS\n\
             SELECT {cols}, dt, hr FROM {archive}\n\
             UNION ALL\n\
             SELECT {lcols},\n  \
               from_unixtime(CAST(l.approximate_arrival_timestamp DIV 1000 AS BIGINT), 'yyyy-MM-dd') AS dt,\n  \
               from_unixtime(CAST(l.approximate_arrival_timestamp DIV 1000 AS BIGINT), 'HH') AS hr\n\
             FROM {live} l LEFT JOIN {positions} p ON l.shard_id = p.shard_id\n\
             WHERE {};\n",
            unarchived("lpad")
        ));
    }
    out
}

/// The `SELECT` of a stream's Drill view.
pub fn drill_view_select(stream: &str, live_schema: &str) -> String {
    let t = table_name(stream);
    let cols = RECORD_COLUMNS.join(", ");
    let lcols: Vec<String> = RECORD_COLUMNS
        .iter()
        .map(|c| match *c {
            // The live table declares the arrival time as epoch ms (Hive's
            // reader takes no INT64 timestamps); the archive has TIMESTAMP.
            "approximate_arrival_timestamp" => {
                "TO_TIMESTAMP(l.approximate_arrival_timestamp / 1000.0) AS approximate_arrival_timestamp"
                    .to_string()
            }
            c => format!("l.{c}"),
        })
        .collect();
    format!(
        "SELECT {cols}, SUBSTR(dir0, 4) AS dt, SUBSTR(dir1, 4) AS hr\n\
         FROM archive.archive.`{stream}`\n\
         UNION ALL\n\
         SELECT {},\n  \
           TO_CHAR(TO_TIMESTAMP(l.approximate_arrival_timestamp / 1000.0), 'yyyy-MM-dd') AS dt,\n  \
           TO_CHAR(TO_TIMESTAMP(l.approximate_arrival_timestamp / 1000.0), 'HH') AS hr\n\
         FROM {live_schema}.`{t}_live` l\n\
         LEFT JOIN archive.archive.`{}/{stream}` p ON l.shard_id = p.shard_id\n\
         WHERE {}",
        lcols.join(", "),
        crate::archive::layout::POSITIONS_DIR,
        unarchived("LPAD")
    )
}

fn drill_view_sql(stream: &str, live_schema: &str) -> String {
    format!(
        "CREATE OR REPLACE VIEW archive.{VIEWS_WORKSPACE}.`{stream}` AS\n{}",
        drill_view_select(stream, live_schema)
    )
}

/// Drill's default live schema: the Hive plugin and the tables' database.
pub fn default_live_schema(database: &str) -> String {
    format!("{HIVE_PLUGIN}.{database}")
}

/// The text `catalog drill --views` prints: one `CREATE OR REPLACE VIEW` per
/// stream in the `archive` plugin's `views` workspace, the live side read
/// from `live_schema`, statements separated by a blank line (Drill's REST API
/// takes one at a time).
pub fn drill_views_text(streams: &[StreamConfig], live_schema: &str) -> String {
    let mut out = String::from(
        "-- fluxcap catalog drill --views: run each statement on its own (Drill's web UI or REST API)\n\n",
    );
    for s in streams {
        out.push_str(&drill_view_sql(&s.name, live_schema));
        out.push_str(";\n\n");
    }
    out
}

/// A Drill view definition file (`<name>.view.drill` in the views
/// workspace), as Drill writes for `CREATE VIEW`: the registration step puts
/// it there without a running Drill. Drill resolves its columns when it is
/// queried.
pub fn drill_view_file(stream: &str, live_schema: &str) -> String {
    let fields: Vec<serde_json::Value> = RECORD_COLUMNS
        .iter()
        .chain(["dt", "hr"].iter())
        .map(|c| serde_json::json!({ "name": c, "type": "ANY", "isNullable": true }))
        .collect();
    let v = serde_json::json!({
        "name": stream,
        "sql": drill_view_select(stream, live_schema),
        "fields": fields,
        "workspaceSchemaPath": ["archive", VIEWS_WORKSPACE],
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `'key'='value'` property of the `TBLPROPERTIES (…)` clauses of `ddl`.
    fn tblproperties(ddl: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for part in ddl.split("TBLPROPERTIES (").skip(1) {
            let body = part.split(");").next().unwrap_or_default();
            for kv in body.split(", ") {
                if let Some((k, v)) = kv.split_once('=') {
                    out.push((
                        k.trim().trim_matches('\'').to_string(),
                        v.trim().trim_matches('\'').to_string(),
                    ));
                }
            }
        }
        out
    }

    fn stream(name: &str) -> StreamConfig {
        StreamConfig {
            name: name.into(),
            format: crate::config::PayloadFormat::Json,
        }
    }

    #[test]
    fn the_live_table_uses_only_documented_handler_properties() {
        let s = stream("orders-v2");
        let ddl = hive_live_ddl(
            "eu-west-1",
            &[s],
            "kinesis_archive",
            &ArchiveLocation::S3 {
                bucket: "b".into(),
                prefix: "k".into(),
            },
        );
        assert!(
            ddl.contains(&format!("STORED BY '{STORAGE_HANDLER}'")),
            "{ddl}"
        );
        let props = tblproperties(&ddl);
        assert!(
            props.contains(&("kinesis.stream.name".into(), "orders-v2".into())),
            "{props:?}"
        );
        assert!(props.contains(&("kinesis.endpoint.region".into(), "eu-west-1".into())));
        for (k, _) in &props {
            assert!(
                HANDLER_PROPERTIES.contains(&k.as_str()),
                "{k} is not a documented property"
            );
            assert!(!k.contains("Key"), "credentials in the DDL: {k}");
        }
        assert!(
            ddl.contains("LOCATION 's3://b/k/fluxcap-positions/orders-v2/'"),
            "{ddl}"
        );
        assert!(
            ddl.contains("CREATE OR REPLACE VIEW kinesis_archive.orders_v2_all AS"),
            "{ddl}"
        );
    }

    #[test]
    fn the_drill_view_reads_archive_live_and_positions() {
        let sql = drill_view_select("orders", "streams.kinesis_archive");
        assert!(sql.contains("FROM archive.archive.`orders`"));
        assert!(sql.contains("FROM streams.kinesis_archive.`orders_live` l"));
        assert!(sql.contains("archive.archive.`fluxcap-positions/orders` p"));
        assert!(sql.contains("LPAD(l.sequence_number, 129, '0') > p.sequence_key"));
        let file: serde_json::Value =
            serde_json::from_str(&drill_view_file("orders", "x.y")).unwrap_or_default();
        assert_eq!(file["fields"].as_array().map(Vec::len), Some(9));
        assert_eq!(file["workspaceSchemaPath"][1], "views");
    }
}
