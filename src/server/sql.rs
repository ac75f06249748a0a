//! `POST /api/sql`: one read-only statement over the configured streams.
//! JSON answers carry at most `server.max_rows` rows; `"format": "csv"` or
//! `"arrow"` streams the whole result as a download instead.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::error::Error;
use crate::query::output::base64_binary;

/// The request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SqlRequest {
    sql: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    format: Option<String>,
}

pub(crate) async fn post(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: SqlRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("expected {{\"sql\": \"...\"}}: {e}")))?;
    if req.sql.trim().is_empty() {
        return Err(ApiError::bad("empty SQL"));
    }
    let session = crate::query::session(&state.cfg).await?;
    let df = session.sql(&req.sql).await?;
    let started = Instant::now();
    let format = req.format.as_deref().unwrap_or("json");
    match format {
        "json" => {
            let max = state.cfg.server.max_rows;
            let limit = req.limit.unwrap_or(max).min(max);
            let mut stream = df.execute_stream().await.map_err(|e| session.error(e))?;
            let schema = stream.schema();
            let columns: Vec<serde_json::Value> = schema
                .fields()
                .iter()
                .map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string()}))
                .collect();
            let mut rows: Vec<serde_json::Value> = Vec::new();
            let mut truncated = false;
            while let Some(b) = stream.next().await {
                let b = b.map_err(|e| session.error(e))?;
                if rows.len() + b.num_rows() > limit {
                    let keep = limit - rows.len();
                    rows.extend(json_rows(&b.slice(0, keep))?);
                    truncated = true;
                    break;
                }
                rows.extend(json_rows(&b)?);
            }
            Ok(super::json(
                StatusCode::OK,
                &serde_json::json!({
                    "columns": columns,
                    "row_count": rows.len(),
                    "rows": rows,
                    "truncated": truncated,
                    "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
                }),
            ))
        }
        "csv" | "arrow" => {
            let stream = df.execute_stream().await.map_err(|e| session.error(e))?;
            let schema = stream.schema();
            let csv = format == "csv";
            let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
            tokio::spawn(async move {
                let mut stream = stream;
                let mut ipc = if csv {
                    None
                } else {
                    match arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema) {
                        Ok(w) => Some(w),
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e))).await;
                            return;
                        }
                    }
                };
                let mut header = true;
                let send = |r: std::result::Result<Vec<u8>, String>| {
                    let tx = tx.clone();
                    async move { tx.send(r.map_err(std::io::Error::other)).await.is_ok() }
                };
                while let Some(b) = stream.next().await {
                    let chunk = match b {
                        Err(e) => Err(e.to_string()),
                        Ok(b) => match &mut ipc {
                            None => csv_chunk(&b, header).map_err(|e| e.to_string()),
                            Some(w) => w
                                .write(&b)
                                .map(|_| std::mem::take(w.get_mut()))
                                .map_err(|e| e.to_string()),
                        },
                    };
                    header = false;
                    let failed = chunk.is_err();
                    if !send(chunk).await || failed {
                        return;
                    }
                }
                if let Some(mut w) = ipc {
                    let end = w.finish().map(|_| std::mem::take(w.get_mut()));
                    let _ = send(end.map_err(|e| e.to_string())).await;
                } else if header {
                    // No rows: still send the header line.
                    let empty = RecordBatch::new_empty(schema.clone());
                    let _ = send(csv_chunk(&empty, true).map_err(|e| e.to_string())).await;
                }
            });
            let body = Body::from_stream(tokio_stream(rx));
            let (ctype, name) = if csv {
                ("text/csv; charset=utf-8", "result.csv")
            } else {
                ("application/vnd.apache.arrow.stream", "result.arrows")
            };
            Ok((
                [
                    (header::CONTENT_TYPE, ctype.to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{name}\""),
                    ),
                ],
                body,
            )
                .into_response())
        }
        other => Err(ApiError::bad(format!(
            "unknown format {other:?}: expected json, csv or arrow"
        ))),
    }
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn csv_chunk(b: &RecordBatch, header: bool) -> Result<Vec<u8>, Error> {
    let b = base64_binary(b)?;
    let mut w = arrow::csv::WriterBuilder::new()
        .with_header(header)
        .build(Vec::new());
    w.write(&b)?;
    Ok(w.into_inner())
}

/// Rows of `b` as JSON arrays (binary as base64, timestamps as RFC 3339).
fn json_rows(b: &RecordBatch) -> Result<Vec<serde_json::Value>, Error> {
    if b.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let b = base64_binary(b)?;
    let names: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut w = arrow::json::ArrayWriter::new(Vec::new());
    w.write(&b)?;
    w.finish()?;
    let objects: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(&w.into_inner()).map_err(|e| Error::Query {
            message: format!("encoding rows: {e}"),
        })?;
    Ok(objects
        .into_iter()
        .map(|mut o| {
            serde_json::Value::Array(
                names
                    .iter()
                    .map(|n| o.remove(n).unwrap_or(serde_json::Value::Null))
                    .collect(),
            )
        })
        .collect())
}
