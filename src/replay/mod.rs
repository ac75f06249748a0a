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
//!   rejected.jsonl (before any progress past a rejected record; only grows)
//!   lease/<epoch>.json  (renewed every lease_ttl/3: one process runs a replay)
//!   --resume id: same query (same horizon, same order, now() = as_of) OFFSET N
//!   --follow: then per shard after follow[shard] (or the horizon); see [`follow`]
//! ```
//!
//! Records acknowledged after the last progress save are sent again by a
//! resumed run: fewer than `checkpoint_records` plus the writer's read-ahead
//! past the first unacknowledged record (until the next record's target shard
//! has 3,000 waiting; `docs/replay-consistency.md` states the bound); the
//! consumer rule makes those duplicates harmless. File targets are
//! truncated to the saved offset, so they get no duplicates at all.
//!
//! A resumed run selects the same records: `now()` and the other time
//! functions in `--where`, `--key` and `--tombstone` return the replay's start
//! (`as_of_ms`) in every run, volatile functions (`random()`, `uuid()`) are
//! refused, and `--resume` refuses options that differ from the stored ones
//! (only `--rate` may change). Records rejected as too large stay on
//! `rejected.jsonl` across runs, and every run that ends with any on it exits
//! 3. A reader that closes standard output (`--to - | head`) stops the
//! replay cleanly (exit 0, state `stopped (output closed)`), resumable.

mod acks;
mod follow;
mod order;
mod plan;
mod report;
mod run;
pub mod select;
pub mod state;
pub mod target;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::archive::store::Archive;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kinesis::writer::ShardStats;
use crate::query::{QuerySession, SessionOptions};
use crate::replay::run::{Earlier, Run};
use crate::replay::state::Manifest;
use crate::replay::target::Target;

/// What a replay is asked to do: `fluxcap replay`'s arguments (clap parses
/// them straight into this), also filled in by the HTTP API.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplayOptions {
    /// The stream whose records (archived and live) are replayed; with
    /// --from-parquet, only the name annotations carry.
    #[arg(long)]
    pub stream: Option<String>,
    /// Where to: kinesis://<stream>, file://<path.jsonl>, or - (JSON lines on standard output).
    #[arg(long, value_name = "TARGET")]
    pub to: Option<String>,
    /// Only records that arrived at or after this time (RFC 3339, a date, or a duration ago such as 2h).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records that arrived before this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only records of SHARD at or after sequence number SEQ (repeatable).
    #[arg(long, value_name = "SHARD=SEQ")]
    pub from_sequence: Vec<String>,
    /// Only records of SHARD at or before sequence number SEQ (repeatable).
    #[arg(long, value_name = "SHARD=SEQ")]
    pub to_sequence: Vec<String>,
    /// Only records matching this SQL predicate (record columns and JSON functions).
    #[arg(long = "where", value_name = "PREDICATE")]
    pub predicate: Option<String>,
    /// Keep only the last record per key (the partition key, or --key).
    #[arg(long)]
    pub compact: bool,
    /// The compaction key, a SQL expression such as json_get_str(data,'order_id').
    #[arg(long, value_name = "EXPR")]
    pub key: Option<String>,
    /// Records matching this predicate delete their key (a key whose last record matches is deleted).
    #[arg(long, value_name = "PREDICATE")]
    pub tombstone: Option<String>,
    /// What a deleted key sends: its last record, so consumers delete it too (emit), or nothing (drop).
    /// Default: emit when --to is the source stream or with --force-overwrite, drop otherwise.
    #[arg(long, value_name = "MODE", value_parser = ["emit", "drop"])]
    pub tombstones: Option<String>,
    /// Also select records that earlier replays sent (copies); they are ordered and compacted by
    /// their original's position and sent unchanged.
    #[arg(long)]
    pub include_replayed: bool,
    /// Send a key's records without waiting for each other (faster with few keys); they can land
    /// out of order, so only for consumers that apply the replay consistency protocol.
    #[arg(long)]
    pub unordered: bool,
    /// After the selection, keep forwarding records as they arrive (same filter, annotation and
    /// order) until stopped; --resume continues where it stopped.
    #[arg(long)]
    pub follow: bool,
    /// Add KEY=VALUE to every record's annotation (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub annotate: Vec<String>,
    /// Send the original bytes, without annotation.
    #[arg(long)]
    pub no_annotate: bool,
    /// Wrap every record in the envelope, even JSON objects.
    #[arg(long)]
    pub envelope: bool,
    /// Set force_overwrite in the annotation (see docs/replay-consistency.md).
    #[arg(long)]
    pub force_overwrite: bool,
    /// Allow --to kinesis://<the stream the records come from> (also to resume
    /// such a replay); it starts at replay.same_stream_share of the limits.
    #[arg(long)]
    pub confirm_same_stream: bool,
    /// At most this many records per second overall (with --resume: for this run).
    #[arg(long, value_name = "RECORDS_PER_SEC")]
    pub rate: Option<f64>,
    /// Count records and bytes per target shard and estimate the duration; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue an interrupted or stopped replay with its stored options
    /// (options given again must equal them; only --rate may change).
    #[arg(long, value_name = "ID", conflicts_with_all = ["list", "dry_run"])]
    pub resume: Option<String>,
    /// Show the replays in the archive store and their state.
    #[arg(long)]
    pub list: bool,
    /// Replay the records of Parquet files with the record columns (a directory, file or s3:// prefix).
    #[arg(long, value_name = "LOCATION")]
    pub from_parquet: Option<String>,
    /// Print --list, --dry-run and the summary as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    /// Run the selection on a cluster engine (`drill`): a CTAS into the
    /// archive's scratch workspace, then a replay of those files.
    #[arg(long, value_name = "ENGINE")]
    pub engine: Option<String>,
    /// Drill's REST address [default: http://localhost:8047, e.g. through `fluxcap cluster tunnel`].
    #[arg(long, value_name = "URL")]
    pub drill_url: Option<String>,
    /// The Drill storage plugin over the archive [default: archive].
    #[arg(long, value_name = "NAME")]
    pub drill_plugin: Option<String>,
    /// Print nothing and show no progress bar (the HTTP server runs replays).
    #[arg(skip)]
    pub quiet: bool,
    /// An archive handle and Kinesis client to reuse (the HTTP server's)
    /// instead of building new ones.
    #[arg(skip)]
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
    /// Dry run into Kinesis, in order: the records of the busiest partition
    /// key, which go one per PutRecords round trip (`--unordered` lifts it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busiest_key_records: Option<u64>,
}

/// Run `fluxcap replay` (the CLI).
pub async fn run(cfg: &Config, opts: ReplayOptions, cancel: CancellationToken) -> Result<()> {
    if opts.list {
        let archive = Archive::open(cfg).await?;
        return report::list(&archive, opts.json).await;
    }
    if opts.dry_run && opts.engine.as_deref() == Some("drill") && opts.resume.is_none() {
        // No CTAS for a dry run: Drill only counts.
        let archive = Archive::open(cfg).await?;
        return plan::drill_dry_run(cfg, &archive, &opts).await;
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
    /// What earlier runs left (a resume).
    earlier: Earlier,
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
    let (manifest, earlier, session) = match &opts.resume {
        Some(id) => {
            let (m, p) = plan::resume_manifest(&archive, &opts, id).await?;
            // Earlier runs' rejected records stay on the list.
            let rejected = state::load_rejected(&archive, id).await?;
            (
                m,
                Earlier {
                    progress: p,
                    rejected,
                },
                None,
            )
        }
        None => {
            let (m, s) = plan::new_manifest(cfg, &archive, &opts).await?;
            (m, Earlier::default(), s)
        }
    };
    let target = Target::parse(&manifest.target)?;
    target::check_same_stream(&manifest.source, &target, opts.confirm_same_stream)?;
    let session = match session {
        Some(s) => s,
        None => plan::selection_session(cfg, &manifest, opts.shared.as_ref()).await?,
    };
    select::validate(&session.0, &session.1, &manifest.selection).await?;
    plan::check_deterministic(&session.0, &session.1, &manifest.selection).await?;
    Ok(Prepared {
        session,
        cfg: cfg.clone(),
        archive,
        manifest,
        earlier,
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
            earlier,
            opts,
            target,
        } = self;
        // The heartbeat: one process at a time runs a replay.
        let heartbeat = if opts.dry_run {
            None
        } else {
            let ttl = cfg.archiver.lease_ttl.0;
            Some(state::Heartbeat::start(&archive, &manifest.id, ttl, cancel.clone()).await?)
        };
        // A Drill selection's scratch table: deleted when done, kept on failure.
        let scratch = match &manifest.source {
            state::Source::Parquet { location, .. } if !opts.dry_run => {
                Some((archive.clone(), manifest.id.clone(), location.clone()))
            }
            _ => None,
        };
        let id = manifest.id.clone();
        let mut run = Run::new(&cfg, archive, manifest, earlier, opts, target, observer);
        let mut result = run.execute(session, &cancel).await;
        if let Some(h) = heartbeat
            && h.stop().await
        {
            result = Err(Error::ReplayHeld {
                id,
                owner: "another process, which took it over".into(),
                expires: "(unknown)".into(),
            });
        }
        let result = run.finish(result).await;
        if let Some((archive, id, location)) = scratch {
            crate::cluster::drill::after_replay(&archive, &id, &location, result.is_ok()).await;
        }
        result
    }
}
