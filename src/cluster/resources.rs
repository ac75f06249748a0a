//! `fluxcap cluster upload-resources`: what an EMR cluster needs to read the
//! archive with Drill and Hive, generated from the configuration and put
//! under `cluster.resources` (or written to a local folder to inspect):
//!
//! ```text
//! <resources>/bootstrap-drill.sh                   bootstrap action: Drill from your tarball, checksum verified
//! <resources>/drill/storage-plugins-override.conf  plugin `archive` (file, s3a): workspaces archive + scratch
//! <resources>/drill/hive-plugin.conf               plugin `streams` (type hive: the cluster's metastore; not with Glue)
//! <resources>/hive/register-tables.hql             the archive's tables (partitions by MSCK REPAIR TABLE), and per
//!                                                  stream its live table, positions table and view `<t>_all`
//! <archive>/_fluxcap/drill-scratch/.fluxcap-scratch  makes the scratch workspace exist for Drill
//! <archive>/_fluxcap/drill-views/<stream>.view.drill  Drill's view archive ∪ live per stream (workspace `views`)
//! ```
//!
//! Generating them makes no AWS call (`--output-dir`); uploading writes to
//! `cluster.resources` and the archive.

use std::path::Path;

use crate::archive::store::Archive;
use crate::cluster::catalog::{self, CatalogOptions, Engine};
use crate::cluster::live;
use crate::config::{ArchiveLocation, Config};
use crate::error::{Error, Result};

/// The bootstrap action (a static script; its arguments carry the settings).
pub const BOOTSTRAP_DRILL: &str = include_str!("bootstrap-drill.sh");

/// One generated file: its path under the resources location, and its text.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Path relative to `cluster.resources`.
    pub name: String,
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

/// Where Drill's scratch workspace lives under the archive root (CTAS results of `replay --engine drill`).
pub const SCRATCH_DIR: &str = "_fluxcap/drill-scratch";

/// The marker object that makes the scratch workspace exist on S3: Drill
/// drops a workspace whose location does not exist, and an empty S3 prefix
/// does not (the name starts with `.`, so Drill never reads it as data).
pub const SCRATCH_MARKER: &str = ".fluxcap-scratch";

/// Generate the resources. Only text: no AWS call (the archive's location is
/// read from the configuration, its partitions are found by Hive's `MSCK
/// REPAIR TABLE` on the cluster).
pub fn generate(cfg: &Config) -> Result<Vec<Resource>> {
    location(cfg)?;
    let loc = cfg.location()?;
    if matches!(loc, ArchiveLocation::Local(_)) {
        tracing::warn!(
            "the archive is a local directory ({loc}): a cluster cannot read it; archive to S3 for cluster use"
        );
    }
    let archive_plugin: serde_json::Value = serde_json::from_str(&catalog::drill_plugin(&loc))
        .map_err(|e| Error::Query {
            message: format!("generating the Drill plugin: {e}"),
        })?;
    let plugins = format!(
        "# Drill storage plugins written by `fluxcap cluster upload-resources` (HOCON; Drill\n\
         # reads it at its first start). The bootstrap action appends hive-plugin.conf when\n\
         # the Drill installation has the Hive plugin.\n\
         \"storage\": {{\n  \"archive\": {}\n}}\n",
        serde_json::to_string_pretty(&archive_plugin)
            .unwrap_or_default()
            .replace('\n', "\n  ")
    );
    let mut out = vec![
        Resource {
            name: "bootstrap-drill.sh".into(),
            text: BOOTSTRAP_DRILL.to_string(),
        },
        Resource {
            name: "drill/storage-plugins-override.conf".into(),
            text: plugins,
        },
    ];
    if !cfg.cluster.glue_catalog {
        // Drill's hive plugin speaks Thrift to the cluster's metastore; with
        // Glue as the metastore it would see no tables, so it is left out.
        let hive = serde_json::json!({
            "type": "hive",
            "enabled": true,
            "configProps": {
                "hive.metastore.uris": "thrift://__PRIMARY__:9083",
                "hive.metastore.sasl.enabled": "false",
                "fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem"
            }
        });
        out.push(Resource {
            name: "drill/hive-plugin.conf".into(),
            text: format!(
                "# Drill's hive plugin `streams` (the cluster's Hive metastore: the archive's tables and\n\
                 # the live tables over the streams), added by the bootstrap action\n\
                 \"storage\": {{\n  \"{}\": {}\n}}\n",
                crate::cluster::live::HIVE_PLUGIN,
                serde_json::to_string_pretty(&hive)
                    .unwrap_or_default()
                    .replace('\n', "\n  ")
            ),
        });
    }
    let opts = CatalogOptions::new(Engine::Hive);
    let streams = cfg.selected_streams(None)?;
    let mut hql = catalog::hive_ddl(cfg, &opts, &loc, None)?;
    hql.push_str(&live::hive_live_ddl(
        &cfg.aws.region,
        &streams,
        &opts.database,
        &loc,
    ));
    out.push(Resource {
        name: "hive/register-tables.hql".into(),
        text: hql,
    });
    Ok(out)
}

/// Drill's view definition of each configured stream, by its path below
/// the archive root (see [`live::drill_view_file`]).
pub fn drill_view_files(cfg: &Config) -> Result<Vec<Resource>> {
    let schema = live::default_live_schema(&CatalogOptions::new(Engine::Hive).database);
    Ok(cfg
        .selected_streams(None)?
        .iter()
        .map(|s| Resource {
            name: format!("{}/{}.view.drill", live::VIEWS_DIR, s.name),
            text: live::drill_view_file(&s.name, &schema),
        })
        .collect())
}

/// The bootstrap action's arguments for `cfg` (what `launch` passes EMR).
pub fn bootstrap_args(cfg: &Config) -> Result<Vec<String>> {
    let c = &cfg.cluster;
    let base = base_url(cfg)?;
    let mut args = vec![
        "--tarball".to_string(),
        drill_tarball(cfg)?,
        "--sha256".into(),
        c.drill_sha256.clone(),
        "--version".into(),
        c.drill_version.clone(),
        "--plugins".into(),
        format!("{base}/drill/storage-plugins-override.conf"),
        "--cluster-id".into(),
        c.name.clone(),
    ];
    if !c.glue_catalog {
        args.extend([
            "--hive-plugin".into(),
            format!("{base}/drill/hive-plugin.conf"),
        ]);
    }
    for (flag, v) in [
        ("--heap", &c.drill_heap),
        ("--direct-memory", &c.drill_direct_memory),
        ("--code-cache", &c.drill_code_cache),
    ] {
        if !v.is_empty() {
            args.extend([flag.to_string(), v.clone()]);
        }
    }
    args.extend([
        "--yarn-fraction".into(),
        format!("{}", c.yarn_memory_fraction),
    ]);
    Ok(args)
}

/// `s3://bucket[/prefix]` of `cluster.resources`, without a trailing `/`.
pub fn base_url(cfg: &Config) -> Result<String> {
    let (bucket, prefix) = location(cfg)?;
    Ok(if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    })
}

/// The Drill tarball's location.
pub fn drill_tarball(cfg: &Config) -> Result<String> {
    let c = &cfg.cluster;
    if !c.drill_tarball.is_empty() {
        return Ok(c.drill_tarball.clone());
    }
    Ok(format!(
        "{}/apache-drill-{}.tar.gz",
        base_url(cfg)?,
        c.drill_version
    ))
}

/// Write the resources to `dir` (to inspect them; no AWS call) or upload
/// them to `cluster.resources`, and create the archive's scratch workspace
/// (its marker object); returns where each went.
pub async fn upload(cfg: &Config, dir: Option<&Path>) -> Result<Vec<String>> {
    let files = generate(cfg)?;
    let views = drill_view_files(cfg)?;
    let mut out = Vec::new();
    if let Some(dir) = dir {
        for f in files.iter().chain(&views) {
            let p = dir.join(&f.name);
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
    let archive = Archive::open(cfg).await?;
    out.push(ensure_scratch(&archive).await?);
    for f in &views {
        let p = f
            .name
            .split('/')
            .fold(archive.layout.root().clone(), |p, part| p.join(part));
        archive.put_bytes(&p, f.text.clone().into()).await?;
        out.push(archive.describe(&p));
    }
    Ok(out)
}

/// Create the marker objects of Drill's writable workspaces (scratch and
/// views) under the archive root (a no-op when they exist); where the
/// scratch one is.
pub async fn ensure_scratch(archive: &Archive) -> Result<String> {
    let mut first = None;
    for dir in [SCRATCH_DIR, live::VIEWS_DIR] {
        let p = dir
            .split('/')
            .chain([SCRATCH_MARKER])
            .fold(archive.layout.root().clone(), |p, part| p.join(part));
        archive
            .put_bytes(
                &p,
                "Drill's workspace (fluxcap): this object makes the S3 prefix exist\n"
                    .as_bytes()
                    .to_vec()
                    .into(),
            )
            .await?;
        first.get_or_insert_with(|| archive.describe(&p));
    }
    Ok(first.unwrap_or_default())
}
