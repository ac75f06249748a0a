//! Kinesis: client set-up, shard discovery and lineage, the shard readers
//! (GetRecords polling, enhanced fan-out), KPL de-aggregation, the
//! PutRecords writer (replay), and the retry policy for throttling and
//! transient faults.

pub mod fanout;
pub mod kpl;
pub mod pace;
pub mod reader;
pub mod shards;
pub mod writer;

use std::time::Duration;

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use rand::Rng;

use crate::config::Config;

pub use aws_sdk_kinesis::Client;

/// A Kinesis client for the configured region, profile and endpoint.
///
/// The SDK's own retries are off: [`Backoff`] retries throttling and transient
/// faults without limit (a record is never skipped), with full jitter.
///
/// Its HTTPS connections offer HTTP/2 (ALPN), which SubscribeToShard needs
/// (`archiver.read = "fanout"`). `AWS_CA_BUNDLE` (a PEM file, as for the AWS
/// CLI) adds certificate authorities to trust, e.g. a TLS-inspecting proxy's
/// or a local emulator's.
pub async fn client(cfg: &Config) -> Client {
    let sdk = crate::aws::sdk_config(&cfg.aws).await;
    let mut b = aws_sdk_kinesis::config::Builder::from(&sdk)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        );
    if let Some(ep) = &cfg.aws.kinesis_endpoint {
        b = b.endpoint_url(ep);
    }
    if let Some(http) = ca_bundle_client() {
        b = b.http_client(http);
    }
    Client::from_conf(b.build())
}

/// An HTTPS client that also trusts the certificates of `AWS_CA_BUNDLE`;
/// `None` (the SDK's default client) when it is unset or unreadable.
fn ca_bundle_client() -> Option<aws_sdk_kinesis::config::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
    let path = std::env::var_os("AWS_CA_BUNDLE").filter(|p| !p.is_empty())?;
    let pem = match std::fs::read(&path) {
        Ok(pem) => pem,
        Err(e) => {
            tracing::warn!(
                "AWS_CA_BUNDLE {}: {e}; using the system's certificate authorities only",
                path.to_string_lossy()
            );
            return None;
        }
    };
    let ctx = TlsContext::builder()
        .with_trust_store(TrustStore::default().with_pem_certificate(pem))
        .build();
    match ctx {
        Ok(ctx) => Some(
            aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
                .tls_context(ctx)
                .build_https(),
        ),
        Err(e) => {
            tracing::warn!(
                "AWS_CA_BUNDLE {}: {e}; using the system's certificate authorities only",
                path.to_string_lossy()
            );
            None
        }
    }
}

/// How a failed call should be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Throttling, 5xx, timeouts, connection errors: back off and retry.
    Retry(String),
    /// The shard iterator expired: get a new one after the last record.
    ExpiredIterator,
    /// The stream or shard does not exist.
    NotFound(String),
    /// Anything else: give up with this message.
    Fatal(String),
}

/// The error for a call about `stream` that failed for good.
pub fn stream_error(
    operation: &'static str,
    stream: &str,
    failure: Failure,
) -> crate::error::Error {
    use crate::error::Error;
    match failure {
        Failure::NotFound(detail) => Error::StreamNotFound {
            stream: stream.into(),
            detail,
        },
        Failure::Retry(m) | Failure::Fatal(m) => Error::Kinesis {
            operation,
            stream: stream.into(),
            shard: None,
            message: m,
        },
        Failure::ExpiredIterator => Error::Kinesis {
            operation,
            stream: stream.into(),
            shard: None,
            message: "unexpected expired iterator".into(),
        },
    }
}

/// Classify an SDK error.
pub fn classify<E, R>(err: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            let code = e.code().unwrap_or("");
            let msg = format!("{code}: {}", e.message().unwrap_or(""));
            match code {
                "ExpiredIteratorException" => Failure::ExpiredIterator,
                "ResourceNotFoundException" => Failure::NotFound(msg),
                "ProvisionedThroughputExceededException"
                | "KMSThrottlingException"
                | "LimitExceededException"
                | "ThrottlingException"
                | "InternalFailure"
                | "InternalFailureException"
                | "ServiceUnavailable"
                | "ServiceUnavailableException"
                | "RequestTimeout" => Failure::Retry(msg),
                _ => {
                    let status = format!("{:?}", se.raw());
                    if code.is_empty()
                        || status.contains("StatusCode(5")
                        || status.contains("status: 5")
                    {
                        Failure::Retry(format!("server error {msg} {}", short(&status)))
                    } else {
                        Failure::Fatal(msg)
                    }
                }
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            let text = format!("{}", aws_sdk_kinesis::error::DisplayErrorContext(err));
            if text.contains("loading credentials") || text.contains("no credentials") {
                // Retrying cannot conjure credentials: say so at once.
                Failure::Fatal(format!(
                    "no usable AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
                     or aws.profile in the configuration): {}",
                    text.chars().take(160).collect::<String>()
                ))
            } else {
                Failure::Retry(text)
            }
        }
        _ => Failure::Fatal(format!(
            "{}",
            aws_sdk_kinesis::error::DisplayErrorContext(err)
        )),
    }
}

/// Whether `err` is a throttling answer (the shard's or the account's
/// limits, not a fault): callers that pace themselves back off and retry
/// without counting it as a failed attempt.
pub fn is_throttling<E, R>(err: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(se) => matches!(
            se.err().code(),
            Some(
                "ProvisionedThroughputExceededException"
                    | "KMSThrottlingException"
                    | "LimitExceededException"
                    | "ThrottlingException"
            )
        ),
        _ => false,
    }
}

fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Exponential backoff with full jitter: 100 ms doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// A new backoff capped at `max`.
    pub fn new(max: Duration) -> Self {
        Backoff {
            attempt: 0,
            base: Duration::from_millis(100),
            max,
        }
    }

    /// The next delay (random in [0, min(max, base·2^attempt)]).
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let ms = rand::rng().random_range(0..=cap.as_millis() as u64);
        Duration::from_millis(ms.max(10))
    }

    /// Consecutive failures so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Forget past failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(800));
        for _ in 0..50 {
            assert!(b.next_delay() <= Duration::from_millis(800));
        }
        assert_eq!(b.attempts(), 50);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
