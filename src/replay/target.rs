//! Where a replay sends records: another (or the same) Kinesis stream, a
//! JSON-lines file, or standard output.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use serde::Serialize;

use crate::consistency::rfc3339_ms;
use crate::error::{Error, Result};
use crate::replay::state::Source;

/// A parsed `--to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `kinesis://<stream>`; region, account and endpoint come from `[replay]`.
    Kinesis(String),
    /// `file://<path>`: JSON lines.
    File(PathBuf),
    /// `-`: JSON lines on standard output.
    Stdout,
}

impl Target {
    /// Parse `kinesis://name`, `file://path` (relative or absolute) or `-`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "-" {
            return Ok(Target::Stdout);
        }
        if let Some(name) = s.strip_prefix("kinesis://") {
            let name = name.trim_end_matches('/');
            if name.is_empty() || name.contains('/') {
                return Err(Error::Usage(format!(
                    "expected kinesis://<stream name>, got {s:?}"
                )));
            }
            return Ok(Target::Kinesis(name.to_string()));
        }
        if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(Error::Usage(format!("expected file://<path>, got {s:?}")));
            }
            return Ok(Target::File(PathBuf::from(path)));
        }
        Err(Error::Usage(format!(
            "unknown replay target {s:?}: expected kinesis://<stream>, file://<path.jsonl> or - (standard output)"
        )))
    }
}

/// The stream a replay reads from, when `target` is that same stream.
pub fn same_stream<'a>(source: &'a Source, target: &Target) -> Option<&'a str> {
    let source = match source {
        Source::Stream { stream } => stream.as_str(),
        Source::Parquet {
            stream: Some(stream),
            ..
        } => stream.as_str(),
        Source::Parquet { stream: None, .. } => return None,
    };
    matches!(target, Target::Kinesis(t) if t == source).then_some(source)
}

/// Refuse a replay into the stream it reads from unless the caller
/// confirmed it (`--confirm-same-stream`, or `confirm_same_stream` over the
/// API): its consumers will read the replayed records again.
pub fn check_same_stream(source: &Source, target: &Target, confirmed: bool) -> Result<()> {
    match same_stream(source, target) {
        Some(stream) if !confirmed => Err(Error::SameStream {
            stream: stream.to_string(),
        }),
        _ => Ok(()),
    }
}

/// One record as a JSON line (file and standard-output targets).
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    /// The replay (absent with `--no-annotate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_id: Option<&'a str>,
    /// Original stream.
    pub stream: &'a str,
    /// Original shard.
    pub shard_id: &'a str,
    /// Original sequence number.
    pub sequence_number: &'a str,
    /// Original sub-sequence number.
    pub subsequence_number: i64,
    /// Partition key.
    pub partition_key: &'a str,
    /// Explicit hash key.
    pub explicit_hash_key: Option<&'a str>,
    /// Arrival time, RFC 3339 UTC with milliseconds.
    pub approximate_arrival_timestamp: String,
    /// Payload as text (JSON streams, valid UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a str>,
    /// Payload as standard base64 (binary streams, or not UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// `--annotate` pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Line<'a> {
    /// Payload fields: text when allowed and valid UTF-8, else base64.
    pub fn payload(data: &'a [u8], text: bool) -> (Option<&'a str>, Option<String>) {
        if text && let Ok(s) = std::str::from_utf8(data) {
            return (Some(s), None);
        }
        (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(data)),
        )
    }

    /// Arrival time as written.
    pub fn time(ms: i64) -> String {
        rfc3339_ms(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("kinesis://orders").ok(),
            Some(Target::Kinesis("orders".into()))
        );
        assert_eq!(
            Target::parse("file://out/x.jsonl").ok(),
            Some(Target::File("out/x.jsonl".into()))
        );
        assert_eq!(Target::parse("-").ok(), Some(Target::Stdout));
        assert!(Target::parse("s3://b/x").is_err());
        assert!(Target::parse("kinesis://").is_err());
    }

    #[test]
    fn same_stream_needs_confirmation() {
        let s = Source::Stream {
            stream: "orders".into(),
        };
        let to = |t: &str| Target::Kinesis(t.into());
        assert!(check_same_stream(&s, &to("orders"), false).is_err());
        assert!(check_same_stream(&s, &to("orders"), true).is_ok());
        assert!(check_same_stream(&s, &to("other"), false).is_ok());
        assert!(check_same_stream(&s, &Target::Stdout, false).is_ok());
        let labelled = Source::Parquet {
            location: "/r".into(),
            stream: Some("orders".into()),
        };
        assert_eq!(same_stream(&labelled, &to("orders")), Some("orders"));
        let unlabelled = Source::Parquet {
            location: "/r".into(),
            stream: None,
        };
        assert_eq!(same_stream(&unlabelled, &to("orders")), None);
    }

    #[test]
    fn payload_text_or_base64() {
        assert_eq!(Line::payload(b"{}", true), (Some("{}"), None));
        assert_eq!(Line::payload(b"{}", false), (None, Some("e30=".into())));
        assert_eq!(Line::payload(&[0xff], true), (None, Some("/w==".into())));
    }
}
