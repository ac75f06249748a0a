//! `ferrokinesis-local`: serve the [ferrokinesis] Kinesis emulator on 127.0.0.1 only.
//!
//! Why this exists: kinesis-mock does not throttle writes, while ferrokinesis can
//! (`enforce_limits`: 1 MiB/s and 1000 records/s per shard, answered with
//! `ProvisionedThroughputExceededException` like real Kinesis). Its stock binary
//! always binds 0.0.0.0, though, and the test servers must stay on loopback, so this
//! launcher builds the same router from the library and binds 127.0.0.1 itself.
//!
//! Usage: `ferrokinesis-local [--port N] [--enforce-limits] [--shard-limit N]`
//! (`--port 0`, the default, picks a free port). Once bound it prints exactly one
//! line, `listening on 127.0.0.1:<port>`, to stdout; SIGTERM/SIGINT stop it cleanly.
//! Streams are created, deleted and updated instantly.
//!
//! For tests of retention loss it adds one route that AWS does not have:
//! `POST /_fluxcap/expire` with a stream name as the body removes every record
//! of that stream stored so far, as if they had all left the retention period
//! (the answer is the number of records removed).

use std::io::Write as _;

use axum::extract::DefaultBodyLimit;
use ferrokinesis::store::StoreOptions;
use tokio::signal::unix::{SignalKind, signal};

fn usage(msg: &str) -> ! {
    eprintln!("ferrokinesis-local: {msg}");
    eprintln!("usage: ferrokinesis-local [--port N] [--enforce-limits] [--shard-limit N]");
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
    v.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage(&format!("{flag} needs a number")))
}

#[tokio::main]
async fn main() {
    let (mut port, mut enforce_limits, mut shard_limit) = (0u16, false, 1000u32);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = num("--port", args.next()),
            "--enforce-limits" => enforce_limits = true,
            "--shard-limit" => shard_limit = num("--shard-limit", args.next()),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let options = StoreOptions {
        create_stream_ms: 0,
        delete_stream_ms: 0,
        update_stream_ms: 0,
        shard_limit,
        enforce_limits,
        ..StoreOptions::default()
    };
    let (app, store) = ferrokinesis::create_app(options);
    let expire = axum::routing::post(move |stream: String| {
        let store = store.clone();
        async move {
            // Retention 0 hours: everything that arrived before now has expired.
            let removed = store.delete_expired_records(stream.trim(), 0).await;
            removed.to_string()
        }
    });
    let app = app.route("/_fluxcap/expire", expire);
    // Same request-body cap as the stock binary (7 MiB): a full 5 MiB PutRecords
    // is ~6.7 MB once base64-encoded, above axum's 2 MB default.
    let app = app.layer(DefaultBodyLimit::max(7 * 1024 * 1024));

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("ferrokinesis-local: cannot bind 127.0.0.1:{port}: {e}");
            std::process::exit(1)
        });
    let addr = listener.local_addr().expect("local_addr");
    println!("listening on {addr}");
    std::io::stdout().flush().ok();

    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .expect("server error");
}
