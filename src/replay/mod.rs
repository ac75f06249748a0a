//! `fluxcap replay`: send archived and live records back into Kinesis (or to
//! a JSON-lines file) — bounded, filtered, compacted, annotated, paced and
//! resumable. It is the archive pipeline run in reverse: the SQL session of
//! [`crate::query`] reads, [`crate::kinesis::writer`] writes.
//!
//! ## Consistency with records arriving during the replay
//!
//! The replay fixes a horizon when it starts and records it in its manifest:
//!
//! ```text
//!   source shard:  r1 r2 … rH │ rH+1 rH+2 …        (H: the shard's tip at the start)
//!                  ───────────┼──────────────
//!   replayed:      selection of r1…rH, each annotated with its original position
//!   never replayed:           │ anything after H, and shards created after the start
//!
//!   target:  … w5 w6 ‹r2'› w7 ‹r9'› w8 …   (w: new writes, r': replayed copies)
//!   consumer: apply r' for key k only if pos(r') > pos it holds for k  ⇒  never
//!             overwrites w (all w are after H), and converges to the last write per key.
//! ```
//!
//! The consumer side is [`crate::consistency`]; the protocol is written up in
//! `docs/replay-consistency.md`.
//!
//! ## Resume
//!
//! ```text
//!   manifest.json (once)  ──  options, source, target, horizon, as_of
//!   progress.json (every checkpoint_records / checkpoint_interval)
//!        sent = N: records 0‥N-1 of the ordered selection are all acknowledged
//!   --resume id: same query (same horizon, same order) OFFSET N
//! ```
//!
//! Records acknowledged after the last progress save are sent again by a
//! resumed run (at most `checkpoint_records` plus one batch per target shard);
//! the consumer rule makes those duplicates harmless. File targets are
//! truncated to the saved offset, so they get no duplicates at all.

pub mod select;
pub mod state;
pub mod target;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type, TimeUnit, TimestampMillisecondType};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::archive::store::Archive;
use crate::config::{Config, PayloadFormat, StreamConfig};
use crate::consistency::{self, Annotation};
use crate::error::{Error, Result};
use crate::kinesis::writer::{Ack, OutRecord, ShardStats, TargetShards, Writer, WriterSettings};
use crate::query::{self, QuerySession, SessionOptions, Snapshot};
use crate::replay::state::{Annotate, Manifest, Phase, Progress, Selection, Source};
use crate::replay::target::{Line, Target};

/// What the command line asks for.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Source stream (`--stream`); with `--from-parquet`, only a label.
    pub stream: Option<String>,
    /// `--to`.
    pub to: Option<String>,
    /// `--since`.
    pub since: Option<String>,
    /// `--until`.
    pub until: Option<String>,
    /// `--from-sequence SHARD=SEQ` (repeatable).
    pub from_sequence: Vec<String>,
    /// `--to-sequence SHARD=SEQ` (repeatable).
    pub to_sequence: Vec<String>,
    /// `--where`.
    pub predicate: Option<String>,
    /// `--compact`.
    pub compact: bool,
    /// `--key`.
    pub key: Option<String>,
    /// `--tombstone`.
    pub tombstone: Option<String>,
    /// `--annotate k=v` (repeatable).
    pub annotate: Vec<String>,
    /// `--no-annotate`.
    pub no_annotate: bool,
    /// `--envelope`.
    pub envelope: bool,
    /// `--force-overwrite`.
    pub force_overwrite: bool,
    /// `--rate` (records/s).
    pub rate: Option<f64>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--resume <id>`.
    pub resume: Option<String>,
    /// `--list`.
    pub list: bool,
    /// `--from-parquet <location>`.
    pub from_parquet: Option<String>,
    /// `--confirm-same-stream` (`confirm_same_stream` over the API): the
    /// target may be the stream the records come from.
    pub confirm_same_stream: bool,
    /// `--json`: list, dry-run and summary as JSON on standard output.
    pub json: bool,
    /// Print nothing and show no progress bar (the HTTP server runs replays).
    pub quiet: bool,
    /// `--engine drill`: run the selection on Drill (see [`crate::cluster::drill`]).
    pub engine: Option<String>,
    /// `--drill-url` (default `http://localhost:8047`).
    pub drill_url: Option<String>,
    /// `--drill-plugin`: the storage plugin from `fluxcap catalog drill`.
    pub drill_plugin: Option<String>,
    /// An archive handle and Kinesis client to reuse (the HTTP server's)
    /// instead of building new ones.
    pub shared: Option<Shared>,
}

/// Handles a long-running process shares between replays.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The archive.
    pub archive: Archive,
    /// The Kinesis client of the source streams.
    pub kinesis: aws_sdk_kinesis::Client,
}

impl Shared {
    /// [`SessionOptions`] reusing these handles.
    fn session_options(shared: Option<&Shared>) -> SessionOptions {
        SessionOptions {
            archive: shared.map(|s| s.archive.clone()),
            kinesis: shared.map(|s| s.kinesis.clone()),
            ..Default::default()
        }
    }
}

/// What a replay (or a dry run) did, per target shard.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Replay id.
    pub id: String,
    /// The target.
    pub target: String,
    /// Only counted, nothing sent.
    pub dry_run: bool,
    /// Records sent (or that would be) in this run.
    pub records: u64,
    /// Bytes (payload + key) sent in this run.
    pub bytes: u64,
    /// Records the target cannot take (too large).
    pub rejected: u64,
    /// Payloads of a JSON stream that were not JSON objects, so were wrapped in the envelope.
    pub enveloped: u64,
    /// Entries the target throttled (retried).
    pub throttled: u64,
    /// Per target shard.
    pub shards: Vec<ShardStats>,
    /// Time this run took.
    pub seconds: f64,
    /// Dry run: the time the target's limits (and `--rate`) need for this.
    pub estimated_seconds: Option<f64>,
}

/// Run `fluxcap replay` (the CLI).
pub async fn run(cfg: &Config, opts: ReplayOptions, cancel: CancellationToken) -> Result<()> {
    if opts.list {
        let archive = Archive::open(cfg).await?;
        return list(&archive, opts.json).await;
    }
    prepare(cfg, opts)
        .await?
        .run(cancel, None)
        .await
        .map(|_| ())
}

/// Progress a caller can watch while a replay runs (the HTTP server).
#[derive(Debug)]
pub struct Observer {
    /// Records acknowledged in order (including earlier runs).
    pub sent: AtomicU64,
    /// Records selected in all; `u64::MAX` while unknown.
    pub total: AtomicU64,
    /// Records sent by this run.
    pub sent_this_run: AtomicU64,
}

impl Default for Observer {
    fn default() -> Self {
        Observer {
            sent: AtomicU64::new(0),
            total: AtomicU64::new(u64::MAX),
            sent_this_run: AtomicU64::new(0),
        }
    }
}

/// A replay whose options are checked and whose manifest is built (or
/// loaded, to resume), ready to run.
pub struct Prepared {
    session: (QuerySession, String),
    cfg: Config,
    archive: Archive,
    manifest: Manifest,
    progress: Option<Progress>,
    opts: ReplayOptions,
    target: Target,
}

/// Check the options and fix the horizon (or load a replay to resume).
/// Nothing is written to the store yet.
pub async fn prepare(cfg: &Config, opts: ReplayOptions) -> Result<Prepared> {
    let archive = match &opts.shared {
        Some(s) => s.archive.clone(),
        None => Archive::open(cfg).await?,
    };
    let (manifest, progress) = match &opts.resume {
        Some(id) => resume_manifest(&archive, &opts, id).await?,
        None => (new_manifest(cfg, &archive, &opts).await?, None),
    };
    let target = Target::parse(&manifest.target)?;
    target::check_same_stream(&manifest.source, &target, opts.confirm_same_stream)?;
    let session = selection_session(cfg, &manifest, opts.shared.as_ref()).await?;
    select::validate(&session.0, &session.1, &manifest.selection).await?;
    Ok(Prepared {
        session,
        cfg: cfg.clone(),
        archive,
        manifest,
        progress,
        opts,
        target,
    })
}

impl Prepared {
    /// The replay's id.
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// What the replay was asked to do.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Send the records; the summary of this run.
    pub async fn run(
        self,
        cancel: CancellationToken,
        observer: Option<Arc<Observer>>,
    ) -> Result<Summary> {
        let Prepared {
            session,
            cfg,
            archive,
            manifest,
            progress,
            opts,
            target,
        } = self;
        let mut run = Run::new(&cfg, archive, manifest, progress, opts, target, observer);
        let result = run.execute(session, &cancel).await;
        run.finish(result).await
    }
}

fn parse_pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for kv in items {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("{what} expects KEY=VALUE, got {kv:?}")))?;
        if k.trim().is_empty() {
            return Err(Error::Usage(format!("{what}: empty key in {kv:?}")));
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn new_id(now: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "r-{}-{:04x}",
        now.format("%Y%m%dT%H%M%SZ"),
        rand::random::<u16>()
    )
}

/// A configuration that knows `stream` (added with the JSON format when it is not configured).
fn with_stream(cfg: &Config, stream: &str) -> (Config, StreamConfig) {
    let mut c = cfg.clone();
    let s = match cfg.streams.iter().find(|s| s.name == stream) {
        Some(s) => s.clone(),
        None => {
            let s = StreamConfig {
                name: stream.to_string(),
                format: PayloadFormat::Json,
            };
            c.streams.push(s.clone());
            s
        }
    };
    (c, s)
}

async fn new_manifest(cfg: &Config, archive: &Archive, opts: &ReplayOptions) -> Result<Manifest> {
    let to = opts.to.clone().ok_or_else(|| {
        Error::Usage("replay needs --to kinesis://<stream>, file://<path> or -".into())
    })?;
    Target::parse(&to)?;
    if !opts.compact && (opts.key.is_some() || opts.tombstone.is_some()) {
        return Err(Error::Usage(
            "--key and --tombstone only apply with --compact".into(),
        ));
    }
    if opts.no_annotate && (!opts.annotate.is_empty() || opts.envelope || opts.force_overwrite) {
        return Err(Error::Usage(
            "--no-annotate cannot be combined with --annotate, --envelope or --force-overwrite"
                .into(),
        ));
    }
    if let Some(r) = opts.rate
        && !(r > 0.0 && r.is_finite())
    {
        return Err(Error::Usage(format!(
            "--rate expects records per second > 0, got {r}"
        )));
    }
    let now = chrono::Utc::now();
    let now_ms = now.timestamp_millis();
    let selection = Selection {
        since_ms: opts
            .since
            .as_deref()
            .map(|s| select::parse_time(s, now_ms))
            .transpose()?,
        until_ms: opts
            .until
            .as_deref()
            .map(|s| select::parse_time(s, now_ms))
            .transpose()?,
        from_sequence: parse_pairs(&opts.from_sequence, "--from-sequence")?,
        to_sequence: parse_pairs(&opts.to_sequence, "--to-sequence")?,
        predicate: opts.predicate.clone(),
        compact: opts.compact,
        key: opts.key.clone(),
        tombstone: opts.tombstone.clone(),
    };
    let (source, binary) = match (&opts.from_parquet, &opts.stream) {
        (Some(loc), label) => {
            let binary = label
                .as_ref()
                .and_then(|l| cfg.streams.iter().find(|s| &s.name == l))
                .is_some_and(|s| s.format == PayloadFormat::Binary);
            (
                Source::Parquet {
                    location: loc.clone(),
                    stream: label.clone(),
                },
                binary,
            )
        }
        (None, Some(s)) => {
            let (_, sc) = with_stream(cfg, s);
            (
                Source::Stream { stream: s.clone() },
                sc.format == PayloadFormat::Binary,
            )
        }
        (None, None) => {
            return Err(Error::Usage(
                "replay needs --stream <name> (or --from-parquet <location>)".into(),
            ));
        }
    };
    let id = new_id(now);
    let (source, selection) = match opts.engine.as_deref() {
        None => (source, selection),
        Some("drill") => drill_selection(archive, source, selection, &id, opts).await?,
        Some(other) => {
            return Err(Error::Usage(format!(
                "unknown --engine {other:?}: expected drill"
            )));
        }
    };
    let annotate = Annotate {
        enabled: !opts.no_annotate,
        envelope: opts.envelope,
        binary,
        field: cfg.replay.annotation_field.clone(),
        pairs: parse_pairs(&opts.annotate, "--annotate")?,
        force_overwrite: opts.force_overwrite,
    };
    let (horizon, lineage) = match &source {
        Source::Stream { stream } => {
            let (h, l) = horizon(cfg, archive, stream, now_ms, opts.shared.as_ref()).await?;
            (Some(h), l)
        }
        Source::Parquet { .. } => (None, BTreeMap::new()),
    };
    Ok(Manifest {
        version: state::MANIFEST_VERSION,
        id,
        created_at: consistency::rfc3339_ms(now_ms),
        as_of_ms: now_ms,
        source,
        target: to,
        selection,
        annotate,
        rate: opts.rate,
        horizon,
        lineage,
    })
}

/// Run the selection on Drill as a CTAS into the archive's scratch
/// workspace; the replay then reads those files.
async fn drill_selection(
    archive: &Archive,
    source: Source,
    selection: Selection,
    id: &str,
    opts: &ReplayOptions,
) -> Result<(Source, Selection)> {
    let Source::Stream { stream } = source else {
        return Err(Error::Usage(
            "--engine drill replays a stream's archive: give --stream, not --from-parquet".into(),
        ));
    };
    let url = opts.drill_url.as_deref().unwrap_or("http://localhost:8047");
    let plugin = opts.drill_plugin.as_deref().unwrap_or("archive");
    let table = format!("replay_{id}");
    let sql = crate::cluster::drill::replay_sql(plugin, &stream, &table, &selection);
    tracing::info!(%url, "running the selection on Drill: {sql}");
    let rows = crate::cluster::drill::run(url, &sql).await?;
    tracing::info!("Drill wrote the selection: {rows:?}");
    let dir = archive
        .layout
        .global_state_dir()
        .join("drill-scratch")
        .join(table.as_str());
    let location = match &archive.location {
        crate::config::ArchiveLocation::Local(root) => {
            root.join(dir.as_ref()).display().to_string()
        }
        crate::config::ArchiveLocation::S3 { bucket, .. } => format!("s3://{bucket}/{dir}"),
    };
    Ok((
        Source::Parquet {
            location,
            stream: Some(stream),
        },
        // Drill applied the bounds, filter and compaction.
        Selection::default(),
    ))
}

async fn resume_manifest(
    archive: &Archive,
    opts: &ReplayOptions,
    id: &str,
) -> Result<(Manifest, Option<Progress>)> {
    let given = opts.to.is_some()
        || opts.since.is_some()
        || opts.until.is_some()
        || opts.predicate.is_some()
        || opts.compact
        || opts.from_parquet.is_some()
        || !opts.annotate.is_empty()
        || opts.rate.is_some();
    if given {
        return Err(Error::Usage(
            "--resume continues a replay with the options it was started with; give only the id"
                .into(),
        ));
    }
    let (m, p) = state::load(archive, id).await?;
    if let Some(p) = &p {
        if p.phase == Phase::Done {
            return Err(Error::Usage(format!(
                "replay {id} is already done ({} records)",
                p.sent
            )));
        }
        if p.phase == Phase::Running && p.pid != std::process::id() && state::process_alive(p) {
            return Err(Error::Usage(format!(
                "replay {id} is still running (process {} on {})",
                p.pid, p.host
            )));
        }
    }
    Ok((m, p))
}

/// The horizon of `stream` at `as_of_ms`: each shard's last sequence number
/// (archived or in Kinesis), and the shards' lineage depths.
async fn horizon(
    cfg: &Config,
    archive: &Archive,
    stream: &str,
    as_of_ms: i64,
    shared: Option<&Shared>,
) -> Result<(BTreeMap<String, Option<String>>, BTreeMap<String, u32>)> {
    let (cfg2, _) = with_stream(cfg, stream);
    let snapshot = Snapshot::load(archive, stream).await?;
    let client = match shared {
        Some(s) => s.kinesis.clone(),
        None => crate::kinesis::client(cfg).await,
    };
    let listed = match crate::kinesis::shards::list_shards(
        &client,
        stream,
        cfg.archiver.max_backoff.0,
    )
    .await
    {
        Ok(l) => l,
        Err(Error::StreamNotFound { .. }) => {
            tracing::warn!(
                stream,
                "the stream is not in Kinesis: replaying archived records only"
            );
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let mut links: Vec<(String, Option<String>, Option<String>)> = listed
        .iter()
        .map(|s| {
            (
                s.shard_id.clone(),
                s.parents.first().cloned(),
                s.parents.get(1).cloned(),
            )
        })
        .collect();
    for c in snapshot.shards.values() {
        if !listed.iter().any(|s| s.shard_id == c.shard_id) {
            links.push((
                c.shard_id.clone(),
                c.parents.first().cloned(),
                c.parents.get(1).cloned(),
            ));
        }
    }
    let lineage: BTreeMap<String, u32> = consistency::lineage_depths(&links).into_iter().collect();
    let mut h: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (shard, _, _) in &links {
        h.insert(
            shard.clone(),
            snapshot.committed(shard).map(|p| p.sequence_number.clone()),
        );
    }
    if !listed.is_empty() {
        let session = query::session_with(
            &cfg2,
            &SessionOptions {
                as_of_ms: Some(as_of_ms),
                ..Shared::session_options(shared)
            },
        )
        .await?;
        let q = format!(
            "SELECT shard_id, max(lpad(sequence_number, 128, '0')) AS s FROM live.{} GROUP BY shard_id",
            query::quote(stream)
        );
        let batches = session
            .sql(&q)
            .await?
            .collect()
            .await
            .map_err(|e| session.error(e))?;
        for b in batches {
            let shard = cast(b.column(0), &DataType::Utf8)?;
            let seq = cast(b.column(1), &DataType::Utf8)?;
            let (shard, seq) = (shard.as_string::<i32>(), seq.as_string::<i32>());
            for i in 0..b.num_rows() {
                if shard.is_null(i) || seq.is_null(i) {
                    continue;
                }
                let s = seq.value(i).trim_start_matches('0');
                let s = if s.is_empty() { "0" } else { s };
                let e = h.entry(shard.value(i).to_string()).or_insert(None);
                if e.as_deref()
                    .is_none_or(|cur| crate::record::cmp_sequence(s, cur).is_gt())
                {
                    *e = Some(s.to_string());
                }
            }
        }
    }
    Ok((h, lineage))
}

/// The SQL session and the table the selection reads.
async fn selection_session(
    cfg: &Config,
    m: &Manifest,
    shared: Option<&Shared>,
) -> Result<(QuerySession, String)> {
    match &m.source {
        Source::Stream { stream } => {
            let (cfg, _) = with_stream(cfg, stream);
            let s = query::session_with(
                &cfg,
                &SessionOptions {
                    as_of_ms: Some(m.as_of_ms),
                    ..Shared::session_options(shared)
                },
            )
            .await?;
            select::register(&s.ctx, m.horizon.as_ref(), &m.lineage);
            Ok((s, query::quote(stream)))
        }
        Source::Parquet { location, .. } => {
            let s = query::session_with(
                cfg,
                &SessionOptions {
                    streams_optional: true,
                    ..Shared::session_options(shared)
                },
            )
            .await?;
            select::register(&s.ctx, None, &m.lineage);
            let table = register_parquet(cfg, &s, location).await?;
            Ok((s, table))
        }
    }
}

fn cast(a: &ArrayRef, t: &DataType) -> Result<ArrayRef> {
    Ok(arrow::compute::cast(a, t)?)
}

async fn list(archive: &Archive, json: bool) -> Result<()> {
    let all = state::list(archive).await?;
    if json {
        let rows: Vec<_> = all
            .iter()
            .map(|(m, p)| {
                serde_json::json!({
                    "id": m.id,
                    "created_at": m.created_at,
                    "source": m.source,
                    "target": m.target,
                    "state": state::describe_phase(p.as_ref(), state::process_alive),
                    "sent": p.as_ref().map(|p| p.sent).unwrap_or(0),
                    "total": p.as_ref().and_then(|p| p.total),
                    "rejected": p.as_ref().map(|p| p.rejected).unwrap_or(0),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if all.is_empty() {
        eprintln!("no replays in {}", archive.location);
        return Ok(());
    }
    println!(
        "{:<26} {:<24} {:<20} {:<28} {:>10} {:>10}  state",
        "id", "created", "source", "target", "sent", "total"
    );
    for (m, p) in &all {
        let source = match &m.source {
            Source::Stream { stream } => stream.clone(),
            Source::Parquet { location, .. } => format!("parquet:{location}"),
        };
        println!(
            "{:<26} {:<24} {:<20} {:<28} {:>10} {:>10}  {}",
            m.id,
            m.created_at,
            source,
            m.target,
            p.as_ref().map(|p| p.sent).unwrap_or(0),
            p.as_ref()
                .and_then(|p| p.total)
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            state::describe_phase(p.as_ref(), state::process_alive)
        );
    }
    Ok(())
}

/// One record read from the selection.
struct Row<'a> {
    shard: &'a str,
    seq: &'a str,
    sub: i64,
    pk: &'a str,
    ehk: Option<&'a str>,
    arrival_ms: i64,
    data: &'a [u8],
    depth: i32,
}

/// A batch's columns in canonical types.
struct Columns {
    shard: ArrayRef,
    seq: ArrayRef,
    sub: ArrayRef,
    pk: ArrayRef,
    ehk: ArrayRef,
    arrival: ArrayRef,
    data: ArrayRef,
    depth: ArrayRef,
}

impl Columns {
    fn of(b: &RecordBatch) -> Result<Self> {
        let c = |i: usize, t: DataType| cast(b.column(i), &t);
        Ok(Columns {
            shard: c(0, DataType::Utf8)?,
            seq: c(1, DataType::Utf8)?,
            sub: c(2, DataType::Int64)?,
            pk: c(3, DataType::Utf8)?,
            ehk: c(4, DataType::Utf8)?,
            arrival: c(
                5,
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            )?,
            data: c(6, DataType::Binary)?,
            depth: c(7, DataType::Int32)?,
        })
    }

    fn row(&self, i: usize) -> Row<'_> {
        fn s(a: &ArrayRef, i: usize) -> &str {
            let a = a.as_string::<i32>();
            if a.is_null(i) { "" } else { a.value(i) }
        }
        let ehk = self.ehk.as_string::<i32>();
        let sub = self.sub.as_primitive::<Int64Type>();
        let arr = self.arrival.as_primitive::<TimestampMillisecondType>();
        let data = self.data.as_binary::<i32>();
        let depth = self.depth.as_primitive::<Int32Type>();
        Row {
            shard: s(&self.shard, i),
            seq: s(&self.seq, i),
            sub: if sub.is_null(i) { 0 } else { sub.value(i) },
            pk: s(&self.pk, i),
            ehk: (!ehk.is_null(i)).then(|| ehk.value(i)),
            arrival_ms: if arr.is_null(i) { 0 } else { arr.value(i) },
            data: if data.is_null(i) { &[] } else { data.value(i) },
            depth: if depth.is_null(i) { 0 } else { depth.value(i) },
        }
    }
}

/// Acknowledgement bookkeeping: the prefix of the output order that is
/// completely acknowledged.
#[derive(Debug, Default)]
struct Watermark {
    next: u64,
    bytes: u64,
    above: BTreeMap<u64, usize>,
}

impl Watermark {
    fn ack(&mut self, idx: u64, bytes: usize) {
        if idx < self.next {
            return;
        }
        self.above.insert(idx, bytes);
        while let Some(b) = self.above.remove(&self.next) {
            self.bytes += b as u64;
            self.next += 1;
        }
    }
}

enum Sink {
    Kinesis {
        writer: Writer,
        acks: mpsc::UnboundedReceiver<Ack>,
        ack_tx: mpsc::UnboundedSender<Ack>,
    },
    DryRun {
        shards: Option<TargetShards>,
        per_shard: Vec<ShardStats>,
    },
    Lines {
        out: Box<dyn Write + Send>,
        path: Option<std::path::PathBuf>,
        offset: u64,
    },
}

struct Run {
    cfg: Config,
    archive: Archive,
    manifest: Manifest,
    opts: ReplayOptions,
    target: Target,
    /// Records before this ordinal were sent by earlier runs.
    start: u64,
    progress: Progress,
    mark: Watermark,
    rejected: Vec<String>,
    enveloped: u64,
    sent_records: u64,
    sent_bytes: u64,
    started: Instant,
    last_save: Instant,
    last_saved_sent: u64,
    last_log: Instant,
    bar: Option<indicatif::ProgressBar>,
    shards: Vec<ShardStats>,
    /// The manifest is in the store (progress may be saved).
    recorded: bool,
    /// Someone watching (the HTTP server).
    observer: Option<Arc<Observer>>,
}

impl Run {
    fn new(
        cfg: &Config,
        archive: Archive,
        manifest: Manifest,
        progress: Option<Progress>,
        opts: ReplayOptions,
        target: Target,
        observer: Option<Arc<Observer>>,
    ) -> Self {
        let start = progress.as_ref().map(|p| p.sent).unwrap_or(0);
        let progress = progress.unwrap_or(Progress {
            phase: Phase::Running,
            sent: 0,
            total: None,
            bytes: 0,
            file_offset: None,
            rejected: 0,
            shards: Vec::new(),
            error: None,
            updated_ms: 0,
            host: crate::archive::lease::hostname(),
            pid: std::process::id(),
        });
        let mark = Watermark {
            next: start,
            bytes: progress.bytes,
            above: BTreeMap::new(),
        };
        if let Some(o) = &observer {
            o.sent.store(start, Ordering::Relaxed);
        }
        Run {
            observer,
            cfg: cfg.clone(),
            archive,
            manifest,
            opts,
            target,
            start,
            progress,
            mark,
            rejected: Vec::new(),
            enveloped: 0,
            sent_records: 0,
            sent_bytes: 0,
            started: Instant::now(),
            last_save: Instant::now(),
            last_saved_sent: start,
            last_log: Instant::now(),
            bar: None,
            shards: Vec::new(),
            recorded: false,
        }
    }

    async fn sink(&mut self) -> Result<Sink> {
        let resume_offset = self.progress.file_offset.unwrap_or(0);
        match &self.target {
            Target::Kinesis(name) => {
                let mut c = self.cfg.clone();
                let r = &self.cfg.replay;
                if let Some(x) = &r.target_region {
                    c.aws.region = x.clone();
                }
                if let Some(x) = &r.target_profile {
                    c.aws.profile = Some(x.clone());
                }
                if let Some(x) = &r.target_endpoint {
                    c.aws.kinesis_endpoint = Some(x.clone());
                }
                let client = crate::kinesis::client(&c).await;
                let shards =
                    TargetShards::discover(&client, name, self.cfg.archiver.max_backoff.0).await?;
                if self.opts.dry_run {
                    let per_shard = shards
                        .shards
                        .iter()
                        .map(|s| ShardStats {
                            shard_id: s.shard_id.clone(),
                            ..Default::default()
                        })
                        .collect();
                    return Ok(Sink::DryRun {
                        shards: Some(shards),
                        per_shard,
                    });
                }
                let (ack_tx, acks) = mpsc::unbounded_channel();
                let settings = WriterSettings {
                    shard_records_per_sec: r.shard_records_per_second,
                    shard_bytes_per_sec: r.shard_bytes_per_second.0,
                    rate: self.manifest.rate,
                    max_attempts: r.retry_attempts,
                    max_backoff: self.cfg.archiver.max_backoff.0,
                    share: self.share(),
                };
                let writer = Writer::start(
                    client,
                    name,
                    shards,
                    settings,
                    ack_tx.clone(),
                    CancellationToken::new(),
                );
                Ok(Sink::Kinesis {
                    writer,
                    acks,
                    ack_tx,
                })
            }
            _ if self.opts.dry_run => Ok(Sink::DryRun {
                shards: None,
                per_shard: vec![ShardStats {
                    shard_id: self.manifest.target.clone(),
                    ..Default::default()
                }],
            }),
            Target::File(path) => {
                let io = |e| Error::Io {
                    path: path.clone(),
                    source: e,
                };
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(self.start == 0)
                    .open(path)
                    .map_err(io)?;
                if self.start > 0 {
                    // Drop whatever was written after the last saved progress.
                    f.set_len(resume_offset).map_err(io)?;
                }
                let mut f = f;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(resume_offset)).map_err(io)?;
                Ok(Sink::Lines {
                    out: Box::new(std::io::BufWriter::with_capacity(1 << 20, f)),
                    path: Some(path.clone()),
                    offset: resume_offset,
                })
            }
            Target::Stdout => Ok(Sink::Lines {
                out: Box::new(std::io::BufWriter::with_capacity(
                    1 << 16,
                    std::io::stdout(),
                )),
                path: None,
                offset: 0,
            }),
        }
    }

    async fn execute(
        &mut self,
        (session, table): (QuerySession, String),
        cancel: &CancellationToken,
    ) -> Result<()> {
        let m = self.manifest.clone();
        let horizon = m.horizon.is_some();
        let terminal = std::io::stderr().is_terminal() && !self.opts.dry_run && !self.opts.quiet;
        let watched = self.observer.is_some() && !self.opts.dry_run;
        if (terminal || watched) && self.progress.total.is_none() {
            let q = select::sql(&table, &m.selection, horizon, false, 0);
            let b = session
                .sql(&q)
                .await?
                .collect()
                .await
                .map_err(|e| session.error(e))?;
            if let Some(b) = b.first() {
                let n = cast(b.column(0), &DataType::Int64)?;
                let n = n.as_primitive::<Int64Type>();
                if !n.is_empty() && !n.is_null(0) {
                    self.progress.total = Some(n.value(0) as u64);
                }
            }
        }
        if let (Some(o), Some(t)) = (&self.observer, self.progress.total) {
            o.total.store(t, Ordering::Relaxed);
        }
        if terminal {
            self.bar = Some(progress_bar(self.progress.total, self.start));
        }
        let mut sink = self.sink().await?;
        if !self.opts.dry_run {
            // The source and target are usable: from here on the replay exists.
            if self.opts.resume.is_none() {
                state::save_manifest(&self.archive, &self.manifest).await?;
            }
            self.recorded = true;
            self.save(Phase::Running, None).await;
        }
        let q = select::sql(&table, &m.selection, horizon, true, self.start);
        tracing::debug!(sql = %q, "replay selection");
        let df = session.sql(&q).await?;
        let mut stream = df.execute_stream().await.map_err(|e| session.error(e))?;
        let text = !m.annotate.binary;
        let label = m.source.stream_label();
        let max = self.cfg.replay.max_record_size.0 as usize;
        let mut idx = self.start;
        loop {
            let batch = tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Interrupted),
                b = stream.next() => b,
            };
            let Some(batch) = batch else { break };
            let batch = batch.map_err(|e| session.error(e))?;
            let cols = Columns::of(&batch)?;
            for i in 0..batch.num_rows() {
                let row = cols.row(i);
                match &mut sink {
                    Sink::Lines { out, path, offset } => {
                        let (data, data_base64) = Line::payload(row.data, text);
                        let line = Line {
                            replay_id: m.annotate.enabled.then_some(m.id.as_str()),
                            stream: &label,
                            shard_id: row.shard,
                            sequence_number: row.seq,
                            subsequence_number: row.sub,
                            partition_key: row.pk,
                            explicit_hash_key: row.ehk,
                            approximate_arrival_timestamp: Line::time(row.arrival_ms),
                            data,
                            data_base64,
                            annotations: (m.annotate.enabled && !m.annotate.pairs.is_empty())
                                .then_some(&m.annotate.pairs),
                        };
                        let mut buf = serde_json::to_vec(&line).map_err(|e| Error::Query {
                            message: format!("encoding a JSON line: {e}"),
                        })?;
                        buf.push(b'\n');
                        let io = |e| Error::Io {
                            path: path.clone().unwrap_or_else(|| "<stdout>".into()),
                            source: e,
                        };
                        out.write_all(&buf).map_err(io)?;
                        *offset += buf.len() as u64;
                        self.sent_records += 1;
                        self.sent_bytes += (row.data.len() + row.pk.len()) as u64;
                        self.mark.ack(idx, row.data.len() + row.pk.len());
                        self.progress.file_offset = path.as_ref().map(|_| *offset);
                        if self.due() {
                            out.flush().map_err(io)?;
                            self.save(Phase::Running, None).await;
                        }
                    }
                    Sink::DryRun { shards, per_shard } => {
                        let payload = self.payload(&row, &label);
                        let size = payload.len() + row.pk.len();
                        if matches!(self.target, Target::Kinesis(_)) && size > max {
                            self.reject(&row, size);
                        } else {
                            let s = shards.as_ref().map_or(0, |t| t.route(row.pk, row.ehk));
                            per_shard[s].records += 1;
                            per_shard[s].bytes += size as u64;
                        }
                    }
                    Sink::Kinesis {
                        writer,
                        acks,
                        ack_tx,
                    } => {
                        let payload = self.payload(&row, &label);
                        let size = payload.len() + row.pk.len();
                        if size > max {
                            self.reject(&row, size);
                            let _ = ack_tx.send(Ack {
                                idx,
                                shard: usize::MAX,
                                bytes: 0,
                            });
                        } else {
                            let rec = OutRecord {
                                idx,
                                partition_key: row.pk.to_string(),
                                explicit_hash_key: row.ehk.map(str::to_string),
                                data: payload,
                            };
                            tokio::select! {
                                _ = cancel.cancelled() => return Err(Error::Interrupted),
                                r = writer.send(rec) => r?,
                            }
                        }
                        while let Ok(a) = acks.try_recv() {
                            self.on_ack(a);
                        }
                        if self.due() {
                            self.save(Phase::Running, None).await;
                        }
                    }
                }
                idx += 1;
            }
            self.tick();
        }
        match sink {
            Sink::Kinesis {
                writer,
                mut acks,
                ack_tx,
            } => {
                drop(ack_tx);
                let finish = writer.finish();
                tokio::pin!(finish);
                let stats = loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::Interrupted),
                        r = &mut finish => break r?,
                        Some(a) = acks.recv() => {
                            self.on_ack(a);
                            if self.due() {
                                self.save(Phase::Running, None).await;
                            }
                            self.tick();
                        }
                    }
                };
                while let Ok(a) = acks.try_recv() {
                    self.on_ack(a);
                }
                self.shards = stats;
            }
            Sink::DryRun { per_shard, .. } => self.shards = per_shard,
            Sink::Lines { mut out, path, .. } => {
                out.flush().map_err(|e| Error::Io {
                    path: path.unwrap_or_else(|| "<stdout>".into()),
                    source: e,
                })?;
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, a: Ack) {
        if a.shard != usize::MAX {
            self.sent_records += 1;
            self.sent_bytes += a.bytes as u64;
        }
        self.mark.ack(a.idx, a.bytes);
    }

    /// The payload as sent to Kinesis (annotated or not).
    fn payload(&mut self, row: &Row<'_>, label: &str) -> Bytes {
        let a = &self.manifest.annotate;
        if !a.enabled {
            return Bytes::copy_from_slice(row.data);
        }
        let ann = Annotation {
            replay_id: self.manifest.id.clone(),
            stream: label.to_string(),
            shard_id: row.shard.to_string(),
            lineage_depth: row.depth.max(0) as u32,
            sequence_number: row.seq.to_string(),
            subsequence_number: row.sub,
            arrival: consistency::rfc3339_ms(row.arrival_ms),
            arrival_ms: row.arrival_ms,
            force_overwrite: a.force_overwrite,
            annotations: a.pairs.clone(),
            envelope: None,
        };
        if !a.binary && !a.envelope {
            if let Some(v) = consistency::annotate_json(row.data, &a.field, &ann) {
                return Bytes::from(v);
            }
            self.enveloped += 1;
        }
        Bytes::from(consistency::envelope(row.data, &a.field, &ann))
    }

    fn reject(&mut self, row: &Row<'_>, size: usize) {
        tracing::warn!(
            shard = row.shard,
            sequence_number = row.seq,
            size,
            "record too large for the target ({} bytes > replay.max_record_size {}): not sent",
            size,
            self.cfg.replay.max_record_size.0
        );
        self.rejected.push(
            serde_json::json!({
                "shard_id": row.shard,
                "sequence_number": row.seq,
                "subsequence_number": row.sub,
                "partition_key": row.pk,
                "size": size,
            })
            .to_string(),
        );
    }

    fn due(&self) -> bool {
        self.mark.next - self.last_saved_sent >= self.cfg.replay.checkpoint_records
            || (self.last_save.elapsed() >= self.cfg.replay.checkpoint_interval.0
                && self.mark.next > self.last_saved_sent)
    }

    fn tick(&mut self) {
        let done = self.mark.next;
        if let Some(o) = &self.observer {
            o.sent.store(done, Ordering::Relaxed);
            o.sent_this_run.store(self.sent_records, Ordering::Relaxed);
        }
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if !self.opts.dry_run && self.last_log.elapsed() >= Duration::from_secs(10) {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                replay = %self.manifest.id,
                "sent {done} records ({:.0} records/s)",
                self.sent_records as f64 / secs
            );
        }
    }

    async fn save(&mut self, phase: Phase, error: Option<String>) {
        self.progress.phase = phase;
        self.progress.sent = self.mark.next;
        self.progress.bytes = self.mark.bytes;
        self.progress.rejected = self.rejected.len() as u64;
        self.progress.error = error;
        self.progress.updated_ms = chrono::Utc::now().timestamp_millis();
        self.progress.host = crate::archive::lease::hostname();
        self.progress.pid = std::process::id();
        if !self.shards.is_empty() {
            self.progress.shards = self.shards.clone();
        }
        if let Err(e) = state::save_progress(&self.archive, &self.manifest.id, &self.progress).await
        {
            tracing::warn!("could not save the replay's progress: {e}");
        }
        self.last_save = Instant::now();
        self.last_saved_sent = self.mark.next;
    }

    async fn finish(mut self, result: Result<()>) -> Result<Summary> {
        // Watchers see the final counts, also when the run stopped early.
        self.tick();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let id = self.manifest.id.clone();
        let rejected_path = if self.rejected.is_empty() || !self.recorded {
            None
        } else {
            match state::save_rejected(&self.archive, &id, &self.rejected).await {
                Ok(p) => Some(self.archive.describe(&p)),
                Err(e) => {
                    tracing::warn!("could not save the list of rejected records: {e}");
                    None
                }
            }
        };
        if let Err(e) = result {
            if self.recorded {
                let msg = (!matches!(e, Error::Interrupted)).then(|| e.to_string());
                self.save(Phase::Interrupted, msg).await;
                if !self.opts.quiet {
                    eprintln!(
                        "replay {id} stopped after {} records; continue with: fluxcap replay --resume {id}",
                        self.mark.next
                    );
                }
            }
            return Err(e);
        }
        let secs = self.started.elapsed().as_secs_f64();
        let mut summary = Summary {
            id: id.clone(),
            target: self.manifest.target.clone(),
            dry_run: self.opts.dry_run,
            records: if self.opts.dry_run {
                self.shards.iter().map(|s| s.records).sum()
            } else {
                self.sent_records
            },
            bytes: if self.opts.dry_run {
                self.shards.iter().map(|s| s.bytes).sum()
            } else {
                self.sent_bytes
            },
            rejected: self.rejected.len() as u64,
            enveloped: self.enveloped,
            throttled: self.shards.iter().map(|s| s.throttled).sum(),
            shards: self.shards.clone(),
            seconds: secs,
            estimated_seconds: None,
        };
        if self.opts.dry_run {
            summary.estimated_seconds = Some(self.estimate(&summary));
        } else {
            self.progress.total = Some(self.mark.next);
            self.save(Phase::Done, None).await;
        }
        if !self.opts.quiet {
            self.report(&summary);
        }
        if let Some(p) = rejected_path {
            return Err(Error::Rejected {
                id,
                count: self.rejected.len() as u64,
                list: p,
            });
        }
        Ok(summary)
    }

    /// Share of the target's per-shard limits the writer may use: less
    /// when the target is the source stream (`replay.same_stream_share`).
    fn share(&self) -> f64 {
        match target::same_stream(&self.manifest.source, &self.target) {
            Some(_) => self.cfg.replay.same_stream_share,
            None => 1.0,
        }
    }

    /// Seconds the target's limits (and `--rate`) need for the counted records.
    fn estimate(&self, s: &Summary) -> f64 {
        let r = &self.cfg.replay;
        if !matches!(self.target, Target::Kinesis(_)) {
            return 0.0;
        }
        let share = self.share();
        let mut t: f64 = 0.0;
        for sh in &s.shards {
            if r.shard_records_per_second > 0 {
                t = t.max(sh.records as f64 / (f64::from(r.shard_records_per_second) * share));
            }
            if r.shard_bytes_per_second.0 > 0 {
                t = t.max(sh.bytes as f64 / (r.shard_bytes_per_second.0 as f64 * share));
            }
        }
        if let Some(rate) = self.manifest.rate {
            t = t.max(s.records as f64 / rate);
        }
        t
    }

    fn report(&self, s: &Summary) {
        let to_stdout = self.opts.json && self.target != Target::Stdout;
        if to_stdout {
            println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
            return;
        }
        let mut text = String::new();
        if s.dry_run {
            text.push_str(&format!(
                "dry run of replay to {}: {} records, {} bytes would be sent{}\n",
                s.target,
                s.records,
                s.bytes,
                s.estimated_seconds
                    .filter(|t| *t > 0.0)
                    .map(|t| format!("; estimated {t:.1} s at the target's limits"))
                    .unwrap_or_default()
            ));
            for sh in &s.shards {
                text.push_str(&format!(
                    "  {:<28} {:>10} records {:>14} bytes\n",
                    sh.shard_id, sh.records, sh.bytes
                ));
            }
        } else {
            text.push_str(&format!(
                "replay {} to {}: sent {} records ({} bytes) in {:.1} s{}{}\n",
                s.id,
                s.target,
                s.records,
                s.bytes,
                s.seconds,
                if s.throttled > 0 {
                    format!("; {} entries throttled and retried", s.throttled)
                } else {
                    String::new()
                },
                if s.enveloped > 0 {
                    format!(
                        "; {} payloads were not JSON objects and were sent in the envelope",
                        s.enveloped
                    )
                } else {
                    String::new()
                }
            ));
        }
        if s.rejected > 0 {
            text.push_str(&format!(
                "{} records are larger than replay.max_record_size and {}\n",
                s.rejected,
                if s.dry_run {
                    "would not be sent"
                } else {
                    "were not sent"
                }
            ));
        }
        if self.opts.dry_run && self.opts.json {
            print!("{text}");
        } else {
            eprint!("{text}");
        }
    }
}

fn progress_bar(total: Option<u64>, start: u64) -> indicatif::ProgressBar {
    let bar = match total {
        Some(t) => {
            let b = indicatif::ProgressBar::new(t);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} replay [{bar:30}] {pos}/{len} records  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        }
        None => {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} replay {pos} records  {per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b
        }
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_position(start);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Register a Parquet result set as the replay's source table; columns that
/// a result set may lack (`subsequence_number`, `explicit_hash_key`) are
/// filled in.
async fn register_parquet(cfg: &Config, s: &QuerySession, location: &str) -> Result<String> {
    use datafusion::prelude::ParquetReadOptions;
    let loc = crate::config::ArchiveLocation::parse(location).map_err(Error::Usage)?;
    let url = match &loc {
        crate::config::ArchiveLocation::Local(p) => {
            if !p.exists() {
                return Err(Error::Usage(format!(
                    "--from-parquet: {} does not exist",
                    p.display()
                )));
            }
            let mut u = p.display().to_string();
            if p.is_dir() && !u.ends_with('/') {
                u.push('/');
            }
            u
        }
        crate::config::ArchiveLocation::S3 { bucket, prefix } => {
            let mut c = cfg.clone();
            c.archive.location = format!("s3://{bucket}");
            let a = Archive::open(&c).await?;
            let base = format!("s3://{bucket}");
            let u = url::Url::parse(&base).map_err(|e| Error::Usage(e.to_string()))?;
            s.ctx.register_object_store(&u, a.store.clone());
            if prefix.ends_with(".parquet") {
                format!("{base}/{prefix}")
            } else {
                format!("{base}/{prefix}/")
            }
        }
    };
    s.ctx
        .register_parquet("replay_source_raw", &url, ParquetReadOptions::default())
        .await
        .map_err(|e| {
            Error::Usage(format!(
                "--from-parquet {location}: {}",
                e.strip_backtrace()
            ))
        })?;
    let schema = s
        .ctx
        .table("replay_source_raw")
        .await
        .map_err(|e| s.error(e))?
        .schema()
        .clone();
    let has = |c: &str| schema.field_with_unqualified_name(c).is_ok();
    let required = [
        crate::record::col::SHARD_ID,
        crate::record::col::SEQUENCE_NUMBER,
        crate::record::col::PARTITION_KEY,
        crate::record::col::ARRIVAL,
        crate::record::col::DATA,
    ];
    let missing: Vec<&str> = required.iter().copied().filter(|c| !has(c)).collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "--from-parquet {location}: the files lack the record column(s) {} (they need {})",
            missing.join(", "),
            required.join(", ")
        )));
    }
    let mut extra = Vec::new();
    if !has(crate::record::col::SUBSEQUENCE_NUMBER) {
        extra.push("CAST(0 AS BIGINT) AS subsequence_number".to_string());
    }
    if !has(crate::record::col::EXPLICIT_HASH_KEY) {
        extra.push("CAST(NULL AS VARCHAR) AS explicit_hash_key".to_string());
    }
    let view = if extra.is_empty() {
        "replay_source_raw".to_string()
    } else {
        format!("(SELECT *, {} FROM replay_source_raw)", extra.join(", "))
    };
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_advances_only_over_a_complete_prefix() {
        let mut w = Watermark {
            next: 10,
            ..Default::default()
        };
        w.ack(11, 5);
        assert_eq!(w.next, 10);
        w.ack(10, 3);
        assert_eq!((w.next, w.bytes), (12, 8));
        w.ack(9, 100); // before the start: ignored
        assert_eq!(w.next, 12);
    }

    #[test]
    fn ids_sort_by_time_and_have_a_fixed_length() {
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let a = new_id(t);
        assert_eq!(a.len(), "r-20231114T221320Z-0000".len());
        assert!(a.starts_with("r-20231114T221320Z-"));
    }

    #[test]
    fn pairs() {
        let p = parse_pairs(&["a=1".into(), "b = x=y".into()], "--annotate").unwrap_or_default();
        assert_eq!(p.get("b").map(String::as_str), Some("x=y"));
        assert!(parse_pairs(&["nope".into()], "--annotate").is_err());
    }
}
