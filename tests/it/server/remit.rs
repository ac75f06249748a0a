//! What the API may do with replays: stored manifests are untrusted, so a
//! resume through the API only runs `kinesis://` targets reading a
//! configured stream, with the same-stream confirmation; and only
//! `server.max_running_replays` replays run at once.

use std::time::{Duration, Instant};

use super::{http, post, serve, token};
use crate::harness::*;

#[test]
fn api_resume_refuses_manifests_outside_its_remit() {
    let k = ferrokinesis(false);
    let stream = unique("remit");
    let dst = unique("dst");
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[server]\nmax_running_replays = 1",
        &[(&stream, "json")],
    );
    let c = kinesis_client(&k.endpoint());
    rt().block_on(async {
        create_stream(&c, &stream, 1).await;
        create_stream(&c, &dst, 1).await;
        put_records(&c, &stream, &orders(60, 2)).await;
    });
    ws.ok(&["archive", "--once"]);
    let t = token();
    let srv = serve(&ws, &t);
    let p = srv.port;
    let slow = serde_json::json!({"stream": stream, "to": format!("kinesis://{dst}"), "rate": 10});

    // One replay at a time here.
    let a = post(p, "/api/replays", &t, slow.clone());
    assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
    let id = a.json()["id"].as_str().unwrap().to_string();
    let b = post(p, "/api/replays", &t, slow.clone());
    assert_eq!(b.status, 429, "{}", String::from_utf8_lossy(&b.body));
    assert!(
        b.json()["error"]
            .as_str()
            .unwrap()
            .contains("server.max_running_replays")
    );
    // Wait until its manifest is stored, then cancel it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dir = ws.archive.join("_fluxcap/replays").join(&id);
    while !dir.join("manifest.json").exists() {
        assert!(Instant::now() < deadline, "no manifest for {id}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = http(p, "DELETE", &format!("/api/replays/{id}"), Some(&t), b"");
    assert_eq!(a.status, 202);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["target"], format!("kinesis://{dst}"));

    // Forged manifests in the store (anyone who can write there can make one).
    let out = ws.dir.path().join("stolen.jsonl");
    let forge = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let fid = format!("r-forged-{name}-{:08x}", rand::random::<u32>());
        let mut m = manifest.clone();
        m["id"] = fid.clone().into();
        edit(&mut m);
        let d = ws.archive.join("_fluxcap/replays").join(&fid);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        fid
    };
    let file_target = forge("file", &|m| {
        m["target"] = format!("file://{}", out.display()).into()
    });
    let stdout_target = forge("stdout", &|m| m["target"] = "-".into());
    let outside = forge("parquet", &|m| {
        m["source"] = serde_json::json!({"kind": "parquet", "location": "/etc", "stream": stream});
    });
    let unknown_stream = forge("unknown", &|m| {
        m["source"] = serde_json::json!({"kind": "stream", "stream": "not-configured"});
    });
    for fid in [&file_target, &stdout_target, &outside, &unknown_stream] {
        let a = http(
            p,
            "POST",
            &format!("/api/replays/{fid}/resume"),
            Some(&t),
            b"",
        );
        assert_eq!(a.status, 403, "{fid}: {}", String::from_utf8_lossy(&a.body));
        let v = a.json();
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("fluxcap replay --resume"), "{e}");
        // No path from the manifest in the answer.
        assert!(!e.contains("/etc") && !e.contains("stolen"), "{e}");
        assert!(v["request_id"].is_string());
    }
    assert!(!out.exists(), "a file target was written through the API");

    // Into its own source stream: only with the confirmation, as for a new replay.
    let same = forge("same", &|m| {
        m["target"] = format!("kinesis://{stream}").into()
    });
    let a = http(
        p,
        "POST",
        &format!("/api/replays/{same}/resume"),
        Some(&t),
        b"",
    );
    assert_eq!(a.status, 409, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("confirm_same_stream")
    );
    let a = http(
        p,
        "POST",
        &format!("/api/replays/{same}/resume"),
        Some(&t),
        br#"{"confirm_same_stream": true}"#,
    );
    assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
    let a = http(p, "DELETE", &format!("/api/replays/{same}"), Some(&t), b"");
    assert!(a.status == 202 || a.status == 409, "{}", a.status);
    // The legitimate one still resumes.
    let a = http(
        p,
        "POST",
        &format!("/api/replays/{id}/resume"),
        Some(&t),
        b"",
    );
    assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
}
