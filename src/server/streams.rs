//! `GET /api/streams`: what `fluxcap status` shows (shards, lag, retention
//! risk) plus the archive's size per day, per configured stream. Listing a
//! large archive is not free, so the answer is cached for a few seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::{ApiError, AppState};

const CACHE_FOR: Duration = Duration::from_secs(5);

pub(crate) async fn get(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut cache = state.streams_cache.lock().await;
    if let Some((at, v)) = cache.as_ref()
        && at.elapsed() < CACHE_FOR
    {
        return Ok(super::json(StatusCode::OK, v));
    }
    let cfg = &state.cfg;
    let archive = &state.archive;
    let mut out = Vec::new();
    for s in &cfg.streams {
        let status =
            crate::archive::status::status_with(cfg, archive, &state.kinesis, Some(&s.name)).await;
        let mut entry = match status {
            Ok(r) => r
                .streams
                .into_iter()
                .next()
                .and_then(|st| serde_json::to_value(st).ok())
                .unwrap_or_else(|| serde_json::json!({"stream": s.name})),
            Err(e) => {
                tracing::warn!(stream = %s.name, "status unavailable: {e}");
                serde_json::json!({
                    "stream": s.name,
                    "shards": [],
                    "warnings": ["status unavailable (the server log has the details)"],
                })
            }
        };
        let mut days: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let table = archive.layout.stream_dir(&s.name);
        for o in archive.list(&table).await? {
            // Published data only (staged files live under `_fluxcap/`).
            if crate::archive::layout::is_hidden_below(&table, &o.location) {
                continue;
            }
            let dt = o
                .location
                .parts()
                .find_map(|p| p.as_ref().strip_prefix("dt=").map(str::to_string));
            if let Some(dt) = dt
                && o.location.as_ref().ends_with(".parquet")
            {
                let d = days.entry(dt).or_default();
                d.0 += o.size;
                d.1 += 1;
            }
        }
        if let Some(obj) = entry.as_object_mut() {
            obj.insert(
                "format".into(),
                serde_json::to_value(s.format).unwrap_or_default(),
            );
            obj.insert(
                "archive_by_day".into(),
                days.into_iter()
                    .map(|(dt, (bytes, files))| serde_json::json!({"dt": dt, "bytes": bytes, "files": files}))
                    .collect(),
            );
        }
        out.push(entry);
    }
    let v = serde_json::json!({ "streams": out });
    *cache = Some((Instant::now(), v.clone()));
    Ok(super::json(StatusCode::OK, &v))
}
