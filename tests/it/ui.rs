//! The web UI of `fluxcap serve`, in headless Chromium: tests/browser/ui.mjs
//! (playwright-core driving Debian's chromium, both installed by scripts/setup)
//! runs a query, downloads its CSV, opens the streams dashboard, dry-runs and
//! then starts a replay, and follows its progress to `done`. This test sets up
//! the stack (ferrokinesis, a source stream partly archived, an empty target),
//! starts the real binary's server, runs the browser script, and then checks
//! independently — by reading the target stream — that the replay the browser
//! started really sent every record. Screenshots go to tests/artifacts/ui/.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fluxcap::consistency::{self, Decoded};

use crate::harness::*;

/// `fluxcap serve`, killed on drop.
struct Serve {
    child: Child,
    port: u16,
    /// The `open http://…/#token=…` line, when the server printed one.
    open_url: Option<String>,
    stderr: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start(ws: &Workspace, token: &str) -> Serve {
        let stderr = ws.dir.path().join("serve.err");
        let mut child = ws
            .cmd()
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("FLUXCAP_SERVER_TOKEN", token)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("cannot start fluxcap serve");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        // Read stdout to its end (so the server never blocks on a full pipe).
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut port = None;
        let mut open_url = None;
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while port.is_none() || open_url.is_none() {
            let wait = if port.is_some() {
                Duration::from_secs(3) // the `open` line follows at once, if at all
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix("listening on http://") {
                        let addr = rest.trim_end_matches('/');
                        let p = addr.rsplit(':').next().unwrap().parse::<u16>();
                        port =
                            Some(p.unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}")));
                    } else if let Some(i) = line.find("open http://") {
                        open_url = Some(line[i + "open ".len()..].trim().to_string());
                    }
                    seen.push(line);
                }
                Err(_) if port.is_some() => break,
                Err(_) => {
                    let st = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    panic!(
                        "fluxcap serve printed no `listening on http://…` line within 60 s \
                         (exit: {st:?})\nstdout: {seen:#?}\nstderr: {}",
                        std::fs::read_to_string(&stderr).unwrap_or_default()
                    );
                }
            }
        }
        Serve {
            child,
            port: port.unwrap(),
            open_url,
            stderr,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// GET `path` with the server tests' HTTP client: (status, body).
fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let a = crate::server::http(port, "GET", path, token, b"");
    (a.status, String::from_utf8_lossy(&a.body).to_string())
}

/// Every record's payload in `stream`, read from the trim horizon of each shard.
async fn read_payloads(c: &aws_sdk_kinesis::Client, stream: &str) -> Vec<Vec<u8>> {
    read_stream(c, stream)
        .await
        .into_iter()
        .map(|g| g.data)
        .collect()
}

fn artifacts_dir() -> PathBuf {
    let dir = root().join("tests/artifacts/ui");
    if dir.exists() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chromium() -> String {
    let c = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&c).exists(),
        "{c} not found: run scripts/setup (installs Debian's chromium) or set CHROMIUM"
    );
    c
}

/// Run `node tests/browser/ui.mjs` with a deadline; (success, output).
fn run_browser_test(env: &[(&str, String)], log: &Path) -> (bool, String) {
    let node_modules = root().join(".local/node/node_modules");
    assert!(
        node_modules.join("playwright-core/package.json").exists(),
        "playwright-core missing in {}: run scripts/setup",
        node_modules.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(root().join("tests/browser/ui.mjs"))
        .current_dir(root())
        .env("NODE_PATH", &node_modules)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("cannot run node (install Node.js >= 20)");
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = format!(
        "{}{}",
        std::fs::read_to_string(log).unwrap_or_default(),
        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
    );
    match status {
        Some(st) => (st.success(), format!("exit {st}\n{output}")),
        None => (false, format!("killed after 240 s\n{output}")),
    }
}

#[test]
fn web_ui_runs_a_query_and_a_replay_in_headless_chromium() {
    let chromium = chromium();
    let k = ferrokinesis(false);
    let (src, dst) = (unique("ui-src"), unique("ui-dst"));
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&src, "json")]);
    let c = kinesis_client(&k.endpoint());
    let rt = rt();

    // 300 records: 240 archived, 60 only in the stream (the UI's SQL and the
    // replay read the unified view, so both parts count).
    let all = orders(300, 7);
    rt.block_on(async {
        create_stream(&c, &src, 2).await;
        create_stream(&c, &dst, 2).await;
        put_records(&c, &src, &all[..240]).await;
    });
    ws.ok(&["archive", "--once"]);
    rt.block_on(put_records(&c, &src, &all[240..]));
    let expected = all.len();
    assert_eq!(
        ws.sql_count(&format!("SELECT count(*) FROM {}", q(&src))),
        expected as i64
    );

    let token = format!("{:032x}", rand::random::<u128>());
    let server = Serve::start(&ws, &token);
    let base = server.base();

    // The contract the page relies on: assets without a token, the API only with it.
    let (st, html) = http_get(server.port, "/", None);
    assert_eq!(st, 200, "GET / without a token: {html}");
    assert!(html.contains("app.js"), "GET / is not the UI page: {html}");
    for asset in ["/app.js", "/style.css"] {
        let (st, body) = http_get(server.port, asset, None);
        assert_eq!(st, 200, "GET {asset} without a token");
        assert!(!body.is_empty(), "GET {asset} is empty");
    }
    let (st, body) = http_get(server.port, "/api/streams", None);
    assert_eq!(st, 401, "GET /api/streams without a token: {body}");
    let (st, body) = http_get(server.port, "/api/streams", Some("wrong-token-wrong-token"));
    assert_eq!(st, 401, "GET /api/streams with a wrong token: {body}");
    let err: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("401 body is not JSON ({e}): {body}"));
    assert!(
        err["error"].is_string(),
        "401 body has no \"error\": {body}"
    );

    // With a configured token the server does not echo it (it prints the token
    // only when it generated one), so the test builds the URL the way a user would.
    if let Some(u) = &server.open_url {
        assert!(u.starts_with(&base), "open URL {u} is not on {base}");
        if let Some((_, t)) = u.split_once("#token=") {
            assert_eq!(t, token, "the printed open URL carries another token");
        }
    }
    let url = format!("{base}/#token={token}");

    let artifacts = artifacts_dir();
    let (ok, output) = run_browser_test(
        &[
            ("FLUXCAP_URL", url),
            ("STREAM", src.clone()),
            ("TARGET_STREAM", dst.clone()),
            ("EXPECTED_COUNT", expected.to_string()),
            ("ARTIFACTS", artifacts.display().to_string()),
            ("CHROMIUM", chromium),
        ],
        &artifacts.join("ui.log"),
    );
    eprintln!("--- tests/browser/ui.mjs ---\n{output}");
    assert!(
        ok,
        "the browser test failed (screenshots in {}):\n{output}\n--- fluxcap serve stderr ---\n{}",
        artifacts.display(),
        server.stderr()
    );
    let shots = std::fs::read_dir(&artifacts)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .count();
    assert!(
        shots >= 5,
        "expected screenshots in {}",
        artifacts.display()
    );

    // The API agrees: one replay, done, every record sent.
    let (st, body) = http_get(server.port, "/api/replays", Some(&token));
    assert_eq!(st, 200, "GET /api/replays: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let replays = v["replays"].as_array().expect("replays array");
    let real: Vec<_> = replays
        .iter()
        .filter(|r| r["target"] == format!("kinesis://{dst}"))
        .collect();
    assert_eq!(real.len(), 1, "one replay into {dst} expected: {body}");
    let r = real[0];
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["sent"], expected, "{r}");
    assert_eq!(r["source"], src.as_str(), "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let (st, one) = http_get(server.port, &format!("/api/replays/{id}"), Some(&token));
    assert_eq!(st, 200, "GET /api/replays/{id}: {one}");

    // And the target stream really holds every record once, annotated with that replay.
    let got = rt.block_on(read_payloads(&c, &dst));
    assert_eq!(got.len(), expected, "records in the target stream");
    let mut want: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for (_, d) in &all {
        *want.entry(d.clone()).or_default() += 1;
    }
    let mut have: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for data in &got {
        match consistency::decode(data, consistency::DEFAULT_FIELD) {
            Decoded::Replayed {
                annotation,
                payload,
            } => {
                assert_eq!(annotation.replay_id, id);
                assert_eq!(annotation.stream, src);
                let orig: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                *have.entry(serde_json::to_vec(&orig).unwrap()).or_default() += 1;
            }
            Decoded::Original(_) => panic!("a replayed record without annotation"),
        }
    }
    // Compare as parsed-and-reserialized JSON (the payload round-trips the object).
    let want: BTreeMap<Vec<u8>, usize> = want
        .into_iter()
        .map(|(d, n)| {
            let v: serde_json::Value = serde_json::from_slice(&d).unwrap();
            (serde_json::to_vec(&v).unwrap(), n)
        })
        .collect();
    assert!(
        have == want,
        "the target's payloads differ from the source's"
    );
}
