//! The connection layer of `fluxcap serve`: accepts at most
//! `server.max_connections` connections, speaks HTTP/1.1 (over rustls when
//! `server.tls_cert`/`tls_key` are set), and drops clients that are too
//! slow: headers (and the TLS handshake) must arrive within
//! `server.header_read_timeout`, which also closes idle keep-alive
//! connections, and a client that reads nothing of an answer, or sends
//! nothing of a request body, for `server.idle_timeout` is disconnected.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use crate::config::ServerConfig;
use crate::error::{Error, Result};

/// The connection limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    /// `server.header_read_timeout`.
    pub header_read_timeout: Duration,
    /// `server.idle_timeout`.
    pub idle_timeout: Duration,
    /// `server.max_connections`.
    pub max_connections: usize,
}

impl ConnLimits {
    pub fn of(cfg: &ServerConfig) -> Self {
        ConnLimits {
            header_read_timeout: cfg.header_read_timeout.0,
            idle_timeout: cfg.idle_timeout.0,
            max_connections: cfg.max_connections,
        }
    }
}

/// The TLS acceptor of `server.tls_cert` and `server.tls_key` (rustls, ring).
pub(crate) fn tls_acceptor(cert: &str, key: &str) -> Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |k: &str, file: &str, message: String| Error::Config {
        file: file.to_string(),
        key: k.to_string(),
        message,
    };
    let read = |k: &str, file: &str| {
        std::fs::read(file).map_err(|e| bad(k, file, format!("cannot read it: {e}")))
    };
    let cert_pem = read("server.tls_cert", cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            bad(
                "server.tls_cert",
                cert,
                format!("not a PEM certificate chain: {e}"),
            )
        })?;
    if certs.is_empty() {
        return Err(bad(
            "server.tls_cert",
            cert,
            "no certificate in the file".into(),
        ));
    }
    let key_pem = read("server.tls_key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| bad("server.tls_key", key, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("server.tls_cert", cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| {
            bad(
                "server.tls_key",
                key,
                format!("does not fit the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accept and serve connections until `cancel`, then let open connections
/// finish their current request (for up to ten seconds).
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (app, tls, cancel) = (app.clone(), tls.clone(), cancel.clone());
        tokio::spawn(async move {
            connection(tcp, peer, app, tls, limits, cancel).await;
            drop(permit);
        });
    }
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all)).await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    cancel: CancellationToken,
) {
    let io = StallLimit::new(tcp, limits.idle_timeout);
    match tls {
        None => serve_conn(TokioIo::new(io), app, limits, cancel).await,
        Some(acceptor) => {
            match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)).await {
                Ok(Ok(stream)) => serve_conn(TokioIo::new(stream), app, limits, cancel).await,
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_conn<I>(io: I, app: Router, limits: ConnLimits, cancel: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Read the whole request body (bounded by `limit`) within `idle`, so that
/// a client that stops sending its body cannot hold a connection and a
/// handler. Over the limit: 413; too slow: 408.
pub(crate) async fn buffer_body(
    limit: usize,
    idle: Duration,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(idle, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, bytes.into())).await,
        Ok(Err(_)) => ApiError(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes (server.max_request_bytes)"),
        )
        .into_response(),
        Err(_) => ApiError(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time (server.idle_timeout)".into(),
        )
        .into_response(),
    }
}

/// A socket whose writes fail once one has waited `limit` for the client to
/// read: a client that stops reading an answer cannot hold the connection
/// (and the query behind a download) for ever.
struct StallLimit {
    inner: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StallLimit {
    fn new(inner: TcpStream, limit: Duration) -> Self {
        StallLimit {
            inner,
            limit,
            stalled: None,
        }
    }

    fn pending_write<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for server.idle_timeout",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for StallLimit {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallLimit {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending_write(cx),
            r => {
                self.stalled = None;
                r
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending_write(cx),
            r => {
                self.stalled = None;
                r
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
