//! `fluxcap serve`: a JSON API and a small web UI for search, replay and
//! monitoring, served by the binary itself (the UI's files are embedded).
//!
//! ```text
//!   GET  /  /app.js  /style.css          the UI (no token: it holds no data)
//!   POST /api/sql                        rows as JSON (row limit), or a streamed CSV / Arrow IPC download
//!   GET  /api/streams                    status: shards, lag, retention risk, archive size per day
//!   POST /api/replays                    start a replay (or a dry run) with the CLI's options
//!   GET  /api/replays[/{id}]             state, progress, rate, errors
//!   DELETE /api/replays/{id}             cancel (resumable: POST /api/replays/{id}/resume)
//!   GET  /metrics                        Prometheus
//!   GET  /api/openapi.json               this API, described
//! ```
//!
//! Every `/api/` call and `/metrics` needs `Authorization: Bearer <token>`
//! ([`token`]). No request may take the server down, run for ever or reach
//! outside its remit: connections are limited and timed ([`http`]), SQL is
//! length- and depth-checked, timed, admitted a few at a time and shares one
//! memory pool ([`sql`]), replays only go to `kinesis://` targets from the
//! archive ([`replays`]), and errors tell the client a short message and a
//! request id while the details go to the log ([`error`]).

mod error;
mod http;
mod replays;
mod sql;
mod streams;
mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::archive::store::Archive;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::query::{QuerySession, ServerLimits, SessionOptions};

pub(crate) use error::ApiError;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");
const OPENAPI: &str = include_str!("openapi.json");

/// Options of `fluxcap serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// `--bind`: overrides `server.bind`.
    pub bind: Option<String>,
}

/// Shared by every handler: one configuration, archive handle, Kinesis
/// client and SQL session for the whole server.
pub(crate) struct AppState {
    /// The effective configuration.
    pub cfg: Config,
    /// The bearer token.
    token: String,
    /// The archive, opened once.
    pub archive: Archive,
    /// The Kinesis client of the configured streams, built once.
    pub kinesis: aws_sdk_kinesis::Client,
    /// The SQL session of every query (one memory pool: `server.memory_limit`).
    pub session: QuerySession,
    /// Query admission and counters.
    pub queries: sql::Queries,
    /// Replays started here.
    pub replays: replays::Manager,
    /// HTTP requests served.
    pub requests: AtomicU64,
    /// HTTP requests answered with a server error.
    pub errors: AtomicU64,
    /// The last `GET /api/streams` answer and when it was made.
    pub streams_cache: tokio::sync::Mutex<Option<(std::time::Instant, serde_json::Value)>>,
}

/// A JSON response.
pub(crate) fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        )
            .into_response(),
    }
}

/// Run the server until `cancel`.
pub async fn serve(cfg: &Config, opts: ServeOptions, cancel: CancellationToken) -> Result<()> {
    let bind = opts.bind.unwrap_or_else(|| cfg.server.bind.clone());
    let addr: SocketAddr = bind.parse().map_err(|_| {
        Error::Usage(format!(
            "--bind expects an address such as 127.0.0.1:8080, got {bind:?}"
        ))
    })?;
    let sv = &cfg.server;
    let tls = match (&sv.tls_cert, &sv.tls_key) {
        (Some(c), Some(k)) => Some(http::tls_acceptor(c, k)?),
        _ => None,
    };
    let (token, origin) = token::resolve(sv, addr)?;
    if !addr.ip().is_loopback() && tls.is_none() && !sv.allow_plain_http {
        return Err(Error::Usage(format!(
            "refusing to listen on {addr} (not loopback) over plain HTTP: the token would cross \
             the network in clear. Set server.tls_cert and server.tls_key, or put a TLS reverse \
             proxy in front and set server.allow_plain_http = true"
        )));
    }
    // One archive handle, Kinesis client and session for every request;
    // an unusable archive fails here rather than on the first request.
    let archive = Archive::open(cfg).await?;
    let kinesis = crate::kinesis::client(cfg).await;
    let session = crate::query::session_with(
        cfg,
        &SessionOptions {
            archive: Some(archive.clone()),
            kinesis: Some(kinesis.clone()),
            server: Some(ServerLimits {
                memory_limit: sv.memory_limit.0,
                recursive_ctes: sv.recursive_ctes,
                max_series_rows: sv.max_series_rows,
            }),
            ..Default::default()
        },
    )
    .await?;
    let state = Arc::new(AppState {
        cfg: cfg.clone(),
        token,
        archive,
        kinesis,
        session,
        queries: sql::Queries::new(sv),
        replays: replays::Manager::new(sv.max_running_replays),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        streams_cache: tokio::sync::Mutex::new(None),
    });
    let api = Router::new()
        .route("/api/sql", post(sql::post))
        .route("/api/streams", get(streams::get))
        .route("/api/replays", post(replays::post).get(replays::list))
        .route(
            "/api/replays/{id}",
            get(replays::get_one).delete(replays::cancel),
        )
        .route("/api/replays/{id}/resume", post(replays::resume))
        .route("/api/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/api/{*rest}", axum::routing::any(not_found))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    let body_limit = usize::try_from(sv.max_request_bytes.0).unwrap_or(usize::MAX);
    let idle = sv.idle_timeout.0;
    let app = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .merge(api)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            http::buffer_body(body_limit, idle, req, next)
        }))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(middleware::from_fn(error::with_request_id))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            path: format!("server address {addr}").into(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        path: format!("server address {addr}").into(),
        source,
    })?;
    {
        use std::io::Write;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {scheme}://{local}");
        let _ = match &origin {
            token::Origin::Terminal => {
                writeln!(out, "open {scheme}://{local}/#token={}", state.token)
            }
            token::Origin::File(f) => {
                writeln!(out, "open {scheme}://{local}/ (token in {})", f.display())
            }
            token::Origin::Configured => {
                writeln!(out, "open {scheme}://{local}/ (token: server.token)")
            }
        };
        let _ = out.flush();
    }
    tracing::info!(address = %local, tls = tls.is_some(), "serving the API and UI");
    http::run(listener, app, tls, http::ConnLimits::of(sv), cancel).await;
    state.replays.cancel_all().await;
    Ok(())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
                ),
            ),
        ],
        body,
    )
        .into_response()
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| token::same(t.trim().as_bytes(), state.token.as_bytes()));
    if !ok {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send Authorization: Bearer <token>".into(),
        )
        .into_response();
    }
    next.run(req).await
}

async fn count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let r = next.run(req).await;
    if r.status().is_server_error() {
        state.errors.fetch_add(1, Ordering::Relaxed);
    }
    r
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such API endpoint".into())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (running, sent) = state.replays.metrics();
    let q = &state.queries;
    let body = format!(
        "# HELP fluxcap_http_requests_total HTTP requests served.\n\
         # TYPE fluxcap_http_requests_total counter\n\
         fluxcap_http_requests_total {}\n\
         # HELP fluxcap_http_errors_total HTTP requests answered with a server error.\n\
         # TYPE fluxcap_http_errors_total counter\n\
         fluxcap_http_errors_total {}\n\
         # HELP fluxcap_sql_queries_running SQL queries running (planning, executing or streaming a download).\n\
         # TYPE fluxcap_sql_queries_running gauge\n\
         fluxcap_sql_queries_running {}\n\
         # HELP fluxcap_sql_queries_total SQL queries admitted.\n\
         # TYPE fluxcap_sql_queries_total counter\n\
         fluxcap_sql_queries_total {}\n\
         # HELP fluxcap_sql_queries_timed_out_total SQL queries stopped by server.query_timeout.\n\
         # TYPE fluxcap_sql_queries_timed_out_total counter\n\
         fluxcap_sql_queries_timed_out_total {}\n\
         # HELP fluxcap_sql_queries_cancelled_total SQL queries stopped because the client went away.\n\
         # TYPE fluxcap_sql_queries_cancelled_total counter\n\
         fluxcap_sql_queries_cancelled_total {}\n\
         # HELP fluxcap_sql_queries_refused_total SQL queries refused because too many were running.\n\
         # TYPE fluxcap_sql_queries_refused_total counter\n\
         fluxcap_sql_queries_refused_total {}\n\
         # HELP fluxcap_replays_running Replays running in this server.\n\
         # TYPE fluxcap_replays_running gauge\n\
         fluxcap_replays_running {running}\n\
         # HELP fluxcap_replay_records_sent_total Records sent by replays started by this server.\n\
         # TYPE fluxcap_replay_records_sent_total counter\n\
         fluxcap_replay_records_sent_total {sent}\n",
        state.requests.load(Ordering::Relaxed),
        state.errors.load(Ordering::Relaxed),
        q.running.load(Ordering::Relaxed),
        q.started.load(Ordering::Relaxed),
        q.timed_out.load(Ordering::Relaxed),
        q.cancelled.load(Ordering::Relaxed),
        q.refused.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
