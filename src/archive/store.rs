//! Opens the archive's object store — a local directory or an S3 prefix —
//! behind one `Arc<dyn ObjectStore>`, and checks that it is usable.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3CopyIfNotExists};
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
                let root = Path::parse(prefix.as_str())
                    .ok()
                    .filter(|p| p.as_ref() == prefix);
                let Some(root) = root else {
                    return Err(Error::Location {
                        location: location.to_string(),
                        message: "the prefix must be plain path segments without characters that need URL encoding (letters, digits, `-`, `_`, `.`, `/`)".into(),
                    });
                };
                // Publishing copies a staged file only if the target does not
                // exist: a single-part multipart copy completed with If-None-Match.
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(&cfg.aws.region)
                    .with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
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
                    layout: Layout::new(root),
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

    /// Upload a data object (multipart when large; an upload that fails is
    /// aborted) and make it durable.
    pub async fn put_data(&self, path: &Path, body: bytes::Bytes) -> Result<()> {
        crate::archive::writer::put_object(&self.store, path, body)
            .await
            .map_err(|e| match e {
                Error::Store { source, .. } => Error::store(self.describe(path), source),
                other => other,
            })?;
        self.sync_local(path).await
    }

    /// On a local directory: flush `path` and every directory from its
    /// parent up to the archive root to disk, so that a power cut after this
    /// returns cannot lose the object or its name. Nothing to do on S3.
    pub async fn sync_local(&self, path: &Path) -> Result<()> {
        let ArchiveLocation::Local(root) = &self.location else {
            return Ok(());
        };
        let root = root.clone();
        let full = root.join(path.as_ref());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&full)?.sync_all()?;
            let mut dir = full.parent();
            while let Some(d) = dir {
                std::fs::File::open(d)?.sync_all()?;
                if d == root || !d.starts_with(&root) {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Usage(format!("internal error: fsync task failed: {e}")))?
        .map_err(|source| Error::Io {
            path: self.describe(path).into(),
            source,
        })
    }

    /// Publish a committed file: copy `staged` to `path` only if `path` does
    /// not exist (a hard link on a local directory), make it durable, then
    /// delete the staged copy. Idempotent: a file published before (by this
    /// or another archiver) is left exactly as it is.
    pub async fn publish(&self, staged: &Path, path: &Path, size: u64) -> Result<()> {
        let what = self.describe(path);
        match with_retry(&what, || self.store.copy_if_not_exists(staged, path)).await {
            Ok(()) => {}
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                tracing::debug!("{what} was published before");
            }
            Err(object_store::Error::NotFound { .. }) => {
                // The staged copy is gone: it must have been published.
                match with_retry(&what, || self.store.head(path)).await {
                    Ok(m) if m.size == size => {}
                    Ok(m) => {
                        return Err(Error::CorruptState {
                            object: what,
                            message: format!(
                                "published file has {} bytes, its commit says {size}",
                                m.size
                            ),
                        });
                    }
                    Err(e) => {
                        return Err(Error::CorruptState {
                            object: what,
                            message: format!(
                                "a committed file is neither staged ({}) nor published: {e}",
                                self.describe(staged)
                            ),
                        });
                    }
                }
            }
            Err(e) => return Err(Error::store(what, e)),
        }
        self.sync_local(path).await?;
        self.delete_with_leftovers(staged).await
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

/// Abort the incomplete multipart uploads under `prefix`: uploads of an
/// archiver that died or was fenced (a staged file, or a publishing copy),
/// which nobody will complete. Only a new lease holder calls this, for its
/// own stream, before it starts any upload — or, with `shard`, a shared
/// archiver taking a shard over, for that shard's files only. Returns how
/// many were aborted.
pub async fn abort_stale_uploads(
    cfg: &Config,
    archive: &Archive,
    prefix: &Path,
    shard: Option<&str>,
) -> Result<usize> {
    let ArchiveLocation::S3 { bucket, .. } = &archive.location else {
        return Ok(0);
    };
    let sdk = crate::aws::sdk_config(&cfg.aws).await;
    let client = s3_client(&sdk, cfg.aws.s3_endpoint.as_deref());
    let what = archive.describe(prefix);
    let fail = |e: String| Error::Location {
        location: what.clone(),
        message: format!("listing incomplete multipart uploads: {e}"),
    };
    let mut aborted = 0;
    let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
    loop {
        let page = client
            .list_multipart_uploads()
            .bucket(bucket)
            .prefix(format!("{prefix}/"))
            .set_key_marker(key_marker.clone())
            .set_upload_id_marker(id_marker.clone())
            .send()
            .await
            .map_err(|e| fail(crate::aws::error_text(&e)))?;
        for u in page.uploads() {
            let of_shard = |key: &str| {
                shard.is_none_or(|s| {
                    key.rsplit('/')
                        .next()
                        .is_some_and(|n| n.strip_prefix(s).is_some_and(|r| r.starts_with('_')))
                })
            };
            if let (Some(key), Some(id)) = (u.key(), u.upload_id())
                && of_shard(key)
            {
                match client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                {
                    Ok(_) => aborted += 1,
                    Err(e) => tracing::warn!(
                        "could not abort the incomplete upload of s3://{bucket}/{key} (grant s3:AbortMultipartUpload, or add a lifecycle rule): {}",
                        crate::aws::error_text(&e)
                    ),
                }
            }
        }
        if page.is_truncated() != Some(true) {
            return Ok(aborted);
        }
        key_marker = page.next_key_marker().map(str::to_string);
        id_marker = page.next_upload_id_marker().map(str::to_string);
    }
}

fn s3_client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> aws_sdk_s3::Client {
    let mut b = aws_sdk_s3::config::Builder::from(sdk)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(10));
    if let Some(ep) = endpoint {
        b = b.endpoint_url(ep).force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(b.build())
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
    let client = s3_client(sdk, endpoint);
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
                crate::aws::error_text(&e)
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

/// A conditional write (`mode` is a create or an update of a version) with
/// the retries of [`with_retry`], that tells our own earlier attempt from a
/// writer's: a retried request whose first attempt did land (its response was
/// lost to a reset connection) is refused as `Precondition`/`AlreadyExists`,
/// yet the object then holds exactly our bytes. Bodies written this way
/// carry something unique to the writer (an owner id, a counter, a time), so
/// equal bytes mean the write is ours — or, where two writers can send the
/// same bytes (two take-overs revoking one lapsed lease), that the object
/// already says what ours would. Returns the object's ETag.
pub async fn put_conditional(
    store: &dyn ObjectStore,
    what: &str,
    path: &Path,
    body: bytes::Bytes,
    mode: object_store::PutMode,
) -> std::result::Result<Option<String>, object_store::Error> {
    let opts = object_store::PutOptions {
        mode,
        ..Default::default()
    };
    let sent = with_retry(what, || {
        store.put_opts(
            path,
            object_store::PutPayload::from(body.clone()),
            opts.clone(),
        )
    })
    .await;
    match sent {
        Ok(r) => Ok(r.e_tag),
        Err(
            e @ (object_store::Error::Precondition { .. }
            | object_store::Error::AlreadyExists { .. }),
        ) => {
            let now = match with_retry(what, || store.get(path)).await {
                Ok(r) => r,
                Err(_) => return Err(e),
            };
            let etag = now.meta.e_tag.clone();
            match now.bytes().await {
                Ok(b) if b == body => {
                    tracing::debug!("{what}: a retried write found its first attempt landed");
                    Ok(etag)
                }
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The archive's store as query engines see it: reading a staged file that
/// has been published and removed meanwhile reads its published copy (the
/// same bytes), so a query planned while a file was staged never fails
/// because the archiver published it.
#[derive(Debug)]
pub struct StagedFallback(pub Arc<dyn ObjectStore>);

impl std::fmt::Display for StagedFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedFallback({})", self.0)
    }
}

fn published_instead(e: &object_store::Error, location: &Path) -> Option<Path> {
    matches!(e, object_store::Error::NotFound { .. })
        .then(|| crate::archive::layout::published_of(location))
        .flatten()
}

#[async_trait::async_trait]
impl ObjectStore for StagedFallback {
    async fn put_opts(
        &self,
        location: &Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.0.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        match self.0.get_opts(location, options.clone()).await {
            Err(e) => match published_instead(&e, location) {
                Some(p) => self.0.get_opts(&p, options).await,
                None => Err(e),
            },
            ok => ok,
        }
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<bytes::Bytes>> {
        match self.0.get_ranges(location, ranges).await {
            Err(e) => match published_instead(&e, location) {
                Some(p) => self.0.get_ranges(&p, ranges).await,
                None => Err(e),
            },
            ok => ok,
        }
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.0.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.0.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}
