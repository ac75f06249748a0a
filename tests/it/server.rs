//! `fluxcap serve`: every API endpoint over real HTTP, with the real binary,
//! against local Kinesis (ferrokinesis) and a local archive.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

mod fuzz;
mod limits;
mod remit;

/// A running `fluxcap serve`, killed on drop.
pub struct Serve {
    child: Child,
    pub port: u16,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `fluxcap serve` on a free loopback port with `token`.
pub fn serve(ws: &Workspace, token: &str) -> Serve {
    serve_with(ws, token, "http")
}

/// Start `fluxcap serve` on a free loopback port with `token`, expecting
/// `scheme` (`http`, or `https` when the configuration sets TLS).
pub fn serve_with(ws: &Workspace, token: &str, scheme: &str) -> Serve {
    let mut child = ws
        .cmd()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("FLUXCAP_SERVER_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix(&format!("listening on {scheme}://127.0.0.1:"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    // Keep draining stdout so the server never blocks on it.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    Serve { child, port }
}

impl Serve {
    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A token long enough for the server (32 characters or more).
pub fn token() -> String {
    format!("tok-{:032x}", rand::random::<u128>())
}

/// The value of one metric in `/metrics`.
pub fn metric(port: u16, token: &str, name: &str) -> u64 {
    let m = http(port, "GET", "/metrics", Some(token), b"");
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
        .parse()
        .unwrap()
}

/// Poll `/metrics` until `name` equals `want` (or fail after `secs`).
pub fn wait_metric(port: u16, token: &str, name: &str, want: u64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = metric(port, token, name);
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {v}, expected {want} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request (Connection: close), chunked bodies decoded.
pub fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before reading a large body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Answer {
        status,
        headers,
        body,
    }
}

pub fn post(port: u16, path: &str, token: &str, body: serde_json::Value) -> Answer {
    http(port, "POST", path, Some(token), body.to_string().as_bytes())
}

/// Poll a replay until it is in a final state.
pub fn wait_final(port: u16, token: &str, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let a = http(port, "GET", &format!("/api/replays/{id}"), Some(token), b"");
        assert_eq!(a.status, 200);
        let v = a.json();
        if ["done", "failed", "cancelled"].contains(&v["state"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "replay {id} did not finish: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn api_serves_every_endpoint_behind_a_token() {
    let k = ferrokinesis(false);
    let stream = unique("api");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    let (t1, t2) = (unique("dst"), unique("dst"));
    let n = 120usize;
    rt.block_on(async {
        create_stream(&c, &stream, 2).await;
        create_stream(&c, &t1, 2).await;
        create_stream(&c, &t2, 1).await;
        put_records(&c, &stream, &orders(n, 3)).await;
    });
    ws.ok(&["archive", "--once"]);
    let token = "s3cret-token-0123456789-abcdefghijklmnop";
    let srv = serve(&ws, token);
    let p = srv.port;

    // The UI needs no token; the API and metrics do.
    let ui = http(p, "GET", "/", None, b"");
    assert_eq!(ui.status, 200);
    assert!(ui.headers["content-type"].starts_with("text/html"));
    for (m, path) in [
        ("POST", "/api/sql"),
        ("GET", "/api/streams"),
        ("GET", "/api/replays"),
        ("POST", "/api/replays"),
        ("GET", "/metrics"),
        ("GET", "/api/openapi.json"),
    ] {
        assert_eq!(http(p, m, path, None, b"").status, 401, "{m} {path}");
        let wrong = http(
            p,
            m,
            path,
            Some("wrong-token-0123456789-abcdefghijklmnop"),
            b"",
        );
        assert_eq!(wrong.status, 401);
        let v = wrong.json();
        assert!(v["error"].as_str().unwrap().contains("token"));
        // Every answer names its request, errors in the body too.
        assert_eq!(
            v["request_id"].as_str(),
            wrong.headers.get("x-request-id").map(String::as_str)
        );
    }

    // SQL: rows as JSON with a limit, binary as base64, downloads streamed.
    let q = |sql: &str| serde_json::json!({ "sql": sql });
    let a = post(
        p,
        "/api/sql",
        token,
        q(&format!("SELECT count(*) AS n FROM {}", q_name(&stream))),
    );
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["rows"][0][0], n);
    assert_eq!(v["columns"][0]["name"], "n");
    let a = post(
        p,
        "/api/sql",
        token,
        serde_json::json!({"sql": format!("SELECT partition_key, data FROM {}", q_name(&stream)), "limit": 5}),
    );
    let v = a.json();
    assert_eq!(v["row_count"], 5);
    assert_eq!(v["truncated"], true);
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["rows"][0][1].as_str().unwrap())
        .unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok());
    let a = post(
        p,
        "/api/sql",
        token,
        serde_json::json!({"sql": format!("SELECT partition_key, text(data) AS t FROM {}", q_name(&stream)), "format": "csv"}),
    );
    assert_eq!(a.status, 200);
    assert!(a.headers["content-type"].starts_with("text/csv"));
    assert!(a.headers["content-disposition"].contains("attachment"));
    let text = String::from_utf8(a.body).unwrap();
    let mut rdr = text.lines();
    assert_eq!(rdr.next(), Some("partition_key,t"));
    assert_eq!(csv_records(&text), n);
    let a = post(
        p,
        "/api/sql",
        token,
        serde_json::json!({"sql": format!("SELECT * FROM {}", q_name(&stream)), "format": "arrow"}),
    );
    assert_eq!(a.status, 200);
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(a.body), None).unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, n);
    // Bad input.
    for (body, code) in [
        (q("SELEC 1").to_string(), 400),
        (q("CREATE TABLE x (a INT)").to_string(), 400),
        (q("SELECT * FROM nope").to_string(), 400),
        (q("  ").to_string(), 400),
        ("{not json".to_string(), 400),
        (
            serde_json::json!({"sql": "SELECT 1", "bogus": 1}).to_string(),
            400,
        ),
        (
            serde_json::json!({"sql": "SELECT 1", "format": "xml"}).to_string(),
            400,
        ),
    ] {
        let a = http(p, "POST", "/api/sql", Some(token), body.as_bytes());
        assert_eq!(
            a.status,
            code,
            "{body}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert!(a.json()["error"].is_string());
    }
    let big = format!("{{\"sql\": \"SELECT '{}'\"}}", "x".repeat(2 << 20));
    assert_eq!(
        http(p, "POST", "/api/sql", Some(token), big.as_bytes()).status,
        413
    );

    // Streams: shards and the archive per day.
    let a = http(p, "GET", "/api/streams", Some(token), b"");
    assert_eq!(a.status, 200);
    let v = a.json();
    let s = &v["streams"][0];
    assert_eq!(s["stream"], stream.as_str());
    assert_eq!(s["shards"].as_array().unwrap().len(), 2);
    let days = s["archive_by_day"].as_array().unwrap();
    assert_eq!(days.len(), 1);
    assert!(days[0]["bytes"].as_u64().unwrap() > 0);

    // Replays: refusals, a dry run, a real run to completion.
    let rq = |to: &str, extra: serde_json::Value| {
        let mut v = serde_json::json!({"stream": stream, "to": to});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let same = post(
        p,
        "/api/replays",
        token,
        rq(&format!("kinesis://{stream}"), serde_json::json!({})),
    );
    assert_eq!(same.status, 409);
    assert!(
        same.json()["error"]
            .as_str()
            .unwrap()
            .contains("confirm_same_stream")
    );
    for bad in [
        rq("file:///etc/passwd", serde_json::json!({})),
        rq("-", serde_json::json!({})),
        rq(
            &format!("kinesis://{t1}"),
            serde_json::json!({"bogus": true}),
        ),
        rq(
            &format!("kinesis://{t1}"),
            serde_json::json!({"where": "no_such_column = 1"}),
        ),
        rq(
            &format!("kinesis://{t1}"),
            serde_json::json!({"since": "yesterday"}),
        ),
        serde_json::json!({"stream": "not-configured", "to": format!("kinesis://{t1}")}),
    ] {
        let a = post(p, "/api/replays", token, bad.clone());
        assert_eq!(a.status, 400, "{bad}: {}", String::from_utf8_lossy(&a.body));
    }
    let a = post(
        p,
        "/api/replays",
        token,
        rq(
            &format!("kinesis://{t1}"),
            serde_json::json!({"dry_run": true, "annotate": {"by": "api"}}),
        ),
    );
    assert_eq!(a.status, 200);
    let dry = a.json();
    assert_eq!(dry["summary"]["records"], n);
    assert_eq!(dry["summary"]["shards"].as_array().unwrap().len(), 2);
    assert!(rt.block_on(count_records(&c, &t1)) == 0);
    let a = post(
        p,
        "/api/replays",
        token,
        rq(
            &format!("kinesis://{t1}"),
            serde_json::json!({"annotate": ["by=api"]}),
        ),
    );
    assert_eq!(a.status, 202);
    let id = a.json()["id"].as_str().unwrap().to_string();
    let done = wait_final(p, token, &id);
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["sent"], n);
    assert_eq!(rt.block_on(count_records(&c, &t1)), n);
    let listed = http(p, "GET", "/api/replays", Some(token), b"").json();
    assert!(
        listed["replays"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == id.as_str() && r["state"] == "done")
    );
    assert_eq!(
        http(p, "GET", "/api/replays/r-nope", Some(token), b"").status,
        404
    );
    assert_eq!(
        http(p, "GET", "/api/replays/..%2F..%2Fetc", Some(token), b"").status,
        400
    );
    assert_eq!(
        http(p, "DELETE", &format!("/api/replays/{id}"), Some(token), b"").status,
        409
    );
    assert_eq!(
        http(
            p,
            "POST",
            &format!("/api/replays/{id}/resume"),
            Some(token),
            b""
        )
        .status,
        409
    );

    // Cancel a slow replay, then resume it to completion.
    let a = post(
        p,
        "/api/replays",
        token,
        rq(&format!("kinesis://{t2}"), serde_json::json!({"rate": 40})),
    );
    assert_eq!(a.status, 202);
    let id2 = a.json()["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = http(p, "GET", &format!("/api/replays/{id2}"), Some(token), b"").json();
        assert_eq!(v["state"], "running", "{v}");
        if v["sent"].as_u64().unwrap() > 0 {
            assert_eq!(v["total"], n);
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = http(
        p,
        "DELETE",
        &format!("/api/replays/{id2}"),
        Some(token),
        b"",
    );
    assert_eq!(a.status, 202);
    let v = http(p, "GET", &format!("/api/replays/{id2}"), Some(token), b"").json();
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(v["sent"].as_u64().unwrap() < n as u64);
    let a = http(
        p,
        "POST",
        &format!("/api/replays/{id2}/resume"),
        Some(token),
        b"",
    );
    assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
    let done = wait_final(p, token, &id2);
    assert_eq!(done["state"], "done", "{done}");
    assert!(rt.block_on(count_records(&c, &t2)) >= n);

    // Metrics and the API description.
    let m = http(p, "GET", "/metrics", Some(token), b"");
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).unwrap();
    assert!(text.contains("fluxcap_http_requests_total"));
    // Both replays sent every record (the resumed one may resend a few).
    let sent: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("fluxcap_replay_records_sent_total "))
        .expect("replay metric")
        .parse()
        .unwrap();
    assert!(sent >= 2 * n, "{text}");
    let o = http(p, "GET", "/api/openapi.json", Some(token), b"").json();
    for path in [
        "/api/sql",
        "/api/streams",
        "/api/replays",
        "/api/replays/{id}",
        "/metrics",
    ] {
        assert!(o["paths"].get(path).is_some(), "{path}");
    }
    assert_eq!(http(p, "GET", "/api/nope", Some(token), b"").status, 404);
}

#[test]
fn serve_refuses_a_public_address_without_a_configured_token() {
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("s", "json")]);
    let o = ws.run(&["serve", "--bind", "0.0.0.0:0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("without a configured token"));
}

#[test]
fn serve_refuses_short_tokens_and_tokens_it_cannot_show() {
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("s", "json")]);
    let o = ws
        .cmd()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("FLUXCAP_SERVER_TOKEN", "only-twenty-chars-xx")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("server.token") && err.contains("32"), "{err}");
    // No token configured and stdout is not a terminal: nowhere to show one.
    let o = ws.run(&["serve", "--bind", "127.0.0.1:0"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("server.token_file"), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("token="));
}

#[test]
fn a_generated_token_goes_to_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        &format!("[server]\ntoken_file = \"{}\"", file.display()),
        &[("s", "json")],
    );
    let mut child = ws
        .cmd()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = String::new();
    for _ in 0..2 {
        out.read_line(&mut lines).unwrap();
    }
    let srv = Serve {
        port: lines
            .lines()
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap(),
        child,
    };
    assert!(!lines.contains("token="), "{lines}");
    assert!(lines.contains(&file.display().to_string()), "{lines}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let t = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(t.len(), 64);
    assert_eq!(http(srv.port, "GET", "/metrics", Some(&t), b"").status, 200);
    assert_eq!(http(srv.port, "GET", "/metrics", None, b"").status, 401);
}

#[test]
fn public_addresses_need_tls_and_the_archiver_metrics_stay_local() {
    let ws = Workspace::new("http://127.0.0.1:9", None, None, "", &[("s", "json")]);
    let o = ws
        .cmd()
        .args(["serve", "--bind", "0.0.0.0:0"])
        .env("FLUXCAP_SERVER_TOKEN", token())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("plain HTTP") && err.contains("tls_cert"),
        "{err}"
    );
    let o = ws.run(&[
        "config",
        "show",
        "--set",
        "archiver.metrics_bind=0.0.0.0:9464",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("metrics_public"), "{err}");
    ws.ok(&[
        "config",
        "show",
        "--set",
        "archiver.metrics_bind=0.0.0.0:9464",
        "--set",
        "archiver.metrics_public=true",
    ]);
}

fn q_name(s: &str) -> String {
    q(s)
}

/// Records of a CSV text (quoted fields may hold newlines), header excluded.
fn csv_records(text: &str) -> usize {
    let mut in_quotes = false;
    let mut ends = 0usize;
    for ch in text.chars() {
        match ch {
            '"' => in_quotes = !in_quotes,
            '\n' if !in_quotes => ends += 1,
            _ => {}
        }
    }
    ends.saturating_sub(1)
}

/// How many records a stream holds.
async fn count_records(c: &aws_sdk_kinesis::Client, stream: &str) -> usize {
    read_stream(c, stream).await.len()
}
