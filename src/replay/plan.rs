//! Planning a replay: checking the options, fixing the horizon and the
//! lineage, and building the manifest (or loading it to resume); and the SQL
//! session whose table the selection reads (the unified view `S`, or a
//! Parquet result set from `--from-parquet` or `--engine drill`).

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;

use crate::archive::store::Archive;
use crate::config::{Config, PayloadFormat, StreamConfig};
use crate::consistency;
use crate::error::{Error, Result};
use crate::query::{self, QuerySession, SessionOptions};
use crate::replay::select::{self, cast};
use crate::replay::state::{self, Annotate, Manifest, Phase, Progress, Selection, Source};
use crate::replay::target::Target;
use crate::replay::{ReplayOptions, Shared};

pub(crate) fn parse_pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>> {
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

pub(super) fn new_id(now: chrono::DateTime<chrono::Utc>) -> String {
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

pub(super) async fn new_manifest(
    cfg: &Config,
    archive: &Archive,
    opts: &ReplayOptions,
) -> Result<(Manifest, Option<(QuerySession, String)>)> {
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
    if opts.follow {
        let conflicting: Vec<&str> = [
            (opts.compact, "--compact"),
            (opts.until.is_some(), "--until"),
            (!opts.to_sequence.is_empty(), "--to-sequence"),
            (opts.from_parquet.is_some(), "--from-parquet"),
            (opts.engine.is_some(), "--engine"),
            (opts.dry_run, "--dry-run"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if !conflicting.is_empty() {
            return Err(Error::Usage(format!(
                "--follow keeps reading new records, which {} cannot bound or compact",
                conflicting.join(", ")
            )));
        }
    }
    if opts.unordered && opts.no_annotate {
        return Err(Error::Usage(
            "--unordered needs the annotation (consumers order a key's records by it): drop --no-annotate"
                .into(),
        ));
    }
    if let Some(r) = opts.rate {
        check_rate(r)?;
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
        emit_tombstones: emit_tombstones(opts, &to)?,
        include_replayed: opts.include_replayed,
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
    let (source, selection, drill_lineage) = match opts.engine.as_deref() {
        None => (source, selection, None),
        Some("drill") => {
            let (source, selection, lineage) =
                drill_selection(cfg, archive, source, selection, &id, opts, now_ms).await?;
            (source, selection, Some(lineage))
        }
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
    // One view for the horizon and the whole selection: the same snapshot,
    // the same shard listing and one read of the live tail.
    let (horizon, lineage, session) = match &source {
        Source::Stream { stream } => {
            let session = stream_session(cfg, stream, now_ms, opts.shared.as_ref()).await?;
            let (h, l) = horizon(&session, stream).await?;
            select::register(&session.ctx, Some(&h), &l);
            (Some(h), l, Some((session, query::quote(stream))))
        }
        // Drill's result is ordered with the source stream's lineage.
        Source::Parquet { .. } => (None, drill_lineage.unwrap_or_default(), None),
    };
    let manifest = Manifest {
        version: state::MANIFEST_VERSION,
        id,
        created_at: consistency::rfc3339_ms(now_ms),
        as_of_ms: now_ms,
        source,
        target: to,
        selection,
        annotate,
        rate: opts.rate,
        unordered: opts.unordered,
        follow: opts.follow,
        horizon,
        lineage,
    };
    Ok((manifest, session))
}

/// `--tombstones`: emit by default when the target is the source stream or
/// the replay forces overwrites (the consumers' state must lose the deleted
/// keys), drop otherwise.
fn emit_tombstones(opts: &ReplayOptions, to: &str) -> Result<bool> {
    match opts.tombstones.as_deref() {
        Some("emit") | Some("drop") if opts.tombstone.is_none() => Err(Error::Usage(
            "--tombstones says what happens to the keys that --tombstone deletes: give --tombstone too"
                .into(),
        )),
        Some("emit") => Ok(true),
        Some("drop") => Ok(false),
        Some(other) => Err(Error::Usage(format!(
            "--tombstones expects emit or drop, got {other:?}"
        ))),
        None => {
            let same = matches!(
                (Target::parse(to), &opts.stream),
                (Ok(Target::Kinesis(t)), Some(s)) if t == *s
            );
            Ok(opts.tombstone.is_some() && (same || opts.force_overwrite))
        }
    }
}

/// The session of a replay of `stream`: one view (snapshot, listing, live
/// tail) for all of its statements, live records up to `as_of_ms`.
async fn stream_session(
    cfg: &Config,
    stream: &str,
    as_of_ms: i64,
    shared: Option<&Shared>,
) -> Result<QuerySession> {
    let (cfg, _) = with_stream(cfg, stream);
    query::session_with(
        &cfg,
        &SessionOptions {
            as_of_ms: Some(as_of_ms),
            now_ms: Some(as_of_ms),
            pinned: true,
            ..Shared::session_options(shared)
        },
    )
    .await
}

/// Run the selection on Drill as a CTAS into the archive's scratch
/// workspace; the replay then reads those files, ordered with the source
/// stream's lineage (also Drill's tie-break). A dry run leaves the source as
/// it is: [`drill_dry_run`] only counts on Drill.
async fn drill_selection(
    cfg: &Config,
    archive: &Archive,
    source: Source,
    selection: Selection,
    id: &str,
    opts: &ReplayOptions,
    now_ms: i64,
) -> Result<(Source, Selection, BTreeMap<String, u32>)> {
    let Source::Stream { stream } = source else {
        return Err(Error::Usage(
            "--engine drill replays a stream's archive: give --stream, not --from-parquet".into(),
        ));
    };
    let session = stream_session(cfg, &stream, now_ms, opts.shared.as_ref()).await?;
    let (_, lineage) = horizon(&session, &stream).await?;
    if opts.dry_run {
        return Ok((Source::Stream { stream }, selection, lineage));
    }
    let (url, plugin) = drill_target(opts);
    let table = crate::cluster::drill::scratch_table(id);
    let location = crate::cluster::drill::materialise(
        archive, url, plugin, &stream, &table, &selection, &lineage,
    )
    .await?;
    Ok((
        Source::Parquet {
            location,
            stream: Some(stream),
        },
        // Drill applied the bounds, filter and compaction.
        Selection::default(),
        lineage,
    ))
}

fn drill_target(opts: &ReplayOptions) -> (&str, &str) {
    (
        opts.drill_url.as_deref().unwrap_or("http://localhost:8047"),
        opts.drill_plugin.as_deref().unwrap_or("archive"),
    )
}

/// `replay --engine drill --dry-run`: count the selection on Drill (no
/// CTAS, nothing written, nothing sent) and report it.
pub(super) async fn drill_dry_run(
    cfg: &Config,
    archive: &Archive,
    opts: &ReplayOptions,
) -> Result<()> {
    let (m, _) = new_manifest(cfg, archive, opts).await?;
    let Source::Stream { stream } = &m.source else {
        return Err(Error::Usage(
            "--engine drill replays a stream's archive: give --stream, not --from-parquet".into(),
        ));
    };
    let (url, plugin) = drill_target(opts);
    let n = crate::cluster::drill::count(url, plugin, stream, &m.selection, &m.lineage).await?;
    let sql = crate::cluster::drill::replay_sql(
        plugin,
        stream,
        &crate::cluster::drill::scratch_table(&m.id),
        &m.selection,
        &m.lineage,
    );
    if opts.json {
        println!(
            "{}",
            serde_json::json!({
                "dry_run": true, "engine": "drill", "target": m.target,
                "records": n, "ctas": sql,
            })
        );
    } else {
        println!(
            "dry run on Drill ({url}): {n} records would be replayed to {}",
            m.target
        );
        println!("the replay would run: {sql}");
    }
    Ok(())
}

pub(super) async fn resume_manifest(
    archive: &Archive,
    opts: &ReplayOptions,
    id: &str,
) -> Result<(Manifest, Option<Progress>)> {
    let (mut m, p) = state::load(archive, id).await?;
    let conflicts = resume_conflicts(&m, opts)?;
    if !conflicts.is_empty() {
        return Err(Error::ResumeConflict {
            id: id.to_string(),
            conflicts,
        });
    }
    if let Some(r) = opts.rate {
        check_rate(r)?;
        // This run's pace only: the manifest keeps the rate it started with.
        m.rate = Some(r);
    }
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

fn check_rate(r: f64) -> Result<()> {
    if r > 0.0 && r.is_finite() {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--rate expects records per second > 0, got {r}"
        )))
    }
}

/// A stored or given option's value as `--resume` shows it.
fn shown(v: Option<&str>) -> String {
    v.map_or_else(|| "(none)".to_string(), |s| format!("{s:?}"))
}

fn shown_pairs(p: &BTreeMap<String, String>) -> String {
    if p.is_empty() {
        return "(none)".into();
    }
    let items: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{:?}", items.join(" "))
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.to_string()
}

/// The options given with `--resume` that differ from the ones the replay
/// was started with (`--where: stored "…", given "…"`), and those that only
/// apply when a replay starts. Options equal to the stored ones are
/// accepted, and `--rate` may change (it only paces this run).
fn resume_conflicts(m: &Manifest, opts: &ReplayOptions) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut differ = |opt: &str, stored: String, given: String| {
        out.push(format!("{opt}: stored {stored}, given {given}"));
    };
    let sel = &m.selection;
    let (stored_stream, stored_parquet) = match &m.source {
        Source::Stream { stream } => (Some(stream.as_str()), None),
        Source::Parquet { location, stream } => (stream.as_deref(), Some(location.as_str())),
    };
    if let Some(s) = &opts.stream
        && stored_stream != Some(s.as_str())
    {
        differ("--stream", shown(stored_stream), shown(Some(s)));
    }
    if let Some(l) = &opts.from_parquet
        && stored_parquet != Some(l.as_str())
    {
        differ("--from-parquet", shown(stored_parquet), shown(Some(l)));
    }
    if let Some(t) = &opts.to
        && Target::parse(t)? != Target::parse(&m.target)?
    {
        differ("--to", shown(Some(&m.target)), shown(Some(t)));
    }
    // Relative times (`2h`) count from the replay's start, as they did then.
    let time = |ms: Option<i64>| ms.map(consistency::rfc3339_ms);
    for (opt, given, stored) in [
        ("--since", &opts.since, sel.since_ms),
        ("--until", &opts.until, sel.until_ms),
    ] {
        if let Some(g) = given {
            let ms = select::parse_time(g, m.as_of_ms)?;
            if Some(ms) != stored {
                differ(
                    opt,
                    shown(time(stored).as_deref()),
                    format!("{g:?} ({})", consistency::rfc3339_ms(ms)),
                );
            }
        }
    }
    for (opt, given, stored) in [
        ("--from-sequence", &opts.from_sequence, &sel.from_sequence),
        ("--to-sequence", &opts.to_sequence, &sel.to_sequence),
        ("--annotate", &opts.annotate, &m.annotate.pairs),
    ] {
        if !given.is_empty() {
            let g = parse_pairs(given, opt)?;
            if &g != stored {
                differ(opt, shown_pairs(stored), shown_pairs(&g));
            }
        }
    }
    for (opt, given, stored) in [
        ("--where", &opts.predicate, &sel.predicate),
        ("--key", &opts.key, &sel.key),
        ("--tombstone", &opts.tombstone, &sel.tombstone),
    ] {
        if let Some(g) = given
            && Some(g) != stored.as_ref()
        {
            differ(opt, shown(stored.as_deref()), shown(Some(g)));
        }
    }
    if let Some(t) = &opts.tombstones {
        let stored = if sel.emit_tombstones { "emit" } else { "drop" };
        if t != stored {
            differ("--tombstones", shown(Some(stored)), shown(Some(t)));
        }
    }
    for (opt, given, stored) in [
        ("--compact", opts.compact, sel.compact),
        (
            "--include-replayed",
            opts.include_replayed,
            sel.include_replayed,
        ),
        ("--no-annotate", opts.no_annotate, !m.annotate.enabled),
        ("--envelope", opts.envelope, m.annotate.envelope),
        ("--unordered", opts.unordered, m.unordered),
        ("--follow", opts.follow, m.follow),
        (
            "--force-overwrite",
            opts.force_overwrite,
            m.annotate.force_overwrite,
        ),
    ] {
        if given && !stored {
            differ(opt, on_off(stored), on_off(given));
        }
    }
    for (opt, given) in [
        ("--engine", opts.engine.is_some()),
        ("--drill-url", opts.drill_url.is_some()),
        ("--drill-plugin", opts.drill_plugin.is_some()),
        ("--dry-run", opts.dry_run),
    ] {
        if given {
            out.push(format!("{opt}: only applies when a replay starts"));
        }
    }
    Ok(out)
}

/// Refuse `--where`, `--key` and `--tombstone` expressions that call a
/// volatile function (`random()`, `uuid()`, …): they select other records
/// each time the query runs, so a resumed run would skip the wrong ones.
/// Time functions are not volatile here: the replay's session pins them to
/// its start ([`SessionOptions::now_ms`]).
pub(super) async fn check_deterministic(
    session: &QuerySession,
    table: &str,
    sel: &Selection,
) -> Result<()> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Expr, Volatility};
    let exprs = [
        ("--where", sel.predicate.as_deref()),
        ("--key", sel.key.as_deref()),
        ("--tombstone", sel.tombstone.as_deref()),
    ];
    for (option, expr) in exprs {
        let Some(expr) = expr else { continue };
        let df = session
            .sql(&format!("SELECT ({expr}) AS __x FROM {table} LIMIT 0"))
            .await?;
        let mut volatile: Option<String> = None;
        df.logical_plan()
            .apply_with_subqueries(|p| {
                p.apply_expressions(|e| {
                    e.apply(|e| match e {
                        Expr::ScalarFunction(f)
                            if f.func.signature().volatility == Volatility::Volatile =>
                        {
                            volatile = Some(f.func.name().to_string());
                            Ok(TreeNodeRecursion::Stop)
                        }
                        _ => Ok(TreeNodeRecursion::Continue),
                    })
                })
            })
            .map_err(|e| session.error(e))?;
        if let Some(f) = volatile {
            return Err(Error::Usage(format!(
                "{option}: {f}() gives other values each time the selection runs, so a resumed replay \
                 would skip other records; use a deterministic expression (now() and the other time \
                 functions are fixed at the replay's start)"
            )));
        }
    }
    Ok(())
}

/// The horizon of `stream` in the session's view: each shard's last
/// sequence number (archived or in Kinesis), and the shards' lineage depths.
async fn horizon(
    session: &QuerySession,
    stream: &str,
) -> Result<(BTreeMap<String, Option<String>>, BTreeMap<String, u32>)> {
    let snapshot = session.snapshot(stream).await?;
    let listed = match session.shards(stream).await? {
        Some(l) => l,
        None => {
            tracing::warn!(
                stream,
                "the stream is not in Kinesis: replaying archived records only"
            );
            Default::default()
        }
    };
    let links: Vec<(String, Option<String>, Option<String>)> = listed
        .iter()
        .map(|s| {
            (
                s.shard_id.clone(),
                s.parents.first().cloned(),
                s.parents.get(1).cloned(),
            )
        })
        .collect();
    let mut archived = Vec::new();
    for c in snapshot.shards.values() {
        if !listed.iter().any(|s| s.shard_id == c.shard_id) {
            archived.push((
                c.shard_id.clone(),
                c.parents.first().cloned(),
                c.parents.get(1).cloned(),
            ));
        }
    }
    let lineage: BTreeMap<String, u32> = consistency::replay_depths(&links, &archived)
        .into_iter()
        .collect();
    let mut h: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (shard, _, _) in links.iter().chain(&archived) {
        h.insert(
            shard.clone(),
            snapshot.committed(shard).map(|p| p.sequence_number.clone()),
        );
    }
    if !listed.is_empty() {
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
pub(super) async fn selection_session(
    cfg: &Config,
    m: &Manifest,
    shared: Option<&Shared>,
) -> Result<(QuerySession, String)> {
    match &m.source {
        Source::Stream { stream } => {
            let s = stream_session(cfg, stream, m.as_of_ms, shared).await?;
            select::register(&s.ctx, m.horizon.as_ref(), &m.lineage);
            Ok((s, query::quote(stream)))
        }
        Source::Parquet { location, .. } => {
            let s = query::session_with(
                cfg,
                &SessionOptions {
                    streams_optional: true,
                    now_ms: Some(m.as_of_ms),
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
    // Copies are known as copies here too.
    for c in crate::query::origin::columns() {
        if !has(c) {
            extra.push(format!(
                "get_field({}(data), '{c}') AS {c}",
                crate::query::origin::ORIGIN_FN
            ));
        }
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
    fn ids_sort_by_time_and_have_a_fixed_length() {
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let a = new_id(t);
        assert_eq!(a.len(), "r-20231114T221320Z-0000".len());
        assert!(a.starts_with("r-20231114T221320Z-"));
    }

    fn manifest() -> Manifest {
        let as_of_ms = 1_700_000_000_000;
        Manifest {
            version: state::MANIFEST_VERSION,
            id: "r".into(),
            created_at: String::new(),
            as_of_ms,
            source: Source::Stream { stream: "s".into() },
            target: "-".into(),
            selection: Selection {
                predicate: Some("a = 1".into()),
                since_ms: Some(as_of_ms - 7_200_000),
                ..Default::default()
            },
            annotate: Annotate {
                enabled: true,
                envelope: false,
                binary: false,
                field: "_fluxcap".into(),
                pairs: BTreeMap::new(),
                force_overwrite: false,
            },
            rate: None,
            unordered: false,
            follow: false,
            horizon: None,
            lineage: BTreeMap::new(),
        }
    }

    #[test]
    fn resume_accepts_the_stored_options_and_a_new_rate() {
        let same = ReplayOptions {
            stream: Some("s".into()),
            to: Some("-".into()),
            predicate: Some("a = 1".into()),
            since: Some("2h".into()),
            rate: Some(5.0),
            confirm_same_stream: true,
            json: true,
            ..Default::default()
        };
        let c = resume_conflicts(&manifest(), &same).map_err(|e| e.to_string());
        assert_eq!(c, Ok(vec![]));
    }

    #[test]
    fn resume_names_every_option_that_differs() {
        let other = ReplayOptions {
            predicate: Some("a = 2".into()),
            since: Some("3h".into()),
            compact: true,
            annotate: vec!["t=x".into()],
            tombstones: Some("emit".into()),
            engine: Some("drill".into()),
            ..Default::default()
        };
        let c = resume_conflicts(&manifest(), &other).unwrap_or_default();
        assert_eq!(
            c,
            vec![
                "--since: stored \"2023-11-14T20:13:20.000Z\", given \"3h\" (2023-11-14T19:13:20.000Z)"
                    .to_string(),
                "--annotate: stored (none), given \"t=x\"".into(),
                "--where: stored \"a = 1\", given \"a = 2\"".into(),
                "--tombstones: stored \"drop\", given \"emit\"".into(),
                "--compact: stored off, given on".into(),
                "--engine: only applies when a replay starts".into(),
            ]
        );
    }

    #[test]
    fn pairs() {
        let p = parse_pairs(&["a=1".into(), "b = x=y".into()], "--annotate").unwrap_or_default();
        assert_eq!(p.get("b").map(String::as_str), Some("x=y"));
        assert!(parse_pairs(&["nope".into()], "--annotate").is_err());
    }
}
