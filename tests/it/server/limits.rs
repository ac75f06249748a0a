//! Server hardening: every limit of `fluxcap serve` against the running
//! binary — deep and long statements, the query timeout, bounded series,
//! recursive CTEs, the JSON byte cap, concurrency, downloads cancelled by
//! their client, slow clients, and TLS.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Serve, http, metric, post, serve, serve_with, token, wait_metric};
use crate::harness::*;

/// A query that would run for days: 10^14 rows.
const ENDLESS: &str =
    "SELECT a.value AS a, b.value AS b FROM range(10000000) a CROSS JOIN range(10000000) b";

fn sql(sql: &str) -> serde_json::Value {
    serde_json::json!({ "sql": sql })
}

fn deep_sum(n: usize) -> String {
    format!("SELECT {}", vec!["1"; n].join("+"))
}

#[test]
fn deep_or_long_statements_are_refused_and_the_server_survives() {
    let k = ferrokinesis(false);
    let stream = unique("deep");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    rt().block_on(async {
        create_stream(&c, &stream, 1).await;
        create_stream(&c, &format!("{stream}-dst"), 1).await;
        put_records(&c, &stream, &orders(5, 1)).await;
    });
    let t = token();
    let mut srv = serve(&ws, &t);
    let p = srv.port;

    // The issue's report: 20,000 terms, 40 KB, used to abort the process.
    let body = sql(&deep_sum(20_000));
    assert!(body.to_string().len() < 64 << 10);
    let a = post(p, "/api/sql", &t, body);
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    let e = a.json()["error"].as_str().unwrap().to_string();
    assert!(e.contains("query.max_expression_depth"), "{e}");
    assert!(srv.alive());
    // Other deep shapes: set operations, joins, a deep `where` in a replay.
    let unions = vec!["SELECT 1"; 5000].join(" UNION ALL ");
    let a = post(p, "/api/sql", &t, sql(&unions));
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    let joins = format!(
        "SELECT 1 FROM range(1) t0 {}",
        (1..3000)
            .map(|i| format!("JOIN range(1) t{i} ON true"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let a = post(p, "/api/sql", &t, sql(&joins));
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    let deep_where = format!("{} = 1", vec!["1"; 20_000].join("+"));
    let a = post(
        p,
        "/api/replays",
        &t,
        serde_json::json!({"stream": stream, "to": format!("kinesis://{stream}-dst"), "where": deep_where, "dry_run": true}),
    );
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_expression_depth")
    );
    for (field, value) in [
        ("key", vec!["1"; 20_000].join("||")),
        ("tombstone", deep_where.clone()),
    ] {
        let a = post(
            p,
            "/api/replays",
            &t,
            serde_json::json!({"stream": stream, "to": format!("kinesis://{stream}-dst"), "compact": true, field: value, "dry_run": true}),
        );
        assert_eq!(
            a.status,
            400,
            "{field}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    // Too long (under the body limit): refused before parsing.
    let long = format!("SELECT '{}'", "x".repeat(300 << 10));
    let a = post(p, "/api/sql", &t, sql(&long));
    assert_eq!(a.status, 400);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("query.max_statement_bytes")
    );
    // Still alive, and it answers.
    assert!(srv.alive());
    let a = post(p, "/api/sql", &t, sql("SELECT 1+1 AS two"));
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["rows"][0][0], 2);
    // A moderately deep expression is fine.
    let a = post(p, "/api/sql", &t, sql(&deep_sum(200)));
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["rows"][0][0], 200);

    // `fluxcap sql` and `fluxcap replay`: a clean error, exit 2.
    for args in [
        vec!["sql".to_string(), deep_sum(20_000)],
        vec![
            "replay".into(),
            "--stream".into(),
            stream.clone(),
            "--to".into(),
            "-".into(),
            "--where".into(),
            deep_where.clone(),
        ],
    ] {
        let o = ws.cmd().args(&args).output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("max_expression_depth"), "{err}");
        assert!(err.trim().lines().count() <= 2, "{err}");
    }
}

#[test]
fn endless_queries_end_within_the_timeout_and_series_and_recursion_are_bounded() {
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "[server]\nquery_timeout = \"2s\"\nmax_series_rows = 10000000",
        &[("s", "json")],
    );
    let t = token();
    let srv = serve(&ws, &t);
    let p = srv.port;
    for format in ["json", "csv"] {
        let started = Instant::now();
        let q = format!("SELECT count(*) FROM ({ENDLESS}) x");
        let a = post(
            p,
            "/api/sql",
            &t,
            serde_json::json!({"sql": q, "format": format}),
        );
        let took = started.elapsed();
        assert_eq!(
            a.status,
            408,
            "{format}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert!(
            a.json()["error"]
                .as_str()
                .unwrap()
                .contains("server.query_timeout")
        );
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(15),
            "{took:?}"
        );
    }
    // Its work stopped: nothing runs, and the server answers at once.
    wait_metric(p, &t, "fluxcap_sql_queries_running", 0, 10);
    assert_eq!(metric(p, &t, "fluxcap_sql_queries_timed_out_total"), 2);
    let started = Instant::now();
    assert_eq!(post(p, "/api/sql", &t, sql("SELECT 1")).status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));

    // range / generate_series are bounded.
    for q in [
        "SELECT count(*) FROM range(1000000000000)",
        "SELECT count(*) FROM generate_series(1, 20000000)",
        "SELECT count(*) FROM range(TIMESTAMP '2000-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 second')",
    ] {
        let a = post(p, "/api/sql", &t, sql(q));
        assert_eq!(a.status, 400, "{q}: {}", String::from_utf8_lossy(&a.body));
        assert!(
            a.json()["error"]
                .as_str()
                .unwrap()
                .contains("server.max_series_rows"),
            "{q}"
        );
    }
    let a = post(
        p,
        "/api/sql",
        &t,
        sql("SELECT count(*) AS n FROM range(1000)"),
    );
    assert_eq!(a.json()["rows"][0][0], 1000);
    // Recursive CTEs are off.
    let a = post(
        p,
        "/api/sql",
        &t,
        sql(
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        ),
    );
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("recursive")
    );
}

#[test]
fn json_answers_are_capped_in_bytes() {
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "[server]\nmax_response_bytes = \"64KiB\"",
        &[("s", "json")],
    );
    let t = token();
    let srv = serve(&ws, &t);
    let a = post(
        srv.port,
        "/api/sql",
        &t,
        sql("SELECT repeat('x', 1000) AS s FROM range(100000)"),
    );
    assert_eq!(a.status, 200);
    assert!(a.body.len() <= 64 << 10, "{} bytes", a.body.len());
    let v = a.json();
    assert_eq!(v["truncated"], true);
    let n = v["row_count"].as_u64().unwrap();
    assert!(n > 10 && n < 100, "{n} rows");
    assert_eq!(v["rows"].as_array().unwrap().len() as u64, n);
    // Small answers are whole.
    let v = post(srv.port, "/api/sql", &t, sql("SELECT value FROM range(10)")).json();
    assert_eq!(v["truncated"], false);
    assert_eq!(v["row_count"], 10);
}

/// Start a download of `ENDLESS` and read its first bytes; the socket stays open.
fn start_download(port: u16, token: &str) -> TcpStream {
    let body = serde_json::json!({"sql": ENDLESS, "format": "csv"}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /api/sql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while got.len() < 64 << 10 {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the download ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(text.contains("\na,b\n"), "{}", &text[..400.min(text.len())]);
    s
}

#[test]
fn a_cancelled_download_stops_its_query_and_busy_servers_refuse() {
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "[server]\nmax_concurrent_queries = 1\nquery_queue_timeout = \"300ms\"",
        &[("s", "json")],
    );
    let t = token();
    let srv = serve(&ws, &t);
    let p = srv.port;
    let download = start_download(p, &t);
    assert_eq!(metric(p, &t, "fluxcap_sql_queries_running"), 1);
    // The one slot is taken: the next query waits briefly, then 503.
    let a = post(p, "/api/sql", &t, sql("SELECT 1"));
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.headers.get("retry-after").map(String::as_str), Some("1"));
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_concurrent_queries")
    );
    assert_eq!(metric(p, &t, "fluxcap_sql_queries_refused_total"), 1);
    // The client goes away: the query stops and frees its slot.
    drop(download);
    wait_metric(p, &t, "fluxcap_sql_queries_running", 0, 20);
    assert_eq!(metric(p, &t, "fluxcap_sql_queries_cancelled_total"), 1);
    let a = post(p, "/api/sql", &t, sql("SELECT 1 AS one"));
    assert_eq!(a.status, 200);
    // Downloads can neutralise spreadsheet formulas.
    let q = "SELECT '=HYPERLINK(1)' AS f, '@x' AS g, 'plain' AS h, -1 AS n";
    let a = post(
        p,
        "/api/sql",
        &t,
        serde_json::json!({"sql": q, "format": "csv", "neutralize_formulas": true}),
    );
    assert_eq!(
        String::from_utf8(a.body).unwrap(),
        "f,g,h,n\n'=HYPERLINK(1),'@x,plain,-1\n"
    );
    let a = post(
        p,
        "/api/sql",
        &t,
        serde_json::json!({"sql": q, "format": "csv"}),
    );
    assert_eq!(
        String::from_utf8(a.body).unwrap(),
        "f,g,h,n\n=HYPERLINK(1),@x,plain,-1\n"
    );
}

/// Whether the server closes `s` within `within` (reads until EOF or error).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed() < within,
            Ok(_) => continue, // an error answer before closing is fine
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return started.elapsed() < within,
        }
    }
}

#[test]
fn slow_clients_are_disconnected() {
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nmax_connections = 4",
        &[("s", "json")],
    );
    let t = token();
    let srv = serve(&ws, &t);
    let p = srv.port;
    // Headers never finished.
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(8)));
    // Headers trickled a byte at a time: the limit is for all of them.
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    let started = Instant::now();
    let mut closed = false;
    for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed || closed_within(&mut s, Duration::from_secs(8)));
    assert!(started.elapsed() < Duration::from_secs(10));
    // A body that never comes: 408, then closed.
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    write!(s, "POST /api/sql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 100\r\n\r\n{{").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // More idle connections than allowed: the server still answers once the
    // idle ones are dropped, and all along it stays up.
    let idle: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(("127.0.0.1", p)).unwrap())
        .collect();
    let started = Instant::now();
    assert_eq!(http(p, "GET", "/metrics", Some(&t), b"").status, 200);
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(idle);
    assert_eq!(http(p, "GET", "/metrics", Some(&t), b"").status, 200);
}

#[test]
fn tls_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let script = format!(
        r#"
import datetime, ipaddress
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
k = ec.generate_private_key(ec.SECP256R1())
n = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
c = (x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(k.public_key())
     .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
     .not_valid_after(now + datetime.timedelta(days=1))
     .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
     .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
     .sign(k, hashes.SHA256()))
open("{cert}", "wb").write(c.public_bytes(serialization.Encoding.PEM))
open("{key}", "wb").write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
"#,
        cert = cert.display(),
        key = key.display()
    );
    let o = Command::new(python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ),
        &[("s", "json")],
    );
    let t = token();
    let srv: Serve = serve_with(&ws, &t, "https");
    let p = srv.port;
    // A client that checks the certificate (Python's ssl, OpenSSL).
    let client = format!(
        r#"
import json, ssl, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile="{cert}")
def call(token):
    req = urllib.request.Request("https://127.0.0.1:{p}/api/sql", data=json.dumps({{"sql": "SELECT 40 + 2 AS answer"}}).encode(),
                                 headers={{"Content-Type": "application/json", **({{"Authorization": "Bearer " + token}} if token else {{}})}})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
print(json.dumps([call("{t}"), call(None)]))
"#,
        cert = cert.display()
    );
    let o = Command::new(python())
        .args(["-c", &client])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0][0], 200, "{v}");
    assert_eq!(v[0][1]["rows"][0][0], 42, "{v}");
    assert_eq!(v[1][0], 401, "{v}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("fluxcap_http_requests_total"));
}
