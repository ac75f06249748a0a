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
//! Every `/api/` call and `/metrics` needs `Authorization: Bearer <token>`:
//! the configured `server.token` (or `FLUXCAP_SERVER_TOKEN`), else one
//! generated at start and printed once. Listening on a non-loopback address
//! without a configured token is refused. Requests are size-limited, JSON
//! results row-limited, replays only go to `kinesis://` targets, and a
//! replay into its own source stream needs `"confirm_same_stream": true`.

mod replays;
mod sql;
mod streams;

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

use crate::config::Config;
use crate::error::{Error, Result};

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

/// Shared by every handler.
pub(crate) struct AppState {
    pub cfg: Config,
    token: String,
    pub replays: replays::Manager,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub streams_cache: tokio::sync::Mutex<Option<(std::time::Instant, serde_json::Value)>>,
}

/// An API error: a status and one message, as `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad(m: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, m.into())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Usage(_)
            | Error::Sql { .. }
            | Error::ReadOnly { .. }
            | Error::Config { .. }
            | Error::StreamNotFound { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(self.0, &serde_json::json!({ "error": self.1 }))
    }
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
    let (token, generated) = match &cfg.server.token {
        Some(t) => (t.clone(), false),
        None if addr.ip().is_loopback() => (generate_token(), true),
        None => {
            return Err(Error::Usage(format!(
                "refusing to listen on {addr} (not loopback) without a configured token: \
                 set server.token or FLUXCAP_SERVER_TOKEN"
            )));
        }
    };
    // Fail early on an unusable archive rather than on the first request.
    crate::archive::store::Archive::open(cfg).await?;
    let state = Arc::new(AppState {
        cfg: cfg.clone(),
        token: token.clone(),
        replays: replays::Manager::default(),
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
        .layer(DefaultBodyLimit::max(
            cfg.server.max_request_bytes.0 as usize,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count))
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
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on http://{local}");
        if generated {
            let _ = writeln!(out, "open http://{local}/#token={token}");
        } else {
            let _ = writeln!(out, "open http://{local}/ (token: server.token)");
        }
        let _ = out.flush();
    }
    tracing::info!(address = %local, "serving the API and UI");
    let shutdown = cancel.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|source| Error::Io {
            path: format!("server address {local}").into(),
            source,
        })?;
    state.replays.cancel_all().await;
    Ok(())
}

fn generate_token() -> String {
    (0..32)
        .map(|_| format!("{:x}", rand::random::<u8>() & 0x0f))
        .collect()
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

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), state.token.as_bytes()));
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
    let (running, sent) = state.replays.metrics().await;
    let body = format!(
        "# HELP fluxcap_http_requests_total HTTP requests served.\n\
         # TYPE fluxcap_http_requests_total counter\n\
         fluxcap_http_requests_total {}\n\
         # HELP fluxcap_http_errors_total HTTP requests answered with a server error.\n\
         # TYPE fluxcap_http_errors_total counter\n\
         fluxcap_http_errors_total {}\n\
         # HELP fluxcap_replays_running Replays running in this server.\n\
         # TYPE fluxcap_replays_running gauge\n\
         fluxcap_replays_running {running}\n\
         # HELP fluxcap_replay_records_sent_total Records sent by replays started by this server.\n\
         # TYPE fluxcap_replay_records_sent_total counter\n\
         fluxcap_replay_records_sent_total {sent}\n",
        state.requests.load(Ordering::Relaxed),
        state.errors.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = generate_token();
        assert_eq!(t.len(), 32);
        assert!(same(t.as_bytes(), t.clone().as_bytes()));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
