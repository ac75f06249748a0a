//! Error answers: `{"error": "<short message>", "request_id": "<id>"}` with
//! an `X-Request-Id` header on every answer. What a client may not see —
//! paths, bucket keys, endpoints, SDK messages — goes to the server log
//! under the same request id, and the client gets a short message.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::Error;

tokio::task_local! {
    /// The id of the request being answered.
    static REQUEST_ID: String;
}

/// The id of the request this task answers, if any.
pub(crate) fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// An API error: a status and one short message.
#[derive(Debug)]
pub(crate) struct ApiError(pub StatusCode, pub String);

impl ApiError {
    /// 400 with `m`.
    pub fn bad(m: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, m.into())
    }

    /// A failure the client cannot fix: logged in full, answered briefly.
    pub fn internal(status: StatusCode, what: &str, detail: &dyn std::fmt::Display) -> Self {
        tracing::error!("{what}: {detail}");
        ApiError(status, format!("{what}; the server log has the details"))
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match &e {
            Error::Usage(_)
            | Error::Sql { .. }
            | Error::ReadOnly { .. }
            | Error::TooComplex { .. } => ApiError::bad(e.to_string()),
            Error::ResumeConflict { .. } => ApiError(StatusCode::CONFLICT, e.to_string()),
            Error::SameStream { stream } => ApiError(
                StatusCode::CONFLICT,
                format!(
                    "the target is the source stream `{stream}`: replayed records will be read again by its \
                     consumers; send {{\"confirm_same_stream\": true}} to go ahead"
                ),
            ),
            Error::Config { key, message, .. } => {
                tracing::warn!("{e}");
                ApiError::bad(format!("configuration key `{key}`: {message}"))
            }
            Error::StreamNotFound { stream, .. } => {
                tracing::warn!("{e}");
                ApiError::bad(format!("stream `{stream}` not found in Kinesis"))
            }
            Error::Timeout { .. } => ApiError(StatusCode::REQUEST_TIMEOUT, e.to_string()),
            Error::Interrupted => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down".into(),
            ),
            Error::Kinesis { operation, .. } => ApiError::internal(
                StatusCode::BAD_GATEWAY,
                &format!("a Kinesis call ({operation}) failed"),
                &e,
            ),
            Error::Store { .. } | Error::Location { .. } | Error::Parquet { .. } => {
                ApiError::internal(StatusCode::BAD_GATEWAY, "reading the archive failed", &e)
            }
            _ => ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, "the request failed", &e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut v = serde_json::json!({ "error": self.1 });
        if let Some(id) = request_id() {
            v["request_id"] = id.into();
        }
        let mut r = super::json(self.0, &v);
        if matches!(
            self.0,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Give the request an id (logged with everything it causes, and answered
/// as `X-Request-Id`), and turn error answers that are not ours (an unknown
/// method, a body over the limit) into the same JSON shape.
pub(crate) async fn with_request_id(req: Request, next: Next) -> Response {
    let id = format!("{:016x}", rand::random::<u64>());
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path()
    );
    let mut resp = REQUEST_ID
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let body = std::mem::replace(resp.body_mut(), Body::empty());
        let text = axum::body::to_bytes(body, 4096)
            .await
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        let message = if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_string()
        } else {
            text
        };
        let _enter = span.enter();
        let mut fixed =
            REQUEST_ID.sync_scope(id.clone(), || ApiError(status, message).into_response());
        for (k, v) in resp.headers() {
            if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
                fixed.headers_mut().insert(k.clone(), v.clone());
            }
        }
        resp = fixed;
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
