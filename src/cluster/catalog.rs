//! `fluxcap catalog hive|glue|athena|drill`: what a cluster engine needs to
//! read the archive as a table — DDL for an external Parquet table partitioned
//! by `dt`/`hr` (with batched `ADD PARTITION` statements for the partitions
//! present, or `MSCK REPAIR TABLE` where they are not listed), Athena
//! partition projection from the archive's first day, or Drill's storage
//! plugin (made from the configuration alone: no AWS call).
//!
//! Hive's own Parquet reader (Hive 3 on EMR) cannot read INT64 timestamps, so
//! the Hive and Glue DDL declares `approximate_arrival_timestamp` as `BIGINT`
//! (epoch milliseconds, UTC) — the same file, read without conversion;
//! Athena and Spark read it as `TIMESTAMP`.

use std::collections::{BTreeMap, BTreeSet};

use crate::archive::store::Archive;
use crate::config::{ArchiveLocation, Config};
use crate::error::Result;

/// Which engine's catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Hive metastore DDL (EMR Hive, Spark with Hive support).
    Hive,
    /// AWS Glue Data Catalog DDL (run it in Athena or EMR against Glue).
    Glue,
    /// Athena DDL with partition projection (no partitions to add).
    Athena,
    /// The Drill `file` storage plugin, as JSON.
    Drill,
}

/// Options of `fluxcap catalog`.
#[derive(Debug, Clone, clap::Args)]
pub struct CatalogOptions {
    /// Which engine.
    #[arg(value_enum)]
    pub engine: Engine,
    /// Only this stream (default: every configured stream).
    #[arg(long)]
    pub stream: Option<String>,
    /// Database (schema) the tables go in.
    #[arg(long, default_value = "kinesis_archive")]
    pub database: String,
    /// Leave out the ALTER TABLE … ADD PARTITION statements.
    #[arg(long)]
    pub no_partitions: bool,
    /// Hive: also the live table over each stream (EMR's Kinesis storage
    /// handler), its positions table and the view archive ∪ live (`<t>_all`).
    #[arg(long)]
    pub live: bool,
    /// Drill: the views archive ∪ live (one per stream, in `archive.views`)
    /// instead of the storage plugin.
    #[arg(long)]
    pub views: bool,
    /// Drill views: the schema of the live tables [default: streams.<database>,
    /// the Hive plugin `streams`].
    #[arg(long, value_name = "SCHEMA")]
    pub live_schema: Option<String>,
}

impl CatalogOptions {
    /// Options for `engine` with the defaults of the command line.
    pub fn new(engine: Engine) -> Self {
        CatalogOptions {
            engine,
            stream: None,
            database: "kinesis_archive".into(),
            no_partitions: false,
            live: false,
            views: false,
            live_schema: None,
        }
    }
}

/// The archive root as a URL engines understand (`s3://…` or `file://…`), without a trailing `/`.
pub(crate) fn root_url(loc: &ArchiveLocation) -> String {
    match loc {
        ArchiveLocation::Local(dir) => format!("file://{}", dir.display())
            .trim_end_matches('/')
            .to_string(),
        ArchiveLocation::S3 { bucket, prefix } if prefix.is_empty() => format!("s3://{bucket}"),
        ArchiveLocation::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
    }
}

/// The table name of a stream: Hive, Glue and Athena names hold only
/// letters, digits and `_` (`orders-v2` → `orders_v2`).
pub fn table_name(stream: &str) -> String {
    stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// A Hive identifier: plain when it can be, else back-quoted.
pub(crate) fn ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("`{}`", name.replace('`', "``"))
    }
}

pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The `(dt, hr)` partitions holding data files of `stream`.
pub async fn partitions(archive: &Archive, stream: &str) -> Result<BTreeSet<(String, String)>> {
    let mut out = BTreeSet::new();
    for o in archive.list(&archive.layout.stream_dir(stream)).await? {
        if !o.location.as_ref().ends_with(".parquet") {
            continue;
        }
        let mut dt = None;
        let mut hr = None;
        for p in o.location.parts() {
            let p = p.as_ref();
            if let Some(v) = p.strip_prefix("dt=") {
                dt = Some(v.to_string());
            } else if let Some(v) = p.strip_prefix("hr=") {
                hr = Some(v.to_string());
            } else if p.starts_with('_') || p.starts_with('.') {
                dt = None;
                break;
            }
        }
        if let (Some(d), Some(h)) = (dt, hr) {
            out.insert((d, h));
        }
    }
    Ok(out)
}

/// Partitions per stream, as listed from the archive.
pub type Partitions = BTreeMap<String, BTreeSet<(String, String)>>;

/// Most partitions in one `ALTER TABLE … ADD` statement (Hive and Athena take
/// many `PARTITION (…) LOCATION …` clauses in one statement).
const PARTITIONS_PER_STATEMENT: usize = 100;

/// The catalog text for `opts`. The Drill plugin is made from the
/// configuration alone (no AWS call); the DDL lists the archive's partitions.
pub async fn generate(cfg: &Config, opts: &CatalogOptions) -> Result<String> {
    let loc = cfg.location()?;
    if opts.views && opts.engine != Engine::Drill {
        return Err(crate::error::Error::Usage(
            "--views is for Drill: fluxcap catalog drill --views (Hive's view comes with catalog hive --live)".into(),
        ));
    }
    if opts.live && opts.engine != Engine::Hive {
        return Err(crate::error::Error::Usage(
            "--live is for Hive on EMR (the Kinesis storage handler): fluxcap catalog hive --live"
                .into(),
        ));
    }
    if opts.engine == Engine::Drill {
        if opts.views {
            let streams = cfg.selected_streams(opts.stream.as_deref())?;
            let schema = opts
                .live_schema
                .clone()
                .unwrap_or_else(|| crate::cluster::live::default_live_schema(&opts.database));
            return Ok(crate::cluster::live::drill_views_text(&streams, &schema));
        }
        return Ok(drill_plugin(&loc));
    }
    let archive = Archive::open(cfg).await?;
    let mut parts = Partitions::new();
    if !opts.no_partitions || opts.engine == Engine::Athena {
        for s in cfg.selected_streams(opts.stream.as_deref())? {
            parts.insert(s.name.clone(), partitions(&archive, &s.name).await?);
        }
    }
    let mut text = hive_ddl(cfg, opts, &loc, Some(&parts))?;
    if opts.live {
        let streams = cfg.selected_streams(opts.stream.as_deref())?;
        text.push_str(&crate::cluster::live::hive_live_ddl(
            &cfg.aws.region,
            &streams,
            &opts.database,
            &loc,
        ));
    }
    Ok(text)
}

/// Hive, Glue or Athena DDL for the archive at `loc`. With `parts` (the
/// partitions present), partitions are added in batched `ALTER TABLE … ADD`
/// statements and Athena's projection starts at the first day; without,
/// `MSCK REPAIR TABLE` finds them on the cluster.
pub fn hive_ddl(
    cfg: &Config,
    opts: &CatalogOptions,
    loc: &ArchiveLocation,
    parts: Option<&Partitions>,
) -> Result<String> {
    let root = root_url(loc);
    let streams = cfg.selected_streams(opts.stream.as_deref())?;
    let db = ident(&opts.database);
    let mut out = String::new();
    out.push_str(
        &format!(
            "-- fluxcap catalog {:?} for {} (generated {})\n",
            opts.engine,
            root,
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        )
        .to_lowercase(),
    );
    if opts.engine != Engine::Hive {
        out.push_str(
            "-- Athena runs one statement per query: run each statement below on its own.\n",
        );
    }
    out.push_str(&format!("CREATE DATABASE IF NOT EXISTS {db};\n\n"));
    for s in streams {
        let table = format!("{db}.{}", ident(&table_name(&s.name)));
        let location = format!("{root}/{}/", s.name);
        let arrival = match opts.engine {
            Engine::Athena => "approximate_arrival_timestamp TIMESTAMP",
            _ => {
                "approximate_arrival_timestamp BIGINT COMMENT 'arrival time, epoch milliseconds UTC'"
            }
        };
        out.push_str(&format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS {table} (\n  \
               shard_id STRING,\n  \
               sequence_number STRING,\n  \
               subsequence_number BIGINT,\n  \
               partition_key STRING,\n  \
               explicit_hash_key STRING,\n  \
               {arrival},\n  \
               data BINARY\n)\n\
             PARTITIONED BY (dt STRING, hr STRING)\n\
             STORED AS PARQUET\n\
             LOCATION {}",
            quote(&location)
        ));
        let present = parts.and_then(|p| p.get(&s.name));
        match opts.engine {
            Engine::Athena => {
                // The projection starts at the archive's first day (today
                // for an empty archive): days before it hold nothing.
                let first = present
                    .and_then(|p| p.iter().next())
                    .map(|(dt, _)| dt.clone())
                    .unwrap_or_else(|| chrono::Utc::now().format("%Y-%m-%d").to_string());
                out.push_str(&format!(
                    "\nTBLPROPERTIES (\n  \
                       'projection.enabled'='true',\n  \
                       'projection.dt.type'='date',\n  \
                       'projection.dt.format'='yyyy-MM-dd',\n  \
                       'projection.dt.range'={},\n  \
                       'projection.dt.interval'='1',\n  \
                       'projection.dt.interval.unit'='DAYS',\n  \
                       'projection.hr.type'='integer',\n  \
                       'projection.hr.range'='0,23',\n  \
                       'projection.hr.digits'='2',\n  \
                       'storage.location.template'={}\n);\n\n",
                    quote(&format!("{first},NOW")),
                    quote(&format!("{location}dt=${{dt}}/hr=${{hr}}/"))
                ));
                continue;
            }
            Engine::Glue => {
                out.push_str(
                    "\nTBLPROPERTIES ('classification'='parquet', 'parquet.compression'='ZSTD');\n",
                );
            }
            _ => out.push_str(";\n"),
        }
        if !opts.no_partitions {
            match present {
                Some(p) => {
                    let all: Vec<&(String, String)> = p.iter().collect();
                    for chunk in all.chunks(PARTITIONS_PER_STATEMENT) {
                        out.push_str(&format!("ALTER TABLE {table} ADD IF NOT EXISTS"));
                        for (dt, hr) in chunk {
                            out.push_str(&format!(
                                "\n  PARTITION (dt={}, hr={}) LOCATION {}",
                                quote(dt),
                                quote(hr),
                                quote(&format!("{location}dt={dt}/hr={hr}/"))
                            ));
                        }
                        out.push_str(";\n");
                    }
                }
                None => out.push_str(&format!(
                    "-- every dt=/hr= partition present when this runs (run it again for new hours)\n\
                     MSCK REPAIR TABLE {table};\n"
                )),
            }
        }
        out.push('\n');
    }
    Ok(out)
}

/// Drill's `file` storage plugin over the archive: one read-only workspace
/// whose tables are the streams, and a writable scratch workspace for CTAS.
pub fn drill_plugin(loc: &ArchiveLocation) -> String {
    let (connection, base) = match loc {
        ArchiveLocation::Local(dir) => ("file:///".to_string(), dir.display().to_string()),
        ArchiveLocation::S3 { bucket, prefix } => (format!("s3a://{bucket}"), format!("/{prefix}")),
    };
    let base = base.trim_end_matches('/').to_string();
    let base = if base.is_empty() {
        "/".to_string()
    } else {
        base
    };
    let scratch = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        crate::cluster::resources::SCRATCH_DIR
    );
    let views = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        crate::cluster::live::VIEWS_DIR
    );
    let v = serde_json::json!({
        "type": "file",
        "enabled": true,
        "connection": connection,
        "workspaces": {
            "archive": { "location": base, "writable": false, "defaultInputFormat": "parquet", "allowAccessOutsideWorkspace": false },
            "scratch": { "location": scratch, "writable": true, "defaultInputFormat": "parquet", "allowAccessOutsideWorkspace": false },
            "views": { "location": views, "writable": true, "defaultInputFormat": "parquet", "allowAccessOutsideWorkspace": false }
        },
        "formats": { "parquet": { "type": "parquet" } }
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals() {
        assert_eq!(ident("orders"), "orders");
        assert_eq!(ident("orders-v2"), "`orders-v2`");
        assert_eq!(quote("it's"), "'it\\'s'");
        assert_eq!(table_name("Orders-v2.eu"), "orders_v2_eu");
    }

    #[test]
    fn drill_plugin_has_archive_and_scratch_workspaces() {
        let v: serde_json::Value = serde_json::from_str(&drill_plugin(&ArchiveLocation::S3 {
            bucket: "b".into(),
            prefix: "kinesis".into(),
        }))
        .unwrap_or_default();
        assert_eq!(v["connection"], "s3a://b");
        assert_eq!(v["workspaces"]["archive"]["location"], "/kinesis");
        assert_eq!(v["workspaces"]["archive"]["writable"], false);
        assert_eq!(v["workspaces"]["scratch"]["writable"], true);
        assert_eq!(v["formats"]["parquet"]["type"], "parquet");
    }
}
