//! Opens the archive's object store — a local directory or an S3 prefix —
//! behind one `Arc<dyn ObjectStore>`, and checks that it is usable.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::archive::layout::Layout;
use crate::config::{ArchiveLocation, Config};
use crate::error::{Error, Result};

/// The archive: its store, where it is, and its layout.
#[derive(Debug, Clone)]
pub struct Archive {
    /// The object store (local directory or S3 bucket).
    pub store: Arc<dyn ObjectStore>,
    /// Where the archive lives, for messages and for engines given a URL.
    pub location: ArchiveLocation,
    /// Paths of data and state objects.
    pub layout: Layout,
}

impl Archive {
    /// Open the configured archive. For a local directory it is created; for
    /// S3 the bucket must exist.
    pub async fn open(cfg: &Config) -> Result<Self> {
        let location = cfg.location()?;
        match &location {
            ArchiveLocation::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::Location {
                    location: location.to_string(),
                    message: format!("cannot create directory: {e}"),
                })?;
                let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| Error::Location {
                    location: location.to_string(),
                    message: e.to_string(),
                })?;
                Ok(Archive {
                    store: Arc::new(fs),
                    location,
                    layout: Layout::new(Path::default()),
                })
            }
            ArchiveLocation::S3 { bucket, prefix } => {
                let sdk = crate::aws::sdk_config(&cfg.aws).await;
                check_bucket(&sdk, cfg.aws.s3_endpoint.as_deref(), bucket, &location).await?;
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(&cfg.aws.region);
                if let Some(creds) = crate::aws::SdkCredentials::from_sdk(&sdk) {
                    b = b.with_credentials(creds);
                }
                if let Some(ep) = &cfg.aws.s3_endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_virtual_hosted_style_request(false)
                        .with_allow_http(ep.starts_with("http://"));
                }
                let s3 = b.build().map_err(|e| Error::Location {
                    location: location.to_string(),
                    message: e.to_string(),
                })?;
                Ok(Archive {
                    store: Arc::new(s3),
                    layout: Layout::new(Path::from(prefix.as_str())),
                    location,
                })
            }
        }
    }

    /// Check that the archive can be listed and written, with a message naming
    /// the location and the likely cause (missing bucket, credentials, permissions).
    pub async fn check_writable(&self) -> Result<()> {
        let probe = self.layout.global_state_dir().join(format!(
            "probe-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_millis()
        ));
        let explain = |e: object_store::Error| {
            let text = e.to_string();
            let hint = if text.contains("NoSuchBucket") || text.contains("bucket does not exist") {
                "the bucket does not exist"
            } else if text.contains("403")
                || text.contains("AccessDenied")
                || text.contains("InvalidAccessKeyId")
                || text.contains("SignatureDoesNotMatch")
            {
                "access denied: check the AWS credentials and the bucket policy"
            } else if text.contains("Permission denied") {
                "permission denied"
            } else {
                "the store rejected a test write"
            };
            Error::Location {
                location: self.location.to_string(),
                message: format!("{hint} ({text})"),
            }
        };
        let what = self.describe(&probe);
        with_retry(&what, || {
            self.store
                .put(&probe, bytes::Bytes::from_static(b"probe").into())
        })
        .await
        .map_err(explain)?;
        with_retry(&what, || self.store.delete(&probe))
            .await
            .map_err(explain)?;
        Ok(())
    }

    /// A printable location of `path` (`s3://bucket/key` or a file path).
    pub fn describe(&self, path: &Path) -> String {
        match &self.location {
            ArchiveLocation::Local(dir) => dir.join(path.as_ref()).display().to_string(),
            ArchiveLocation::S3 { bucket, .. } => format!("s3://{bucket}/{path}"),
        }
    }

    /// List every object under `prefix` (recursively).
    pub async fn list(&self, prefix: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        with_retry(&self.describe(prefix), || {
            self.store.list(Some(prefix)).try_collect()
        })
        .await
        .map_err(|e| Error::store(self.describe(prefix), e))
    }

    /// Read a whole object.
    pub async fn get_bytes(&self, path: &Path) -> Result<bytes::Bytes> {
        with_retry(&self.describe(path), || async {
            self.store.get(path).await?.bytes().await
        })
        .await
        .map_err(|e| Error::store(self.describe(path), e))
    }

    /// Write a whole object (overwriting).
    pub async fn put_bytes(&self, path: &Path, body: bytes::Bytes) -> Result<()> {
        with_retry(&self.describe(path), || {
            self.store.put(path, body.clone().into())
        })
        .await
        .map(|_| ())
        .map_err(|e| Error::store(self.describe(path), e))
    }

    /// Delete an object; a missing object is not an error. On a local
    /// directory, also removes upload leftovers (`<name>#<n>` staging files of a
    /// process killed mid-write), which the object store does not list.
    pub async fn delete_with_leftovers(&self, path: &Path) -> Result<()> {
        match with_retry(&self.describe(path), || self.store.delete(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Error::store(self.describe(path), e)),
        }
        if let ArchiveLocation::Local(dir) = &self.location {
            let full = dir.join(path.as_ref());
            if let (Some(parent), Some(name)) = (full.parent(), full.file_name()) {
                let staged = format!("{}#", name.to_string_lossy());
                if let Ok(rd) = std::fs::read_dir(parent) {
                    for e in rd.flatten() {
                        if e.file_name().to_string_lossy().starts_with(&staged) {
                            std::fs::remove_file(e.path()).map_err(|source| Error::Io {
                                path: e.path(),
                                source,
                            })?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// HeadBucket, so that a missing bucket or missing permission is reported as
/// such (naming the location) before any work starts.
async fn check_bucket(
    sdk: &aws_config::SdkConfig,
    endpoint: Option<&str>,
    bucket: &str,
    location: &ArchiveLocation,
) -> Result<()> {
    // A bucket check must not fail on a transient fault: retry like every other store call.
    let mut b = aws_sdk_s3::config::Builder::from(sdk)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(10));
    if let Some(ep) = endpoint {
        b = b.endpoint_url(ep).force_path_style(true);
    }
    let client = aws_sdk_s3::Client::from_conf(b.build());
    let fail = |message: String| Error::Location {
        location: location.to_string(),
        message,
    };
    match client.head_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
            Some(404) => Err(fail(format!(
                "the bucket does not exist (bucket `{bucket}`)"
            ))),
            Some(403) => Err(fail(format!(
                "access denied to bucket `{bucket}`: check the AWS credentials and the bucket policy"
            ))),
            Some(301) => Err(fail(format!(
                "bucket `{bucket}` is in another region than aws.region"
            ))),
            _ => Err(fail(format!(
                "cannot reach the bucket: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ))),
        },
    }
}

/// Run a store operation, retrying transient failures (connection errors,
/// 5xx answers that the client's own retries did not absorb, e.g. on
/// non-idempotent requests) with exponential backoff and jitter.
pub async fn with_retry<T, F, Fut>(
    what: &str,
    mut op: F,
) -> std::result::Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
{
    let mut backoff = crate::kinesis::Backoff::new(std::time::Duration::from_secs(5));
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e @ object_store::Error::Generic { .. }) if backoff.attempts() < 8 => {
                tracing::warn!("retrying {what}: {e}");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}
