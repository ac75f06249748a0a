//! Configuration: `conf/defaults.toml`, merged with the user's file, the
//! `FLUXCAP_…` environment and command-line flags, in that order.
//!
//! The defaults file is compiled into the binary and is also the reference
//! documentation of every key. A user's file may only contain keys the defaults
//! know (plus the optional ones listed in [`OPTIONAL_KEYS`]); anything else is
//! rejected with the file, the key and what was expected. Values are checked
//! after merging, and an error names the source that set the bad value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The defaults, compiled in.
pub const DEFAULTS_TOML: &str = include_str!("../conf/defaults.toml");
const DEFAULTS_NAME: &str = "conf/defaults.toml (built in)";

/// Keys that are valid but have no default (commented out in the defaults).
pub const OPTIONAL_KEYS: &[&str] = &[
    "aws.profile",
    "aws.kinesis_endpoint",
    "aws.s3_endpoint",
    "aws.emr_endpoint",
    "replay.target_region",
    "replay.target_profile",
    "replay.target_endpoint",
    "server.token",
    "server.token_file",
    "server.tls_cert",
    "server.tls_key",
];

/// Keys of one `[[streams]]` entry, and whether each is required.
const STREAM_KEYS: &[(&str, bool)] = &[("name", true), ("format", false)];

/// Environment variables starting with `FLUXCAP_` that are not configuration keys.
const NON_KEY_ENV: &[&str] = &["FLUXCAP_CONFIG", "FLUXCAP_LOG", "FLUXCAP_STREAMS"];

/// The effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// AWS region, profile and endpoint overrides.
    pub aws: AwsConfig,
    /// Archive location and file format settings.
    pub archive: ArchiveConfig,
    /// Archiver loop settings.
    pub archiver: ArchiverConfig,
    /// `fluxcap status` settings.
    pub status: StatusConfig,
    /// SQL engine settings (`fluxcap sql`, replay, the HTTP API).
    pub query: QueryConfig,
    /// `fluxcap replay` settings.
    pub replay: ReplayConfig,
    /// `fluxcap serve` settings.
    pub server: ServerConfig,
    /// `fluxcap cluster` settings.
    pub cluster: ClusterConfig,
    /// The streams this tool works on.
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
}

/// `[aws]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region of the streams and bucket.
    pub region: String,
    /// Named profile for credentials; `None` uses the default chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Kinesis endpoint override (local emulator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinesis_endpoint: Option<String>,
    /// S3 endpoint override (local S3 server, path-style addressing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// EMR endpoint override (local EMR control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emr_endpoint: Option<String>,
}

/// `[archive]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Local directory or `s3://bucket/prefix`.
    pub location: String,
    /// zstd level, 1..=22.
    pub zstd_level: i32,
    /// Maximum rows per row group (≥ 1).
    pub row_group_rows: usize,
    /// Data page size limit before compression.
    pub data_page_size: ByteSize,
    /// Bloom filters on partition_key and sequence_number.
    pub bloom_filters: bool,
    /// When committed files appear under `dt=…/hr=…/`.
    pub publish: PublishMode,
    /// With `publish = "hour"`: the size of the files a closed hour is
    /// published as (a shard's flushes of the hour are merged up to it).
    pub publish_target_size: ByteSize,
    /// When buffered records are written out.
    pub flush: FlushConfig,
}

/// `archive.publish`: when committed files are published.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// Every flush's files, right after its commit.
    #[default]
    Flush,
    /// A shard's committed flushes of an hour, merged, once the hour is closed.
    Hour,
}

/// `[archive.flush]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushConfig {
    /// Buffered payload bytes per shard that close its files.
    pub max_bytes: ByteSize,
    /// Oldest buffered record age that closes its files.
    pub max_age: HumanDuration,
    /// Memory for buffered records across all shards.
    pub memory_budget: ByteSize,
}

/// `[archiver]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiverConfig {
    /// Pause after an empty GetRecords.
    pub poll_interval: HumanDuration,
    /// GetRecords `Limit`, 1..=10000.
    pub max_records_per_call: i32,
    /// GetRecords calls per second and shard the archiver may make, in
    /// (0, 5]: its share of the shard's 5 calls/s (all consumers together).
    pub max_reads_per_second: f64,
    /// Period of shard re-discovery.
    pub shard_discovery_interval: HumanDuration,
    /// Lease lifetime without renewal.
    pub lease_ttl: HumanDuration,
    /// Share each stream with other `fluxcap archive --shared` processes:
    /// shards are claimed one by one and balanced across the live archivers
    /// (see `archive::archiver::workers`) instead of one process per stream.
    #[serde(default)]
    pub shared: bool,
    /// Backoff cap.
    pub max_backoff: HumanDuration,
    /// Prometheus endpoint address; empty disables.
    pub metrics_bind: String,
    /// Allow `metrics_bind` on a non-loopback address (the endpoint has no token).
    pub metrics_public: bool,
    /// Period of progress log lines when not on a terminal.
    pub progress_interval: HumanDuration,
    /// How shards are read: GetRecords polling or enhanced fan-out.
    pub read: ReadMode,
    /// Name of the enhanced fan-out consumer registered on each stream
    /// (`read = "fanout"`).
    pub consumer_name: String,
}

/// `archiver.read`: how the archiver reads shards.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// GetShardIterator and GetRecords, paced to `max_reads_per_second`.
    #[default]
    Polling,
    /// Enhanced fan-out: a registered consumer and SubscribeToShard (HTTP/2
    /// on AWS), records pushed to the archiver at up to 2 MiB/s per shard.
    Fanout,
}

/// `[status]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Warn when the oldest unarchived record is this close to expiring.
    pub retention_warning: HumanDuration,
}

/// `[query]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// Partitions a query is split into; 0 means four per CPU core.
    pub target_partitions: usize,
    /// Memory the engine may hold before spilling to disk; 0 means no limit.
    pub memory_limit: ByteSize,
    /// Consecutive failed Kinesis calls after which a live read fails the
    /// query (throttled calls are waited for, not counted).
    pub live_retry_attempts: u32,
    /// Share of each shard's read limits (5 GetRecords calls/s, 2 MiB/s)
    /// that query-time live reads (`live.S`, `S`, replays) may use, in (0, 1].
    pub live_read_share: f64,
    /// Longest SQL text accepted (`fluxcap sql`, replay's `--where`/`--key`/`--tombstone`, the API).
    pub max_statement_bytes: ByteSize,
    /// Deepest nesting of expressions, subqueries, set operations and joins accepted.
    pub max_expression_depth: usize,
}

/// `[replay]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// JSON field added to replayed JSON payloads.
    pub annotation_field: String,
    /// Save progress after this many acknowledged records.
    pub checkpoint_records: u64,
    /// Save progress at least this often.
    pub checkpoint_interval: HumanDuration,
    /// The target's write limit per shard, records per second (0: no pacing).
    pub shard_records_per_second: u32,
    /// The target's write limit per shard, bytes per second (0: no pacing).
    pub shard_bytes_per_second: ByteSize,
    /// Largest record the target accepts (payload + partition key).
    pub max_record_size: ByteSize,
    /// Consecutive failed PutRecords attempts of one record before a replay stops.
    pub retry_attempts: u32,
    /// Share of the per-shard limits a replay into its own source stream
    /// starts at and never exceeds, in (0, 1].
    pub same_stream_share: f64,
    /// Region of `kinesis://` targets (default: `aws.region`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_region: Option<String>,
    /// Credentials profile for `kinesis://` targets (another account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_profile: Option<String>,
    /// Endpoint of `kinesis://` targets (default: `aws.kinesis_endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_endpoint: Option<String>,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address `fluxcap serve` listens on.
    pub bind: String,
    /// Bearer token every API call must carry (generated at start when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Most rows `POST /api/sql` returns as JSON (CSV and Arrow downloads are not limited).
    pub max_rows: usize,
    /// Largest request body accepted.
    pub max_request_bytes: ByteSize,
    /// File the generated token is written to (mode 0600) when no token is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// PEM certificate chain: with `tls_key`, the server speaks HTTPS only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// Allow plain HTTP on a non-loopback address (TLS ends at a proxy in front).
    pub allow_plain_http: bool,
    /// A query running longer is stopped and answered with 408.
    pub query_timeout: HumanDuration,
    /// Queries running at once; 0 means one per CPU core.
    pub max_concurrent_queries: usize,
    /// How long a query waits for a free slot before a 503.
    pub query_queue_timeout: HumanDuration,
    /// Memory all queries of the server share before spilling (0: no limit).
    pub memory_limit: ByteSize,
    /// Largest JSON answer of `POST /api/sql` (rows beyond are cut, `truncated`).
    pub max_response_bytes: ByteSize,
    /// Most rows one `range`/`generate_series` call may produce.
    pub max_series_rows: u64,
    /// Recursive CTEs (`WITH RECURSIVE`) in the server's queries.
    pub recursive_ctes: bool,
    /// A client must send a request's headers within this (also the keep-alive idle limit).
    pub header_read_timeout: HumanDuration,
    /// A client that sends no request body bytes or reads no response bytes for this long is dropped.
    pub idle_timeout: HumanDuration,
    /// Open connections at most; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Replays started through the API that may run at once.
    pub max_running_replays: usize,
}

/// `[cluster]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `s3://bucket/prefix` the cluster's bootstrap scripts and configuration
    /// go to (no default: cluster commands need it).
    pub resources: String,
    /// Apache Drill version the bootstrap action installs.
    pub drill_version: String,
    /// The Drill tarball (default `<resources>/apache-drill-<version>.tar.gz`).
    pub drill_tarball: String,
    /// SHA-256 of the tarball; the bootstrap action refuses any other file.
    pub drill_sha256: String,
    /// Drill's heap on each node ("": sized from the node's memory).
    pub drill_heap: String,
    /// Drill's direct memory on each node ("": sized from the node's memory).
    pub drill_direct_memory: String,
    /// Drill's code cache ("": 512M).
    pub drill_code_cache: String,
    /// Share of a core or task node's memory YARN's containers take (Drill sizes itself from the rest).
    pub yarn_memory_fraction: f64,
    /// Cluster name (also the Drill cluster id).
    pub name: String,
    /// EMR release.
    pub release_label: String,
    /// Applications besides Drill.
    pub applications: Vec<String>,
    /// Primary node instance type.
    pub primary_instance_type: String,
    /// Core nodes: instance type and count.
    pub core_instance_type: String,
    /// Number of core nodes.
    pub core_instance_count: i32,
    /// Spot task nodes: instance type and count (0: none).
    pub task_instance_type: String,
    /// Number of spot task nodes.
    pub task_spot_count: i32,
    /// EMR service role.
    pub service_role: String,
    /// EC2 instance profile of the nodes.
    pub instance_profile: String,
    /// EC2 key pair for SSH ("": none).
    pub key_pair: String,
    /// Subnet ("": the default VPC).
    pub subnet_id: String,
    /// Log location ("": <resources>/logs/).
    pub log_uri: String,
    /// The cluster terminates itself after this long idle.
    pub idle_timeout: HumanDuration,
    /// Use the Glue Data Catalog as the Hive metastore.
    pub glue_catalog: bool,
    /// Tags, as "Key=Value".
    pub tags: Vec<String>,
    /// Extra EMR configurations, as the JSON list EMR takes ("": none).
    pub configurations_json: String,
    /// The SSH program `cluster ssh` and `cluster tunnel` run.
    pub ssh_command: String,
    /// Private key file for SSH ("": ssh's default).
    pub ssh_key_file: String,
}

/// One `[[streams]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Kinesis stream name.
    pub name: String,
    /// Payload format.
    #[serde(default)]
    pub format: PayloadFormat,
}

/// How payloads of a stream are interpreted (never how they are stored: the
/// archive always keeps the exact bytes).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// JSON documents; invalid ones are archived as-is and counted.
    #[default]
    Json,
    /// Opaque bytes.
    Binary,
}

/// A byte count, written as an integer or with a unit (`"128MiB"`, `"64 KB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parse `"128MiB"`, `"1 GB"`, `"4096"`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("expected a size such as \"128MiB\" or 4096, got {s:?}"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (use B, KB, KiB, MB, MiB, GB, GiB)"
                ));
            }
        };
        Ok(ByteSize((n * mult as f64) as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{}{unit}", b / size);
            }
        }
        write!(f, "{b}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a size: an integer number of bytes or a string such as \"128MiB\"",
            )
        })? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as `"500ms"`, `"90s"`, `"5m"`, `"2h"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parse `"500ms"`, `"90s"`, `"5m"`, `"1h30m"`, `"2d"`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let err = || {
            format!(
                "expected a duration such as \"500ms\", \"90s\", \"5m\", \"2h\" or \"7d\", got {s:?}"
            )
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err());
        }
        let mut total = Duration::ZERO;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(err());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            total += match unit.trim() {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" | "min" => Duration::from_secs(n * 60),
                "h" => Duration::from_secs(n * 3600),
                "d" => Duration::from_secs(n * 86400),
                _ => return Err(err()),
            };
        }
        Ok(HumanDuration(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis() as u64;
        if ms == 0 {
            return write!(f, "0s");
        }
        for (unit, size) in [
            ("d", 86_400_000u64),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration string such as \"90s\" or \"5m\"")
        })?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where the archive lives, parsed from `archive.location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveLocation {
    /// A local directory (absolute after [`ArchiveLocation::parse`]).
    Local(PathBuf),
    /// An S3 bucket and key prefix (no leading or trailing `/`; may be empty).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix.
        prefix: String,
    },
}

impl ArchiveLocation {
    /// Parse a plain path, `file://` URL or `s3://bucket/prefix`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("expected a directory or s3://bucket/prefix, got an empty string".into());
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "expected s3://bucket/prefix, got {s:?} (no bucket)"
                ));
            }
            let prefix = prefix.trim_matches('/');
            // Stored state names objects by their keys: a prefix must be the
            // same before and after URL encoding, or keys would not round-trip.
            let plain = object_store::path::Path::parse(prefix).is_ok_and(|p| {
                p.as_ref() == prefix && object_store::path::Path::from(prefix).as_ref() == prefix
            });
            if !plain {
                return Err(format!(
                    "the prefix {prefix:?} of {s:?} needs URL encoding: use letters, digits, `-`, `_`, `.` and `/` only"
                ));
            }
            return Ok(ArchiveLocation::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if s.contains("://") && !s.starts_with("file://") {
            return Err(format!(
                "unsupported scheme in {s:?}: expected a path, file:// or s3://"
            ));
        }
        let path: PathBuf = PathBuf::from(s.strip_prefix("file://").unwrap_or(s))
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        let abs = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .map_err(|e| format!("cannot resolve relative path {s:?}: {e}"))?
                .join(path)
        };
        Ok(ArchiveLocation::Local(abs))
    }
}

impl fmt::Display for ArchiveLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveLocation::Local(p) => write!(f, "{}", p.display()),
            ArchiveLocation::S3 { bucket, prefix } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            ArchiveLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Where each effective value came from, for error messages.
#[derive(Debug, Default, Clone)]
struct Provenance(BTreeMap<String, String>);

impl Provenance {
    fn source_of(&self, key: &str) -> String {
        // Longest recorded prefix of the key wins (e.g. `streams` for `streams[0].name`).
        let mut k = key.to_string();
        loop {
            if let Some(s) = self.0.get(&k) {
                return s.clone();
            }
            match k.rfind(['.', '[']) {
                Some(i) => k.truncate(i),
                None => return DEFAULTS_NAME.to_string(),
            }
        }
    }
}

/// Inputs to [`load`] besides the built-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// The user's file (`--config` / `FLUXCAP_CONFIG`).
    pub file: Option<PathBuf>,
    /// Environment variables to consider (normally `std::env::vars()`).
    pub env: Vec<(String, String)>,
    /// `key=value` overrides from command-line flags, applied last.
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// The user's file plus the process environment.
    pub fn from_env(file: Option<PathBuf>) -> Self {
        Sources {
            file,
            env: std::env::vars()
                .filter(|(k, _)| k.starts_with("FLUXCAP_"))
                .collect(),
            overrides: Vec::new(),
        }
    }
}

/// Load the effective configuration from the defaults and `sources`.
pub fn load(sources: &Sources) -> Result<Config> {
    let defaults: toml::Table = toml::from_str(DEFAULTS_TOML).map_err(|e| Error::ConfigFile {
        file: DEFAULTS_NAME.into(),
        message: e.to_string(),
    })?;
    let mut merged = defaults.clone();
    let mut prov = Provenance::default();

    if let Some(path) = &sources.file {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let user: toml::Table = toml::from_str(&text).map_err(|e| Error::ConfigFile {
            file: file.clone(),
            message: e.to_string(),
        })?;
        check_known_keys(&user, &defaults, "", &file)?;
        merge(&mut merged, user, "", &file, &mut prov);
    }

    for (var, value) in &sources.env {
        if var == "FLUXCAP_STREAMS" {
            let streams = parse_streams_list(value).map_err(|message| Error::Config {
                file: "environment variable FLUXCAP_STREAMS".into(),
                key: "streams".into(),
                message,
            })?;
            merged.insert("streams".into(), streams);
            prov.0.insert(
                "streams".into(),
                "environment variable FLUXCAP_STREAMS".into(),
            );
            continue;
        }
        if NON_KEY_ENV.contains(&var.as_str()) {
            continue;
        }
        let Some(key) = env_to_key(var, &defaults) else {
            tracing::warn!("ignoring unknown environment variable {var}");
            continue;
        };
        let src = format!("environment variable {var}");
        set_key(&mut merged, &defaults, &key, value, &src, &mut prov)?;
    }

    for (key, value) in &sources.overrides {
        let src = format!("command-line flag for `{key}`");
        if !all_keys(&defaults).contains(key) {
            return Err(Error::Config {
                file: src,
                key: key.clone(),
                message: "unknown key".into(),
            });
        }
        set_key(&mut merged, &defaults, key, value, &src, &mut prov)?;
    }

    let de = toml::Value::Table(merged);
    let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        Error::Config {
            file: prov.source_of(&key),
            message: e.into_inner().to_string(),
            key,
        }
    })?;
    validate(&cfg, &prov)?;
    Ok(cfg)
}

fn parse_streams_list(s: &str) -> std::result::Result<toml::Value, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (name, format) = item.split_once(':').unwrap_or((item, "json"));
        let mut t = toml::Table::new();
        t.insert("name".into(), toml::Value::String(name.into()));
        t.insert("format".into(), toml::Value::String(format.into()));
        out.push(toml::Value::Table(t));
    }
    if out.is_empty() {
        return Err("expected a comma-separated list of name[:json|binary]".into());
    }
    Ok(toml::Value::Array(out))
}

/// Every dotted key the configuration accepts (streams excluded).
fn all_keys(defaults: &toml::Table) -> Vec<String> {
    fn walk(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(sub) => walk(sub, &key, out),
                _ => out.push(key),
            }
        }
    }
    let mut out = Vec::new();
    walk(defaults, "", &mut out);
    out.extend(OPTIONAL_KEYS.iter().map(|s| s.to_string()));
    out
}

fn env_to_key(var: &str, defaults: &toml::Table) -> Option<String> {
    let rest = var.strip_prefix("FLUXCAP_")?;
    all_keys(defaults)
        .into_iter()
        .find(|k| k.replace('.', "_").eq_ignore_ascii_case(rest))
}

fn lookup<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut cur = t;
    let mut parts = key.split('.').peekable();
    while let Some(p) = parts.next() {
        let v = cur.get(p)?;
        if parts.peek().is_none() {
            return Some(v);
        }
        cur = v.as_table()?;
    }
    None
}

fn set_key(
    merged: &mut toml::Table,
    defaults: &toml::Table,
    key: &str,
    raw: &str,
    src: &str,
    prov: &mut Provenance,
) -> Result<()> {
    // The default's type decides how the text is read: strings stay strings,
    // everything else is parsed as a TOML value.
    let value = match lookup(defaults, key) {
        None | Some(toml::Value::String(_)) => toml::Value::String(raw.to_string()),
        Some(_) => {
            let doc = format!("v = {raw}");
            match toml::from_str::<toml::Table>(&doc) {
                Ok(mut t) => t
                    .remove("v")
                    .unwrap_or(toml::Value::String(raw.to_string())),
                Err(_) => toml::Value::String(raw.to_string()),
            }
        }
    };
    let mut cur = merged;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| Error::Config {
            file: src.to_string(),
            key: key.to_string(),
            message: "not a table".into(),
        })?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    prov.0.insert(key.to_string(), src.to_string());
    Ok(())
}

fn check_known_keys(
    user: &toml::Table,
    defaults: &toml::Table,
    prefix: &str,
    file: &str,
) -> Result<()> {
    for (k, v) in user {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if key == "streams" {
            check_streams(v, file)?;
            continue;
        }
        match defaults.get(k) {
            Some(toml::Value::Table(dsub)) => match v {
                toml::Value::Table(usub) => check_known_keys(usub, dsub, &key, file)?,
                _ => {
                    return Err(Error::Config {
                        file: file.into(),
                        key,
                        message: "expected a table (a [section])".into(),
                    });
                }
            },
            Some(_) => {}
            None if OPTIONAL_KEYS.contains(&key.as_str()) => {}
            None => {
                let mut expected: Vec<String> = defaults.keys().cloned().collect();
                expected.extend(
                    OPTIONAL_KEYS
                        .iter()
                        .filter_map(|o| o.strip_prefix(&format!("{prefix}.")))
                        .filter(|o| !o.contains('.'))
                        .map(str::to_string),
                );
                if prefix.is_empty() {
                    expected.push("streams".into());
                }
                expected.sort();
                return Err(Error::Config {
                    file: file.into(),
                    key,
                    message: format!("unknown key; expected one of: {}", expected.join(", ")),
                });
            }
        }
    }
    Ok(())
}

fn check_streams(v: &toml::Value, file: &str) -> Result<()> {
    let arr = v.as_array().ok_or_else(|| Error::Config {
        file: file.into(),
        key: "streams".into(),
        message: "expected an array of tables ([[streams]] entries)".into(),
    })?;
    for (i, s) in arr.iter().enumerate() {
        let t = s.as_table().ok_or_else(|| Error::Config {
            file: file.into(),
            key: format!("streams[{i}]"),
            message: "expected a table with `name` and `format`".into(),
        })?;
        for k in t.keys() {
            if !STREAM_KEYS.iter().any(|(n, _)| n == k) {
                return Err(Error::Config {
                    file: file.into(),
                    key: format!("streams[{i}].{k}"),
                    message: "unknown key; expected one of: name, format".into(),
                });
            }
        }
        for (n, required) in STREAM_KEYS {
            if *required && !t.contains_key(*n) {
                return Err(Error::Config {
                    file: file.into(),
                    key: format!("streams[{i}].{n}"),
                    message: "missing required key".into(),
                });
            }
        }
    }
    Ok(())
}

fn merge(
    base: &mut toml::Table,
    over: toml::Table,
    prefix: &str,
    src: &str,
    prov: &mut Provenance,
) {
    for (k, v) in over {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o, &key, src, prov),
            (_, v) => {
                prov.0.insert(key, src.to_string());
                base.insert(k, v);
            }
        }
    }
}

fn validate(cfg: &Config, prov: &Provenance) -> Result<()> {
    let bad = |key: &str, message: String| Error::Config {
        file: prov.source_of(key),
        key: key.to_string(),
        message,
    };
    if cfg.aws.region.trim().is_empty() {
        return Err(bad(
            "aws.region",
            "expected a region such as \"us-east-1\"".into(),
        ));
    }
    for (key, ep) in [
        ("aws.kinesis_endpoint", &cfg.aws.kinesis_endpoint),
        ("aws.s3_endpoint", &cfg.aws.s3_endpoint),
        ("aws.emr_endpoint", &cfg.aws.emr_endpoint),
    ] {
        if let Some(ep) = ep {
            let u = url::Url::parse(ep)
                .map_err(|e| bad(key, format!("expected an http(s) URL, got {ep:?}: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(bad(key, format!("expected an http(s) URL, got {ep:?}")));
            }
        }
    }
    ArchiveLocation::parse(&cfg.archive.location).map_err(|m| bad("archive.location", m))?;
    if cfg.server.bind.parse::<std::net::SocketAddr>().is_err() {
        return Err(bad(
            "server.bind",
            format!(
                "expected an address such as 127.0.0.1:8080, got {:?}",
                cfg.server.bind
            ),
        ));
    }
    let sv = &cfg.server;
    if let Some(t) = &sv.token
        && t.trim().chars().count() < 32
    {
        return Err(bad(
            "server.token",
            "expected at least 32 characters (for example `openssl rand -hex 16`)".into(),
        ));
    }
    if sv.max_rows == 0 {
        return Err(bad("server.max_rows", "expected a positive number".into()));
    }
    if sv.tls_cert.is_some() != sv.tls_key.is_some() {
        let key = if sv.tls_cert.is_some() {
            "server.tls_key"
        } else {
            "server.tls_cert"
        };
        return Err(bad(
            key,
            "server.tls_cert and server.tls_key go together: set both or neither".into(),
        ));
    }
    for (key, d) in [
        ("server.query_timeout", sv.query_timeout),
        ("server.header_read_timeout", sv.header_read_timeout),
        ("server.idle_timeout", sv.idle_timeout),
    ] {
        if d.0.is_zero() {
            return Err(bad(key, "expected a positive duration".into()));
        }
    }
    for (key, n) in [
        ("server.max_connections", sv.max_connections),
        ("server.max_running_replays", sv.max_running_replays),
        ("query.max_expression_depth", cfg.query.max_expression_depth),
    ] {
        if n == 0 {
            return Err(bad(key, "expected a positive number".into()));
        }
    }
    if sv.max_series_rows == 0 {
        return Err(bad(
            "server.max_series_rows",
            "expected a positive number".into(),
        ));
    }
    if sv.max_response_bytes.0 < 1024 {
        return Err(bad(
            "server.max_response_bytes",
            "expected at least 1KiB".into(),
        ));
    }
    if cfg.query.max_statement_bytes.0 < 64 {
        return Err(bad(
            "query.max_statement_bytes",
            "expected at least 64 bytes".into(),
        ));
    }
    let c = &cfg.cluster;
    let idle = c.idle_timeout.0.as_secs();
    if !(60..=604_800).contains(&idle) || c.idle_timeout.0.subsec_nanos() != 0 {
        return Err(bad(
            "cluster.idle_timeout",
            format!(
                "EMR's idle auto-termination takes whole seconds from 60s to 7d, got {}s",
                c.idle_timeout.0.as_secs_f64()
            ),
        ));
    }
    for (key, v) in [
        ("cluster.drill_heap", &c.drill_heap),
        ("cluster.drill_direct_memory", &c.drill_direct_memory),
        ("cluster.drill_code_cache", &c.drill_code_cache),
    ] {
        let ok = v.is_empty()
            || (v.len() >= 2
                && v[..v.len() - 1].chars().all(|x| x.is_ascii_digit())
                && v.ends_with(['K', 'M', 'G', 'k', 'm', 'g']));
        if !ok {
            return Err(bad(
                key,
                format!(
                    "expected a size such as \"512M\" or \"8G\" (or \"\" to size it from the node), got {v:?}"
                ),
            ));
        }
    }
    if !(0.0..0.95).contains(&c.yarn_memory_fraction) {
        return Err(bad(
            "cluster.yarn_memory_fraction",
            format!(
                "expected a share from 0 to 0.95, got {}",
                c.yarn_memory_fraction
            ),
        ));
    }
    let share = cfg.query.live_read_share;
    if !(share > 0.0 && share <= 1.0) {
        return Err(bad(
            "query.live_read_share",
            format!("expected a share of the shard read limits above 0 and at most 1, got {share}"),
        ));
    }
    let r = &cfg.replay;
    if r.annotation_field.is_empty() {
        return Err(bad(
            "replay.annotation_field",
            "expected a JSON field name".into(),
        ));
    }
    if r.checkpoint_records == 0 {
        return Err(bad(
            "replay.checkpoint_records",
            "expected a positive number of records".into(),
        ));
    }
    if !(r.same_stream_share > 0.0 && r.same_stream_share <= 1.0) {
        return Err(bad(
            "replay.same_stream_share",
            format!(
                "expected a share of the limits above 0 and at most 1, got {}",
                r.same_stream_share
            ),
        ));
    }
    if r.retry_attempts == 0 {
        return Err(bad(
            "replay.retry_attempts",
            "expected a positive number of attempts".into(),
        ));
    }
    if r.max_record_size.0 == 0 {
        return Err(bad(
            "replay.max_record_size",
            "expected a positive size".into(),
        ));
    }
    if let Some(ep) = &r.target_endpoint
        && !(ep.starts_with("http://") || ep.starts_with("https://"))
    {
        return Err(bad(
            "replay.target_endpoint",
            format!("expected an http(s) URL, got {ep:?}"),
        ));
    }
    if !(1..=22).contains(&cfg.archive.zstd_level) {
        return Err(bad(
            "archive.zstd_level",
            format!(
                "expected an integer from 1 to 22, got {}",
                cfg.archive.zstd_level
            ),
        ));
    }
    if cfg.archive.row_group_rows == 0 {
        return Err(bad(
            "archive.row_group_rows",
            "expected a positive number of rows".into(),
        ));
    }
    if cfg.archive.data_page_size.0 < 1024 {
        return Err(bad(
            "archive.data_page_size",
            "expected at least 1KiB".into(),
        ));
    }
    if cfg.archive.publish_target_size.0 < (1 << 20) {
        return Err(bad(
            "archive.publish_target_size",
            "expected at least 1MiB".into(),
        ));
    }
    let f = &cfg.archive.flush;
    if f.memory_budget.0 < (1 << 20) {
        return Err(bad(
            "archive.flush.memory_budget",
            "expected at least 1MiB".into(),
        ));
    }
    if f.max_bytes.0 == 0 {
        return Err(bad(
            "archive.flush.max_bytes",
            "expected a positive size".into(),
        ));
    }
    // One hour's buffer is one Arrow batch: its payload column must stay
    // below Arrow's 2 GiB offset limit, with room for the read that crosses it.
    if f.max_bytes.0 > (1 << 30) {
        return Err(bad(
            "archive.flush.max_bytes",
            "expected at most 1GiB (a flush is one Arrow batch, limited to 2 GiB of payloads)"
                .into(),
        ));
    }
    if f.max_age.0.is_zero() {
        return Err(bad(
            "archive.flush.max_age",
            "expected a positive duration".into(),
        ));
    }
    let a = &cfg.archiver;
    if !(a.max_reads_per_second > 0.0 && a.max_reads_per_second <= 5.0) {
        return Err(bad(
            "archiver.max_reads_per_second",
            format!(
                "expected more than 0 and at most 5 (Kinesis allows 5 GetRecords calls per second per shard), got {}",
                a.max_reads_per_second
            ),
        ));
    }
    let consumer_ok = !a.consumer_name.is_empty()
        && a.consumer_name.len() <= 128
        && a.consumer_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !consumer_ok {
        return Err(bad(
            "archiver.consumer_name",
            format!(
                "expected a Kinesis consumer name (1-128 of a-z A-Z 0-9 _ . -), got {:?}",
                a.consumer_name
            ),
        ));
    }
    if !(1..=10_000).contains(&a.max_records_per_call) {
        return Err(bad(
            "archiver.max_records_per_call",
            format!(
                "expected an integer from 1 to 10000, got {}",
                a.max_records_per_call
            ),
        ));
    }
    if a.lease_ttl.0 < Duration::from_secs(2) {
        return Err(bad("archiver.lease_ttl", "expected at least 2s".into()));
    }
    if !a.metrics_bind.is_empty() {
        let addr = a.metrics_bind.parse::<SocketAddr>().map_err(|_| {
            bad(
                "archiver.metrics_bind",
                format!(
                    "expected an address such as \"127.0.0.1:9464\" or \"\", got {:?}",
                    a.metrics_bind
                ),
            )
        })?;
        if !addr.ip().is_loopback() && !a.metrics_public {
            return Err(bad(
                "archiver.metrics_bind",
                format!(
                    "{addr} is not a loopback address and /metrics has no token: \
                     set archiver.metrics_public = true to expose it anyway"
                ),
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, s) in cfg.streams.iter().enumerate() {
        let ok = !s.name.is_empty()
            && s.name.len() <= 128
            && s.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && !s.name.starts_with(['_', '.']);
        if !ok {
            return Err(bad(
                &format!("streams[{i}].name"),
                format!(
                    "expected a Kinesis stream name (1-128 of a-z A-Z 0-9 _ . -, not starting with _ or .), got {:?}",
                    s.name
                ),
            ));
        }
        if s.name == crate::archive::layout::POSITIONS_DIR {
            return Err(bad(
                &format!("streams[{i}].name"),
                format!(
                    "{:?} is the archive's folder of positions tables: archive this stream under another root (archive.location)",
                    s.name
                ),
            ));
        }
        if !seen.insert(&s.name) {
            return Err(bad(
                &format!("streams[{i}].name"),
                format!("stream {:?} is listed twice", s.name),
            ));
        }
    }
    Ok(())
}

impl Config {
    /// The parsed archive location (validated by [`load`]).
    pub fn location(&self) -> Result<ArchiveLocation> {
        ArchiveLocation::parse(&self.archive.location).map_err(|message| Error::Config {
            file: "effective configuration".into(),
            key: "archive.location".into(),
            message,
        })
    }

    /// The configured stream called `name`.
    pub fn stream(&self, name: &str) -> Result<&StreamConfig> {
        self.streams.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.streams.iter().map(|s| s.name.as_str()).collect();
            Error::Usage(format!(
                "stream `{name}` is not configured; configured streams: {}",
                if known.is_empty() {
                    "(none)".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    /// The streams selected by an optional `--stream` filter; an error when none is configured.
    pub fn selected_streams(&self, filter: Option<&str>) -> Result<Vec<StreamConfig>> {
        if let Some(name) = filter {
            return Ok(vec![self.stream(name)?.clone()]);
        }
        if self.streams.is_empty() {
            return Err(Error::Usage(
                "no streams configured: add a [[streams]] entry to your configuration file \
                 (see conf/defaults.toml) or set FLUXCAP_STREAMS=name[:json|binary],..."
                    .into(),
            ));
        }
        Ok(self.streams.clone())
    }

    /// The effective configuration as TOML, for `fluxcap config show`.
    /// Credentials never appear in the configuration; URLs are shown without user info.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.server.token.is_some() {
            shown.server.token = Some("(set; not shown)".into());
        }
        for ep in [&mut shown.aws.kinesis_endpoint, &mut shown.aws.s3_endpoint] {
            if let Some(e) = ep
                && let Ok(mut u) = url::Url::parse(e)
                && (!u.username().is_empty() || u.password().is_some())
            {
                let _ = u.set_username("");
                let _ = u.set_password(None);
                *e = u.to_string();
            }
        }
        toml::to_string_pretty(&shown)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(user: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("user.toml");
        std::fs::write(&p, user).unwrap();
        load(&Sources {
            file: Some(p),
            env: vec![],
            overrides: vec![],
        })
    }

    #[test]
    fn server_hardening_keys_are_checked() {
        let cfg = load(&Sources::default()).unwrap();
        assert_eq!(cfg.server.query_timeout.0, Duration::from_secs(300));
        assert_eq!(cfg.server.max_concurrent_queries, 0);
        assert_eq!(cfg.server.memory_limit.0, 1 << 30);
        assert!(!cfg.server.recursive_ctes && !cfg.server.allow_plain_http);
        assert_eq!(cfg.query.max_expression_depth, 256);
        assert!(!cfg.archiver.metrics_public);
        for (toml, key) in [
            ("[server]\ntoken = \"0123456789abcdef0123\"", "server.token"),
            ("[server]\ntls_cert = \"c.pem\"", "server.tls_key"),
            ("[server]\nquery_timeout = \"0s\"", "server.query_timeout"),
            ("[server]\nmax_connections = 0", "server.max_connections"),
            (
                "[server]\nmax_running_replays = 0",
                "server.max_running_replays",
            ),
            (
                "[query]\nmax_expression_depth = 0",
                "query.max_expression_depth",
            ),
            (
                "[archiver]\nmetrics_bind = \"0.0.0.0:9464\"",
                "archiver.metrics_bind",
            ),
        ] {
            let e = load_str(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        let ok = load_str(
            "[server]\ntoken = \"0123456789abcdef0123456789abcdef\"\ntls_cert = \"c\"\ntls_key = \"k\"\n\
             [archiver]\nmetrics_bind = \"0.0.0.0:9464\"\nmetrics_public = true",
        )
        .unwrap();
        assert_eq!(ok.server.tls_key.as_deref(), Some("k"));
    }

    #[test]
    fn live_read_share_is_a_share_of_the_limits() {
        let cfg = load(&Sources::default()).unwrap();
        assert_eq!(cfg.query.live_read_share, 0.4);
        assert_eq!(
            load_str("[query]\nlive_read_share = 1.0")
                .unwrap()
                .query
                .live_read_share,
            1.0
        );
        for bad in ["0", "-0.5", "1.5", "nan", "inf"] {
            let e = load_str(&format!("[query]\nlive_read_share = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("query.live_read_share"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_load_and_document_every_key() {
        let cfg = load(&Sources::default()).unwrap();
        assert_eq!(cfg.aws.region, "us-east-1");
        assert_eq!(cfg.archive.location, "./data/archive");
        assert_eq!(cfg.archive.zstd_level, 3);
        assert!(cfg.streams.is_empty());
        for k in OPTIONAL_KEYS {
            let leaf = k.rsplit('.').next().unwrap();
            assert!(
                DEFAULTS_TOML.contains(&format!("# {leaf} = ")),
                "{k} undocumented"
            );
        }
    }

    #[test]
    fn user_file_overrides_and_streams() {
        let cfg = load_str(
            "[aws]\nregion = \"eu-west-1\"\nkinesis_endpoint = \"http://127.0.0.1:4568\"\n\
             [archive.flush]\nmax_bytes = \"8MiB\"\n[[streams]]\nname = \"orders\"\nformat = \"json\"\n\
             [[streams]]\nname = \"blobs\"\nformat = \"binary\"\n",
        )
        .unwrap();
        assert_eq!(cfg.aws.region, "eu-west-1");
        assert_eq!(cfg.archive.flush.max_bytes, ByteSize(8 << 20));
        assert_eq!(
            cfg.archive.flush.max_age,
            HumanDuration(Duration::from_secs(300))
        );
        assert_eq!(cfg.streams.len(), 2);
        assert_eq!(cfg.streams[1].format, PayloadFormat::Binary);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = load_str("[archive]\nlocaton = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("user.toml"), "{msg}");
        assert!(msg.contains("archive.locaton"), "{msg}");
        assert!(msg.contains("location"), "{msg}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn invalid_value_names_key_and_expectation() {
        let msg = load_str("[archive]\nzstd_level = 40\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("archive.zstd_level")
                && msg.contains("1 to 22")
                && msg.contains("user.toml"),
            "{msg}"
        );
        let msg = load_str("[archive]\nzstd_level = \"high\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("archive.zstd_level") && msg.contains("user.toml"),
            "{msg}"
        );
        let msg = load_str("[[streams]]\nname = \"o\"\nformat = \"xml\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("streams[0].format") && msg.contains("json"),
            "{msg}"
        );
        let msg = load_str("[archive.flush]\nmax_age = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("archive.flush.max_age") && msg.contains("duration"),
            "{msg}"
        );
    }

    #[test]
    fn env_and_flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.toml");
        std::fs::write(&p, "[archive]\nzstd_level = 5\n").unwrap();
        let cfg = load(&Sources {
            file: Some(p.clone()),
            env: vec![
                ("FLUXCAP_ARCHIVE_ZSTD_LEVEL".into(), "7".into()),
                ("FLUXCAP_AWS_REGION".into(), "ap-south-1".into()),
                ("FLUXCAP_STREAMS".into(), "a,b:binary".into()),
            ],
            overrides: vec![("archive.location".into(), "s3://bkt/pre/fix/".into())],
        })
        .unwrap();
        assert_eq!(cfg.archive.zstd_level, 7);
        assert_eq!(cfg.aws.region, "ap-south-1");
        assert_eq!(cfg.streams[1].format, PayloadFormat::Binary);
        assert_eq!(
            cfg.location().unwrap(),
            ArchiveLocation::S3 {
                bucket: "bkt".into(),
                prefix: "pre/fix".into()
            }
        );
        let err = load(&Sources {
            file: Some(p),
            env: vec![("FLUXCAP_ARCHIVE_ZSTD_LEVEL".into(), "99".into())],
            overrides: vec![],
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("FLUXCAP_ARCHIVE_ZSTD_LEVEL"), "{err}");
    }

    #[test]
    fn s3_prefixes_must_not_need_encoding() {
        assert!(ArchiveLocation::parse("s3://bkt/team-x/a.b_c").is_ok());
        for bad in ["s3://bkt/team~x", "s3://bkt/a%2Fb", "s3://bkt/x/../y"] {
            let err = ArchiveLocation::parse(bad).unwrap_err();
            assert!(err.contains("URL encoding"), "{bad}: {err}");
        }
    }

    #[test]
    fn flushes_stay_below_arrows_offset_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.toml");
        std::fs::write(&p, "[archive.flush]\nmax_bytes = \"3GiB\"\n").unwrap();
        let err = load(&Sources {
            file: Some(p),
            env: vec![],
            overrides: vec![],
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("archive.flush.max_bytes") && err.contains("1GiB"),
            "{err}"
        );
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(ByteSize::parse("128MiB").unwrap(), ByteSize(128 << 20));
        assert_eq!(ByteSize::parse("1 GB").unwrap(), ByteSize(1_000_000_000));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert_eq!(
            HumanDuration::parse("1h30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert!(HumanDuration::parse("5").is_err());
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
    }

    #[test]
    fn show_round_trips() {
        let cfg = load_str("[[streams]]\nname = \"orders\"\n").unwrap();
        let text = cfg.to_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.streams, cfg.streams);
    }
}
