//! `POST /api/sql`: one read-only statement over the configured streams.
//!
//! JSON answers carry at most `server.max_rows` rows and
//! `server.max_response_bytes` bytes (`"truncated": true` beyond);
//! `"format": "csv"` or `"arrow"` streams the whole result as a download,
//! computed while the client reads it: when the client goes away the query
//! stops. Every query holds one of `server.max_concurrent_queries` slots
//! (others wait `server.query_queue_timeout`, then 503) and ends after
//! `server.query_timeout` (408; a download that already started ends
//! without its final chunk). Statement length and depth are checked before
//! planning (`crate::query::guard`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::DataFusionError;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::DataFrame;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{ApiError, AppState};
use crate::config::ServerConfig;
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
    /// CSV only: prefix cells starting with `=`, `+`, `-`, `@`, tab or CR
    /// with `'`, so spreadsheets show them instead of running them.
    #[serde(default)]
    neutralize_formulas: bool,
}

/// Query admission and counters (shown in `/metrics`).
pub(crate) struct Queries {
    slots: Arc<Semaphore>,
    queue_timeout: Duration,
    timeout: Duration,
    timeout_text: String,
    /// Queries running now.
    pub running: AtomicU64,
    /// Queries admitted.
    pub started: AtomicU64,
    /// Queries stopped by the timeout.
    pub timed_out: AtomicU64,
    /// Queries stopped because the client went away.
    pub cancelled: AtomicU64,
    /// Queries refused for want of a slot.
    pub refused: AtomicU64,
}

impl Queries {
    pub fn new(cfg: &ServerConfig) -> Self {
        let n = match cfg.max_concurrent_queries {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        Queries {
            slots: Arc::new(Semaphore::new(n)),
            queue_timeout: cfg.query_queue_timeout.0,
            timeout: cfg.query_timeout.0,
            timeout_text: cfg.query_timeout.to_string(),
            running: AtomicU64::new(0),
            started: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn timeout_error(&self) -> Error {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
        Error::Timeout {
            limit: self.timeout_text.clone(),
            key: "server.query_timeout",
        }
    }
}

/// A running query: holds its slot, counts as running until dropped, and
/// counts as cancelled when dropped before it finished.
struct Running {
    state: Arc<AppState>,
    finished: bool,
    _slot: OwnedSemaphorePermit,
}

impl Running {
    async fn admit(state: &Arc<AppState>) -> Result<Running, ApiError> {
        let q = &state.queries;
        let slot = match tokio::time::timeout(q.queue_timeout, q.slots.clone().acquire_owned())
            .await
        {
            Ok(Ok(slot)) => slot,
            _ => {
                q.refused.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many queries are running (server.max_concurrent_queries); try again shortly"
                            .into(),
                    ));
            }
        };
        q.started.fetch_add(1, Ordering::Relaxed);
        q.running.fetch_add(1, Ordering::Relaxed);
        Ok(Running {
            state: state.clone(),
            finished: false,
            _slot: slot,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let q = &self.state.queries;
        q.running.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            q.cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::info!("query stopped: the client went away");
        }
    }
}

/// An engine error as the client may see it: the user's mistakes in full,
/// failures reading the archive or Kinesis only in the log.
fn engine_error(state: &AppState, e: DataFusionError) -> ApiError {
    match e.find_root() {
        DataFusionError::ResourcesExhausted(m) => {
            tracing::warn!("query memory exhausted: {m}");
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the query needs more memory than the server's queries may share \
                 (server.memory_limit); narrow it or try again later"
                    .into(),
            )
        }
        DataFusionError::External(_)
        | DataFusionError::ObjectStore(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ParquetError(_) => ApiError::internal(
            StatusCode::BAD_GATEWAY,
            "reading the archive or Kinesis failed",
            &e,
        ),
        _ => match state.session.error(e) {
            Error::Query { message } => ApiError::bad(format!("query failed: {message}")),
            other => other.into(),
        },
    }
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
    let format = req.format.clone().unwrap_or_else(|| "json".into());
    if !matches!(format.as_str(), "json" | "csv" | "arrow") {
        return Err(ApiError::bad(format!(
            "unknown format {format:?}: expected json, csv or arrow"
        )));
    }
    state.session.limits.check_length(&req.sql)?;
    let mut running = Running::admit(&state).await?;
    let started = Instant::now();
    let deadline = started + state.queries.timeout;
    let start = async {
        let df = state.session.sql(&req.sql).await.map_err(ApiError::from)?;
        execute(&state, df).await
    };
    let stream = match tokio::time::timeout_at(deadline, start).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            running.finished = true;
            return Err(e);
        }
        Err(_) => {
            running.finished = true;
            return Err(state.queries.timeout_error().into());
        }
    };
    if format == "json" {
        let r = tokio::time::timeout_at(deadline, json_answer(&state, stream, &req, started)).await;
        running.finished = true;
        return match r {
            Ok(r) => r,
            Err(_) => Err(state.queries.timeout_error().into()),
        };
    }
    // Wait for the first batch (within the deadline) before answering, so a
    // query that fails or times out early still gets an error status.
    let mut stream = stream;
    let first = match tokio::time::timeout_at(deadline, stream.next()).await {
        Err(_) => {
            running.finished = true;
            return Err(state.queries.timeout_error().into());
        }
        Ok(Some(Err(e))) => {
            running.finished = true;
            return Err(engine_error(&state, e));
        }
        Ok(first) => first.and_then(|r| r.ok()),
    };
    let csv = format == "csv";
    let encoder = if csv {
        Encoder::Csv {
            header: true,
            neutralize: req.neutralize_formulas,
        }
    } else {
        Encoder::Arrow(Box::new(
            arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &stream.schema()).map_err(
                |e| ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, "encoding", &e),
            )?,
        ))
    };
    let download = Download {
        schema: stream.schema(),
        first,
        stream,
        encoder,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        running,
        done: false,
    };
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
        Body::from_stream(download),
    )
        .into_response())
}

/// Run `df` with every operator made cooperative: each one spends the
/// task's scheduling budget, so even an operator looping over its input
/// (an aggregate over a huge cross join) yields regularly, and the timeout
/// or a client that goes away can stop it. (DataFusion only makes the
/// leaves cooperative, which is not enough when one leaf batch turns into
/// millions of output batches.)
async fn execute(state: &AppState, df: DataFrame) -> Result<SendableRecordBatchStream, ApiError> {
    let task = Arc::new(df.task_ctx());
    let plan = df
        .create_physical_plan()
        .await
        .map_err(|e| engine_error(state, e))?;
    let plan = plan
        .transform_up(|p| {
            Ok(Transformed::yes(
                Arc::new(CooperativeExec::new(p)) as Arc<dyn ExecutionPlan>
            ))
        })
        .map_err(|e| engine_error(state, e))?
        .data;
    datafusion::physical_plan::execute_stream(plan, task).map_err(|e| engine_error(state, e))
}

/// Collect the JSON answer within `server.max_rows` and `server.max_response_bytes`.
async fn json_answer(
    state: &AppState,
    mut stream: SendableRecordBatchStream,
    req: &SqlRequest,
    started: Instant,
) -> Result<Response, ApiError> {
    let max = state.cfg.server.max_rows;
    let limit = req.limit.unwrap_or(max).min(max);
    let schema = stream.schema();
    let columns: Vec<serde_json::Value> = schema
        .fields()
        .iter()
        .map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string()}))
        .collect();
    // Room for the rows: the limit less the columns and the other fields.
    let overhead = serde_json::to_vec(&columns).map_or(0, |v| v.len()) + 256;
    let max_bytes = (state.cfg.server.max_response_bytes.0 as usize).saturating_sub(overhead);
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = false;
    'batches: while let Some(b) = stream.next().await {
        let b = b.map_err(|e| engine_error(state, e))?;
        let room = limit - rows.len();
        let slice = b.slice(0, b.num_rows().min(room));
        for row in json_rows(&slice)? {
            bytes += serde_json::to_vec(&row).map_or(0, |v| v.len()) + 1;
            if bytes > max_bytes {
                truncated = true;
                break 'batches;
            }
            rows.push(row);
        }
        if b.num_rows() > room {
            truncated = true;
            break;
        }
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

/// How a download is encoded.
enum Encoder {
    Csv { header: bool, neutralize: bool },
    Arrow(Box<arrow::ipc::writer::StreamWriter<Vec<u8>>>),
}

/// A download's body: polled by the connection as the client reads, so the
/// query computes only while the client takes the result, stops when the
/// body is dropped (the client went away), and ends with an error (no final
/// chunk) at the deadline.
struct Download {
    /// The first batch, read before answering.
    first: Option<RecordBatch>,
    stream: SendableRecordBatchStream,
    schema: arrow::datatypes::SchemaRef,
    encoder: Encoder,
    deadline: Pin<Box<tokio::time::Sleep>>,
    running: Running,
    done: bool,
}

impl Download {
    fn encode(&mut self, b: &RecordBatch) -> Result<Vec<u8>, Error> {
        match &mut self.encoder {
            Encoder::Csv { header, neutralize } => {
                let out = csv_chunk(b, *header, *neutralize)?;
                *header = false;
                Ok(out)
            }
            Encoder::Arrow(w) => {
                w.write(b)?;
                Ok(std::mem::take(w.get_mut()))
            }
        }
    }

    fn finish(&mut self) -> Result<Vec<u8>, Error> {
        match &mut self.encoder {
            // No rows: still the header line.
            Encoder::Csv { header: true, .. } => {
                let empty = RecordBatch::new_empty(self.schema.clone());
                self.encode(&empty)
            }
            Encoder::Csv { .. } => Ok(Vec::new()),
            Encoder::Arrow(w) => {
                w.finish()?;
                Ok(std::mem::take(w.get_mut()))
            }
        }
    }

    fn fail(&mut self, e: impl std::fmt::Display) -> Poll<Option<std::io::Result<Vec<u8>>>> {
        tracing::warn!("download stopped: {e}");
        self.done = true;
        self.running.finished = true;
        Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
    }
}

impl Stream for Download {
    type Item = std::io::Result<Vec<u8>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let e = self.running.state.queries.timeout_error();
            return self.fail(e);
        }
        if let Some(b) = self.first.take() {
            return match self.encode(&b) {
                Ok(bytes) => Poll::Ready(Some(Ok(bytes))),
                Err(e) => self.fail(e),
            };
        }
        match self.stream.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => match self.encode(&b) {
                Ok(bytes) => Poll::Ready(Some(Ok(bytes))),
                Err(e) => self.fail(e),
            },
            Poll::Ready(Some(Err(e))) => self.fail(e),
            Poll::Ready(None) => {
                self.done = true;
                self.running.finished = true;
                match self.finish() {
                    Ok(bytes) => Poll::Ready(Some(Ok(bytes))),
                    Err(e) => self.fail(e),
                }
            }
        }
    }
}

fn csv_chunk(b: &RecordBatch, header: bool, neutralize: bool) -> Result<Vec<u8>, Error> {
    let mut b = base64_binary(b)?;
    if neutralize {
        b = neutralize_formulas(&b)?;
    }
    let mut w = arrow::csv::WriterBuilder::new()
        .with_header(header)
        .build(Vec::new());
    w.write(&b)?;
    Ok(w.into_inner())
}

/// Whether a spreadsheet would take the cell for a formula.
fn formula_like(s: &str) -> bool {
    s.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// Text columns with formula-like cells prefixed by `'` (numbers are left alone).
fn neutralize_formulas(b: &RecordBatch) -> Result<RecordBatch, Error> {
    let mut fields = Vec::with_capacity(b.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(b.num_columns());
    for (f, col) in b.schema().fields().iter().zip(b.columns()) {
        if !matches!(
            f.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            fields.push(f.as_ref().clone());
            columns.push(col.clone());
            continue;
        }
        let text = arrow::compute::cast(col, &DataType::Utf8)?;
        let text = text
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::Query {
                message: "a text column is not text".into(),
            })?;
        let fixed: StringArray = text
            .iter()
            .map(|v| {
                v.map(|s| {
                    if formula_like(s) {
                        format!("'{s}")
                    } else {
                        s.to_string()
                    }
                })
            })
            .collect();
        fields.push(Field::new(f.name(), DataType::Utf8, f.is_nullable()));
        columns.push(Arc::new(fixed) as ArrayRef);
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_neutralized_in_text_columns_only() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("t", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    Some("=1+2"),
                    Some("+x"),
                    Some("-y"),
                    Some("@SUM(A1)"),
                    Some("ok"),
                    None,
                ])),
                Arc::new(arrow::array::Int64Array::from(vec![-1, 2, -3, 4, 5, 6])),
            ],
        )
        .unwrap();
        let csv = String::from_utf8(csv_chunk(&b, true, true).unwrap()).unwrap();
        assert_eq!(csv, "t,n\n'=1+2,-1\n'+x,2\n'-y,-3\n'@SUM(A1),4\nok,5\n,6\n");
        let plain = String::from_utf8(csv_chunk(&b, false, false).unwrap()).unwrap();
        assert!(plain.starts_with("=1+2,-1\n"), "{plain}");
    }
}
