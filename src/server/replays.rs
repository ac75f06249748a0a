//! Replays started over the API: run in this process, watched through an
//! [`Observer`], cancelled with a token; their state also lives in the store
//! (`_fluxcap/replays/`), so replays started by the CLI show up too and a
//! cancelled one can be resumed later, here or with `fluxcap replay --resume`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::Mutex;
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

/// A replay running (or run) in this process.
struct Job {
    manifest: state::Manifest,
    cancel: CancellationToken,
    observer: Arc<Observer>,
    started: Instant,
    ended: Arc<Mutex<Option<Ended>>>,
}

/// The replays of this server.
#[derive(Default)]
pub(crate) struct Manager {
    jobs: Mutex<HashMap<String, Job>>,
    /// Records sent by runs that ended (a resumed replay replaces its job).
    ended_sent: Arc<std::sync::atomic::AtomicU64>,
}

impl Manager {
    async fn start(&self, prepared: replay::Prepared) -> String {
        let id = prepared.id().to_string();
        let cancel = CancellationToken::new();
        let observer = Arc::new(Observer::default());
        let ended = Arc::new(Mutex::new(None));
        let job = Job {
            manifest: prepared.manifest().clone(),
            cancel: cancel.clone(),
            observer: observer.clone(),
            started: Instant::now(),
            ended: ended.clone(),
        };
        self.jobs.lock().await.insert(id.clone(), job);
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
            let mut slot = ended.lock().await;
            ended_sent.fetch_add(
                observer.sent_this_run.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            *slot = Some(e);
        });
        id
    }

    /// Cancel every running job (server shutdown); waits briefly for them to save progress.
    pub async fn cancel_all(&self) {
        let jobs = self.jobs.lock().await;
        for j in jobs.values() {
            j.cancel.cancel();
        }
        let ends: Vec<_> = jobs.values().map(|j| j.ended.clone()).collect();
        drop(jobs);
        for _ in 0..50 {
            let mut all = true;
            for e in &ends {
                all &= e.lock().await.is_some();
            }
            if all {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// (running jobs, records sent by all jobs).
    pub async fn metrics(&self) -> (usize, u64) {
        let jobs = self.jobs.lock().await;
        let mut running = 0;
        let mut sent = self.ended_sent.load(Ordering::Relaxed);
        for j in jobs.values() {
            if j.ended.lock().await.is_none() {
                running += 1;
                sent += j.observer.sent_this_run.load(Ordering::Relaxed);
            }
        }
        (running, sent)
    }
}

fn source_name(s: &Source) -> String {
    match s {
        Source::Stream { stream } => stream.clone(),
        Source::Parquet { location, .. } => format!("parquet:{location}"),
    }
}

/// The API's view of one replay.
async fn info(m: &state::Manifest, p: Option<&Progress>, job: Option<&Job>) -> serde_json::Value {
    let mut sent = p.map(|p| p.sent).unwrap_or(0);
    let mut total = p.and_then(|p| p.total);
    let mut rate = None;
    let mut error = p.and_then(|p| p.error.clone());
    let stored = match p.map(|p| p.phase) {
        None => "queued",
        Some(Phase::Done) => "done",
        Some(Phase::Interrupted) if error.is_some() => "failed",
        Some(Phase::Interrupted) => "cancelled",
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
        let ended = j.ended.lock().await.clone();
        sent = sent.max(j.observer.sent.load(Ordering::Relaxed));
        let t = j.observer.total.load(Ordering::Relaxed);
        if t != u64::MAX {
            total = Some(t);
        }
        let secs = j.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            rate = Some(j.observer.sent_this_run.load(Ordering::Relaxed) as f64 / secs);
        }
        st = match ended {
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
    match Target::parse(&r.to)? {
        Target::Kinesis(t) if t == r.stream && !r.confirm_same_stream => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "the target is the source stream `{t}`: replayed records will be read again by its consumers; \
                     send \"confirm_same_stream\": true to go ahead"
                ),
            ));
        }
        Target::Kinesis(_) => {}
        _ => {
            return Err(ApiError::bad(
                "over the API a replay goes to kinesis://<stream>; file targets are for the CLI",
            ));
        }
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
        annotate: r.annotate.pairs(),
        no_annotate: r.no_annotate,
        rate: r.rate,
        dry_run: r.dry_run,
        quiet: true,
        ..Default::default()
    };
    let prepared = replay::prepare(&state.cfg, opts).await?;
    if r.dry_run {
        let id = prepared.id().to_string();
        let summary = prepared.run(CancellationToken::new(), None).await?;
        return Ok(super::json(
            StatusCode::OK,
            &serde_json::json!({
                "id": id,
                "dry_run": true,
                "summary": summary,
            }),
        ));
    }
    let id = state.replays.start(prepared).await;
    Ok(super::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"id": id, "state": "running"}),
    ))
}

pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let archive = Archive::open(&state.cfg).await?;
    let mut all = state::list(&archive).await?;
    all.reverse();
    let jobs = state.replays.jobs.lock().await;
    let mut out = Vec::new();
    for (id, j) in jobs.iter() {
        if !all.iter().any(|(m, _)| &m.id == id) {
            out.push(info(&j.manifest, None, Some(j)).await);
        }
    }
    for (m, p) in &all {
        out.push(info(m, p.as_ref(), jobs.get(&m.id)).await);
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
        Err(ApiError::bad(format!("bad replay id {id:?}")))
    }
}

async fn load(state: &AppState, id: &str) -> Result<(state::Manifest, Option<Progress>), ApiError> {
    check_id(id)?;
    let archive = Archive::open(&state.cfg).await?;
    state::load(&archive, id).await.map_err(|e| match e {
        crate::Error::Usage(m) => ApiError(StatusCode::NOT_FOUND, m),
        e => e.into(),
    })
}

pub(crate) async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let jobs = state.replays.jobs.lock().await;
    if let Some(j) = jobs.get(&id) {
        // Started here: its manifest may not be in the store yet.
        let archive = Archive::open(&state.cfg).await?;
        let p = state::load(&archive, &id).await.ok().and_then(|(_, p)| p);
        return Ok(super::json(
            StatusCode::OK,
            &info(&j.manifest, p.as_ref(), Some(j)).await,
        ));
    }
    drop(jobs);
    let (m, p) = load(&state, &id).await?;
    let jobs = state.replays.jobs.lock().await;
    Ok(super::json(
        StatusCode::OK,
        &info(&m, p.as_ref(), jobs.get(&id)).await,
    ))
}

pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let jobs = state.replays.jobs.lock().await;
    let Some(job) = jobs.get(&id) else {
        drop(jobs);
        load(&state, &id).await?;
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("replay {id} is not running in this server"),
        ));
    };
    if job.ended.lock().await.is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("replay {id} is not running"),
        ));
    }
    job.cancel.cancel();
    let ended = job.ended.clone();
    drop(jobs);
    // Wait (briefly) until its progress is saved, so a resume starts from it.
    for _ in 0..100 {
        if ended.lock().await.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(super::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"id": id, "state": "cancelled"}),
    ))
}

pub(crate) async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    {
        let jobs = state.replays.jobs.lock().await;
        if let Some(j) = jobs.get(&id)
            && j.ended.lock().await.is_none()
        {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("replay {id} is running"),
            ));
        }
    }
    load(&state, &id).await?;
    let opts = ReplayOptions {
        resume: Some(id.clone()),
        quiet: true,
        ..Default::default()
    };
    let prepared = replay::prepare(&state.cfg, opts)
        .await
        .map_err(|e| match e {
            crate::Error::Usage(m) => ApiError(StatusCode::CONFLICT, m),
            e => e.into(),
        })?;
    let id = state.replays.start(prepared).await;
    Ok(super::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"id": id, "state": "running"}),
    ))
}
