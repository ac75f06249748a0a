//! `fluxcap cluster upload-resources`: what an EMR cluster needs to read the
//! archive with Drill and Hive, generated from the configuration and put
//! under `cluster.resources` (or written to a local folder to inspect):
//!
//! ```text
//! <resources>/bootstrap-drill.sh                   bootstrap action: Drill from your tarball, checksum verified
//! <resources>/drill/storage-plugins-override.conf  plugins `archive` (file, s3a) and `hive` (the cluster's metastore)
//! <resources>/hive/register-tables.hql             the archive's tables and partitions (fluxcap catalog hive)
//! ```

use std::path::Path;

use crate::archive::store::Archive;
use crate::cluster::catalog::{self, CatalogOptions, Engine};
use crate::config::{ArchiveLocation, Config};
use crate::error::{Error, Result};

/// The bootstrap action (a static script; its arguments carry the settings).
pub const BOOTSTRAP_DRILL: &str = include_str!("bootstrap-drill.sh");

/// One generated file: its path under the resources location, and its text.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Path relative to `cluster.resources`.
    pub name: &'static str,
    /// Contents.
    pub text: String,
}

/// The resources location, checked.
pub fn location(cfg: &Config) -> Result<(String, String)> {
    let r = cfg.cluster.resources.trim().trim_end_matches('/');
    if r.is_empty() {
        return Err(Error::Config {
            file: "configuration".into(),
            key: "cluster.resources".into(),
            message: "not set: cluster commands need an S3 location such as s3://your-bucket/fluxcap-resources".into(),
        });
    }
    match ArchiveLocation::parse(r) {
        Ok(ArchiveLocation::S3 { bucket, prefix }) => Ok((bucket, prefix)),
        _ => Err(Error::Config {
            file: "configuration".into(),
            key: "cluster.resources".into(),
            message: format!("expected s3://bucket/prefix, got {r:?}"),
        }),
    }
}

/// Generate the resources.
pub async fn generate(cfg: &Config) -> Result<Vec<Resource>> {
    location(cfg)?;
    let archive = Archive::open(cfg).await?;
    if matches!(archive.location, ArchiveLocation::Local(_)) {
        tracing::warn!(
            "the archive is a local directory ({}): a cluster cannot read it; archive to S3 for cluster use",
            archive.location
        );
    }
    let archive_plugin: serde_json::Value = serde_json::from_str(
        &catalog::generate(
            cfg,
            &CatalogOptions {
                engine: Engine::Drill,
                stream: None,
                database: String::new(),
                no_partitions: true,
            },
        )
        .await?,
    )
    .map_err(|e| Error::Query {
        message: format!("generating the Drill plugin: {e}"),
    })?;
    let plugins = serde_json::json!({
        "storage": {
            "archive": archive_plugin,
            "hive": {
                "type": "hive",
                "enabled": true,
                "configProps": {
                    "hive.metastore.uris": "thrift://__PRIMARY__:9083",
                    "hive.metastore.sasl.enabled": "false",
                    "fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem"
                }
            }
        }
    });
    let hql = catalog::generate(
        cfg,
        &CatalogOptions {
            engine: Engine::Hive,
            stream: None,
            database: "kinesis_archive".into(),
            no_partitions: false,
        },
    )
    .await?;
    Ok(vec![
        Resource {
            name: "bootstrap-drill.sh",
            text: BOOTSTRAP_DRILL.to_string(),
        },
        Resource {
            name: "drill/storage-plugins-override.conf",
            text: serde_json::to_string_pretty(&plugins).unwrap_or_default() + "\n",
        },
        Resource {
            name: "hive/register-tables.hql",
            text: hql,
        },
    ])
}

/// The Drill tarball's location.
pub fn drill_tarball(cfg: &Config) -> Result<String> {
    let c = &cfg.cluster;
    if !c.drill_tarball.is_empty() {
        return Ok(c.drill_tarball.clone());
    }
    let (bucket, prefix) = location(cfg)?;
    let base = if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    };
    Ok(format!("{base}/apache-drill-{}.tar.gz", c.drill_version))
}

/// Write the resources to `dir` (to inspect them) or upload them to
/// `cluster.resources`; returns where each went.
pub async fn upload(cfg: &Config, dir: Option<&Path>) -> Result<Vec<String>> {
    let files = generate(cfg).await?;
    let mut out = Vec::new();
    if let Some(dir) = dir {
        for f in &files {
            let p = dir.join(f.name);
            let io = |e| Error::Io {
                path: p.clone(),
                source: e,
            };
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::write(&p, &f.text).map_err(io)?;
            out.push(p.display().to_string());
        }
        return Ok(out);
    }
    let mut c = cfg.clone();
    c.archive.location = cfg.cluster.resources.clone();
    let store = Archive::open(&c).await?;
    for f in &files {
        let p = f
            .name
            .split('/')
            .fold(store.layout.root().clone(), |p, part| p.join(part));
        store.put_bytes(&p, f.text.clone().into()).await?;
        out.push(store.describe(&p));
    }
    Ok(out)
}
