//! Replays started over the API: run in this process, watched through an
//! [`Observer`], cancelled with a token; their state also lives in the store
//! (`_fluxcap/replays/`), so replays started by the CLI show up too and a
//! cancelled one can be resumed later, here or with `fluxcap replay --resume`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState};
use crate::archive::store::Archive;
use crate::replay::state::{self, Phase, Progress, Source};
use crate::replay::target::Target;
use crate::replay::{self, Observer, ReplayOptions};

/// `POST /api/replays`: the CLI's option names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayRequest {
    stream: String,
    to: String,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default, rename = "where")]
    predicate: Option<String>,
    #[serde(default)]
    compact: bool,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    tombstone: Option<String>,
    #[serde(default)]
    tombstones: Option<String>,
    #[serde(default)]
    include_replayed: bool,
    #[serde(default)]
    unordered: bool,
    #[serde(default)]
    annotate: Annotations,
    #[serde(default)]
    no_annotate: bool,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rate: Option<f64>,
    #[serde(default)]
    confirm_same_stream: bool,
}

/// `annotate` as an object or as `["k=v", …]`.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Annotations {
    #[default]
    None,
    Map(BTreeMap<String, String>),
    List(Vec<String>),
}

impl Annotations {
    fn pairs(self) -> Vec<String> {
        match self {
            Annotations::None => Vec::new(),
            Annotations::Map(m) => m.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            Annotations::List(l) => l,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Done,
    Cancelled,
    Failed(String),
}

/// How long an ended job stays in memory (its state stays in the store).
const ENDED_KEEP: Duration = Duration::from_secs(30);

/// A replay running (or just run) in this process.
struct Job {
    manifest: Arc<state::Manifest>,
    cancel: CancellationToken,
    observer: Arc<Observer>,
    started: Instant,
    ended: Arc<StdMutex<Option<(Ended, Instant)>>>,
}

impl Job {
    fn ended(&self) -> Option<(Ended, Instant)> {
        lock(&self.ended).clone()
    }

    fn view(&self) -> JobView {
        JobView {
            manifest: self.manifest.clone(),
            ended: self.ended().map(|(e, _)| e),
            sent: self.observer.sent.load(Ordering::Relaxed),
            sent_this_run: self.observer.sent_this_run.load(Ordering::Relaxed),
            total: self.observer.total.load(Ordering::Relaxed),
            secs: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// What a job looks like at one moment (taken under the lock, used after).
struct JobView {
    manifest: Arc<state::Manifest>,
    ended: Option<Ended>,
    sent: u64,
    sent_this_run: u64,
    total: u64,
    secs: f64,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The replays of this server. The map's lock is never held across an
/// await: store I/O happens on copies taken under it.
pub(crate) struct Manager {
    jobs: StdMutex<HashMap<String, Job>>,
    /// `server.max_running_replays`.
    max_running: usize,
    /// Records sent by runs that ended (a resumed replay replaces its job).
    ended_sent: Arc<std::sync::atomic::AtomicU64>,
}

impl Manager {
    pub fn new(max_running: usize) -> Self {
        Manager {
            jobs: StdMutex::new(HashMap::new()),
            max_running,
            ended_sent: Arc::default(),
        }
    }

    /// Start a prepared replay, unless `server.max_running_replays` run already.
    fn start(&self, prepared: replay::Prepared) -> Result<String, ApiError> {
        let id = prepared.id().to_string();
        let cancel = CancellationToken::new();
        let observer = Arc::new(Observer::default());
        let ended = Arc::new(StdMutex::new(None));
        {
            let mut jobs = lock(&self.jobs);
            prune(&mut jobs, Instant::now());
            let running = jobs.values().filter(|j| j.ended().is_none()).count();
            if running >= self.max_running {
                return Err(ApiError(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{running} replays are running, the most this server runs at once \
                         (server.max_running_replays); try again when one ends"
                    ),
                ));
            }
            jobs.insert(
                id.clone(),
                Job {
                    manifest: Arc::new(prepared.manifest().clone()),
                    cancel: cancel.clone(),
                    observer: observer.clone(),
                    started: Instant::now(),
                    ended: ended.clone(),
                },
            );
        }
        let rid = id.clone();
        let ended_sent = self.ended_sent.clone();
        tokio::spawn(async move {
            let r = prepared.run(cancel.clone(), Some(observer.clone())).await;
            let e = match r {
                Ok(_) => Ended::Done,
                Err(crate::Error::Interrupted) if cancel.is_cancelled() => Ended::Cancelled,
                Err(e) => {
                    tracing::warn!(replay = %rid, "replay failed: {e}");
                    Ended::Failed(e.to_string())
                }
            };
            let mut slot = lock(&ended);
            ended_sent.fetch_add(
                observer.sent_this_run.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            *slot = Some((e, Instant::now()));
        });
        Ok(id)
    }

    /// A view of job `id`, if it is in memory.
    fn view(&self, id: &str) -> Option<JobView> {
        lock(&self.jobs).get(id).map(Job::view)
    }

    /// Cancel every running job (server shutdown); waits briefly for them to save progress.
    pub async fn cancel_all(&self) {
        let ends: Vec<_> = {
            let jobs = lock(&self.jobs);
            for j in jobs.values() {
                j.cancel.cancel();
            }
            jobs.values().map(|j| j.ended.clone()).collect()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && ends.iter().any(|e| lock(e).is_none()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (running jobs, records sent by all jobs).
    pub fn metrics(&self) -> (usize, u64) {
        let jobs = lock(&self.jobs);
        let mut running = 0;
        let mut sent = self.ended_sent.load(Ordering::Relaxed);
        for j in jobs.values() {
            // Read `ended` and the count under the job's lock, so a run
            // that just ended is counted once (its count moves to `ended_sent`
            // under the same lock).
            let ended = lock(&j.ended);
            if ended.is_none() {
                running += 1;
                sent += j.observer.sent_this_run.load(Ordering::Relaxed);
            }
        }
        (running, sent)
    }
}

/// Drop jobs that ended more than [`ENDED_KEEP`] before `now`.
fn prune(jobs: &mut HashMap<String, Job>, now: Instant) {
    jobs.retain(|_, j| match j.ended() {
        Some((_, at)) => now.saturating_duration_since(at) < ENDED_KEEP,
        None => true,
    });
}

/// The server's archive handle and Kinesis client, for a replay.
fn shared(state: &AppState) -> replay::Shared {
    replay::Shared {
        archive: state.archive.clone(),
        kinesis: state.kinesis.clone(),
    }
}

fn source_name(s: &Source) -> String {
    match s {
        Source::Stream { stream } => stream.clone(),
        Source::Parquet { location, .. } => format!("parquet:{location}"),
    }
}

/// The API's view of one replay.
fn info(m: &state::Manifest, p: Option<&Progress>, job: Option<&JobView>) -> serde_json::Value {
    let mut sent = p.map(|p| p.sent).unwrap_or(0);
    let mut total = p.and_then(|p| p.total);
    let mut rate = None;
    let mut error = p.and_then(|p| p.error.clone());
    let stored = match p.map(|p| p.phase) {
        None => "queued",
        Some(Phase::Done) => "done",
        Some(Phase::Interrupted) if error.is_some() => "failed",
        // Stopped by its reader (a CLI replay to standard output): resumable.
        Some(Phase::Interrupted) | Some(Phase::OutputClosed) => "cancelled",
        Some(Phase::Running) => match state::describe_phase(p, state::process_alive) {
            "running" => "running",
            _ => {
                error.get_or_insert_with(|| "the process running it stopped".into());
                "failed"
            }
        },
    };
    let mut st = stored.to_string();
    if let Some(j) = job {
        sent = sent.max(j.sent);
        if j.total != u64::MAX {
            total = Some(j.total);
        }
        if j.secs > 0.0 {
            rate = Some(j.sent_this_run as f64 / j.secs);
        }
        st = match j.ended.clone() {
            None => "running".into(),
            Some(Ended::Done) => "done".into(),
            Some(Ended::Cancelled) => "cancelled".into(),
            Some(Ended::Failed(e)) => {
                error = Some(e);
                "failed".into()
            }
        };
    }
    serde_json::json!({
        "id": m.id,
        "state": st,
        "source": source_name(&m.source),
        "target": m.target,
        "created_at": m.created_at,
        "sent": sent,
        "total": total,
        "records_per_sec": rate,
        "rejected": p.map(|p| p.rejected).unwrap_or(0),
        "error": error,
        "compact": m.selection.compact,
        "where": m.selection.predicate,
    })
}

pub(crate) async fn post(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let r: ReplayRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("bad replay request: {e}")))?;
    let target = Target::parse(&r.to)?;
    let source = Source::Stream {
        stream: r.stream.clone(),
    };
    replay::target::check_same_stream(&source, &target, r.confirm_same_stream)?;
    if !matches!(target, Target::Kinesis(_)) {
        return Err(ApiError::bad(
            "over the API a replay goes to kinesis://<stream>; file targets are for the CLI",
        ));
    }
    if let Some(rate) = r.rate
        && !(0.01..=1e9).contains(&rate)
    {
        return Err(ApiError::bad(format!(
            "rate expects records per second from 0.01 to 1e9, got {rate}"
        )));
    }
    if !state.cfg.streams.iter().any(|s| s.name == r.stream) {
        return Err(ApiError::bad(format!(
            "stream `{}` is not configured (configured: {})",
            r.stream,
            state
                .cfg
                .streams
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let opts = ReplayOptions {
        stream: Some(r.stream),
        to: Some(r.to),
        since: r.since.filter(|s| !s.trim().is_empty()),
        until: r.until.filter(|s| !s.trim().is_empty()),
        predicate: r.predicate.filter(|s| !s.trim().is_empty()),
        compact: r.compact,
        key: r.key.filter(|s| !s.trim().is_empty()),
        tombstone: r.tombstone.filter(|s| !s.trim().is_empty()),
        tombstones: r.tombstones.filter(|s| !s.trim().is_empty()),
        include_replayed: r.include_replayed,
        unordered: r.unordered,
        annotate: r.annotate.pairs(),
        no_annotate: r.no_annotate,
        rate: r.rate,
        dry_run: r.dry_run,
        confirm_same_stream: r.confirm_same_stream,
        quiet: true,
        shared: Some(shared(&state)),
        ..Default::default()
    };
    let prepared = replay::prepare(&state.cfg, opts).await?;
    if r.dry_run {
        let id = prepared.id().to_string();
        let t = state.cfg.server.query_timeout;
        let summary = tokio::time::timeout(t.0, prepared.run(CancellationToken::new(), None))
            .await
            .map_err(|_| crate::Error::Timeout {
                limit: t.to_string(),
                key: "server.query_timeout",
            })??;
        return Ok(super::json(
            StatusCode::OK,
            &serde_json::json!({
                "id": id,
                "dry_run": true,
                "summary": summary,
            }),
        ));
    }
    let id = state.replays.start(prepared)?;
    Ok(super::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"id": id, "state": "running"}),
    ))
}

pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut all = state::list(&state.archive).await?;
    all.reverse();
    let views: Vec<(String, JobView)> = {
        let mut jobs = lock(&state.replays.jobs);
        prune(&mut jobs, Instant::now());
        jobs.iter().map(|(id, j)| (id.clone(), j.view())).collect()
    };
    let mut out = Vec::new();
    for (id, j) in &views {
        if !all.iter().any(|(m, _)| &m.id == id) {
            out.push(info(&j.manifest, None, Some(j)));
        }
    }
    for (m, p) in &all {
        let j = views.iter().find(|(id, _)| id == &m.id).map(|(_, j)| j);
        out.push(info(m, p.as_ref(), j));
    }
    Ok(super::json(
        StatusCode::OK,
        &serde_json::json!({ "replays": out }),
    ))
}

fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() < 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "bad replay id: expected letters, digits, - and _",
        ))
    }
}

async fn load(state: &AppState, id: &str) -> Result<(state::Manifest, Option<Progress>), ApiError> {
    check_id(id)?;
    state::load(&state.archive, id).await.map_err(|e| match e {
        crate::Error::Usage(_) => ApiError(StatusCode::NOT_FOUND, format!("no replay {id}")),
        e => e.into(),
    })
}

pub(crate) async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    if let Some(j) = state.replays.view(&id) {
        // Started here: its manifest may not be in the store yet.
        let p = state::load(&state.archive, &id)
            .await
            .ok()
            .and_then(|(_, p)| p);
        let j = state.replays.view(&id).unwrap_or(j);
        return Ok(super::json(
            StatusCode::OK,
            &info(&j.manifest, p.as_ref(), Some(&j)),
        ));
    }
    let (m, p) = load(&state, &id).await?;
    let j = state.replays.view(&id);
    Ok(super::json(
        StatusCode::OK,
        &info(&m, p.as_ref(), j.as_ref()),
    ))
}

pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let found = {
        let jobs = lock(&state.replays.jobs);
        jobs.get(&id)
            .map(|j| (j.ended().is_some(), j.cancel.clone(), j.ended.clone()))
    };
    let Some((ended_already, token, ended)) = found else {
        load(&state, &id).await?;
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("replay {id} is not running in this server"),
        ));
    };
    if ended_already {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("replay {id} is not running"),
        ));
    }
    token.cancel();
    // Wait (briefly) until its progress is saved, so a resume starts from it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && lock(&ended).is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(super::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"id": id, "state": "cancelled"}),
    ))
}

/// `POST /api/replays/{id}/resume`: an optional body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResumeRequest {
    #[serde(default)]
    confirm_same_stream: bool,
}

/// Whether a stored manifest may be resumed through the API: stored
/// manifests are not trusted (anyone with store access can write one), so
/// only `kinesis://` targets, sources that are a configured stream or the
/// archive's own scratch results, and the same-stream confirmation.
fn check_remit(
    state: &AppState,
    m: &state::Manifest,
    confirm_same_stream: bool,
) -> Result<(), ApiError> {
    let id = &m.id;
    let target = match Target::parse(&m.target) {
        Ok(t @ Target::Kinesis(_)) => t,
        _ => {
            tracing::warn!(replay = %id, target = %m.target, "API resume refused: not a kinesis:// target");
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "replay {id} does not go to a kinesis:// stream; over the API only those are resumed \
                     (use `fluxcap replay --resume {id}`)"
                ),
            ));
        }
    };
    match &m.source {
        Source::Stream { stream } if state.cfg.streams.iter().any(|s| &s.name == stream) => {}
        Source::Parquet {
            location,
            stream: Some(_),
        } if in_scratch(&state.archive, location) => {}
        _ => {
            tracing::warn!(replay = %id, source = ?m.source, "API resume refused: source outside the archive");
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "replay {id} reads from outside this server's archive; over the API only replays \
                     of configured streams are resumed (use `fluxcap replay --resume {id}`)"
                ),
            ));
        }
    }
    replay::target::check_same_stream(&m.source, &target, confirm_same_stream)?;
    Ok(())
}

/// Whether `location` is inside the archive's Drill scratch area.
fn in_scratch(archive: &Archive, location: &str) -> bool {
    let dir = archive.layout.global_state_dir().join("drill-scratch");
    let prefix = match &archive.location {
        crate::config::ArchiveLocation::Local(root) => {
            root.join(dir.as_ref()).display().to_string()
        }
        crate::config::ArchiveLocation::S3 { bucket, .. } => format!("s3://{bucket}/{dir}"),
    };
    let prefix = format!("{}/", prefix.trim_end_matches('/'));
    location.starts_with(&prefix)
        && !location[prefix.len()..]
            .split(['/', '\\'])
            .any(|part| part == ".." || part == ".")
}

pub(crate) async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let req: ResumeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ResumeRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("bad resume request: {e}")))?
    };
    if let Some(j) = state.replays.view(&id)
        && j.ended.is_none()
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("replay {id} is running"),
        ));
    }
    let (m, _) = load(&state, &id).await?;
    check_remit(&state, &m, req.confirm_same_stream)?;
    let opts = ReplayOptions {
        resume: Some(id.clone()),
        confirm_same_stream: req.confirm_same_stream,
        quiet: true,
        shared: Some(shared(&state)),
        ..Default::default()
    };
    let prepared = replay::prepare(&state.cfg, opts)
        .await
        .map_err(|e| match e {
            crate::Error::Usage(m) => ApiError(StatusCode::CONFLICT, m),
            e => e.into(),
        })?;
    // The manifest prepared is the one checked (a resume reloads it).
    if prepared.manifest().target != m.target || prepared.manifest().source != m.source {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("replay {id} changed while it was being resumed"),
        ));
    }
    let id = state.replays.start(prepared)?;
    Ok(super::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"id": id, "state": "running"}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_jobs_are_pruned() {
        let job = |ended: Option<Instant>| Job {
            manifest: Arc::new(state::Manifest {
                version: 1,
                id: "r".into(),
                created_at: String::new(),
                as_of_ms: 0,
                source: Source::Stream { stream: "s".into() },
                target: "kinesis://t".into(),
                selection: state::Selection::default(),
                annotate: state::Annotate {
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
            }),
            cancel: CancellationToken::new(),
            observer: Arc::default(),
            started: Instant::now(),
            ended: Arc::new(StdMutex::new(ended.map(|at| (Ended::Done, at)))),
        };
        let now = Instant::now();
        let mut jobs = HashMap::new();
        jobs.insert("running".to_string(), job(None));
        jobs.insert("just-ended".to_string(), job(Some(now)));
        jobs.insert("long-ended".to_string(), job(Some(now)));
        prune(&mut jobs, now + ENDED_KEEP / 2);
        assert_eq!(jobs.len(), 3);
        if let Some(j) = jobs.get("long-ended") {
            *lock(&j.ended) = Some((Ended::Done, now - ENDED_KEEP));
        }
        prune(&mut jobs, now + ENDED_KEEP / 2);
        let mut left: Vec<_> = jobs.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["just-ended", "running"]);
    }
}
