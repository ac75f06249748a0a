//! Crash test: `fluxcap archive` killed with SIGKILL at 20+ random moments
//! while traffic keeps arriving, re-run each time; the archive read from the
//! raw directory by pyarrow must equal every record put, exactly once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use crate::harness::*;

#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let k = kinesis();
    let stream = unique("crash");
    let c = kinesis_client(&k.endpoint());
    let rt = rt();
    rt.block_on(create_stream(&c, &stream, 2));
    let ws = Workspace::new(
        &k.endpoint(),
        None,
        None,
        "[archive.flush]\nmax_age = \"200ms\"\nmax_bytes = \"16KiB\"\n[archiver]\npoll_interval = \"100ms\"\nmetrics_bind = \"\"",
        &[(&stream, "json")],
    );

    // Producer: keeps putting small batches until told to stop.
    let puts = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (puts, stop, c, stream) = (puts.clone(), stop.clone(), c.clone(), stream.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut seed = 100;
            while !stop.load(Ordering::Relaxed) {
                let p = rt.block_on(put_records(&c, &stream, &orders(25, seed)));
                puts.lock().unwrap().extend(p);
                seed += 1;
            }
        })
    };

    let mut rng = rand::rng();
    let kills = 22;
    for _ in 0..kills {
        let mut child = ws.spawn_archiver();
        // The kill moment is random by design (not a wait for anything).
        std::thread::sleep(Duration::from_millis(rng.random_range(150..1800)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let puts = puts.lock().unwrap().clone();
    assert!(
        puts.len() > 200,
        "traffic kept arriving ({} records)",
        puts.len()
    );

    // Catch up after the last crash.
    ws.ok(&["archive", "--once"]);
    let got = read_local("pyarrow", &ws.archive.join(&stream));
    assert_same(
        &puts_multiset(&puts),
        &archived_multiset(&got),
        "after 22 kill -9",
    );
    let out = ws.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no gaps, no duplicates"));
}
