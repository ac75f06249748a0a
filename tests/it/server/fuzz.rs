//! A property-based run of the whole HTTP API from its OpenAPI description
//! (schemathesis, installed by scripts/setup), with and without the token:
//! no 5xx answer, no crash, every status documented and every answer
//! matching its schema.

use std::process::Command;

use super::{serve, token};
use crate::harness::*;

/// Run schemathesis against `base`; returns (exit status, output, test cases run).
fn schemathesis(base: &str, header: Option<&str>, report: &std::path::Path) -> (bool, String, u64) {
    let exe = root().join(".local/venv/bin/schemathesis");
    assert!(exe.exists(), "missing {}: run scripts/setup", exe.display());
    let mut cmd = Command::new(exe);
    // Its cache goes to the working directory: the test's, not the checkout.
    cmd.current_dir(report.parent().unwrap_or(std::path::Path::new("/tmp")))
        .arg("run")
        .arg(root().join("src/server/openapi.json"))
        .args(["--url", base])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "40", "--seed", "16", "--workers", "1"])
        .args(["--request-timeout", "60", "--no-color"])
        .arg("--report")
        .arg("ndjson")
        .arg("--report-ndjson-path")
        .arg(report)
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1");
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let o = cmd.output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // Every request schemathesis sent is one "interaction" in the report.
    let events = std::fs::read_to_string(report).unwrap_or_default();
    let requests = events.matches("\"request\":").count() as u64;
    (o.status.success(), text, requests)
}

#[test]
fn the_whole_api_survives_property_based_requests() {
    let k = ferrokinesis(false);
    let stream = unique("fuzz");
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[(&stream, "json")]);
    let c = kinesis_client(&k.endpoint());
    rt().block_on(async {
        create_stream(&c, &stream, 1).await;
        put_records(&c, &stream, &orders(20, 5)).await;
    });
    ws.ok(&["archive", "--once"]);
    let t = token();
    let mut srv = serve(&ws, &t);
    let base = format!("http://127.0.0.1:{}", srv.port);
    let mut total = 0;
    for (name, header) in [
        ("with-token", Some(format!("Authorization: Bearer {t}"))),
        ("without-token", None),
    ] {
        let report = ws.dir.path().join(format!("{name}.ndjson"));
        let (ok, out, requests) = schemathesis(&base, header.as_deref(), &report);
        assert!(ok, "schemathesis {name} found problems:\n{out}");
        assert!(requests > 50, "{name}: only {requests} requests\n{out}");
        let summary: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("Test cases") || l.contains("passed"))
            .collect();
        eprintln!("schemathesis {name}: {requests} requests; {summary:?}");
        total += requests;
        assert!(srv.alive(), "the server died during the {name} run");
    }
    eprintln!("schemathesis: {total} requests in all");
    assert_eq!(
        super::http(srv.port, "GET", "/metrics", Some(&t), b"").status,
        200
    );
    let errors = super::metric(srv.port, &t, "fluxcap_http_errors_total");
    assert_eq!(
        errors, 0,
        "the server answered {errors} requests with a 5xx"
    );
}
