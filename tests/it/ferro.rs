//! ferrokinesis with `enforce_limits` really throttles writes: a burst far above
//! one shard's 1 MiB/s / 1000 records/s gets per-entry
//! ProvisionedThroughputExceededException, while the same burst against a
//! non-enforcing server is accepted in full.

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use crate::harness::*;

const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// Fire 3000 records of 1 KiB at a 1-shard stream as 6 concurrent PutRecords
/// batches of 500 (no pacing, no retries); return (accepted, throttled).
async fn burst(c: &Client) -> (usize, usize) {
    let stream = unique("ferro");
    create_stream(c, &stream, 1).await;
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..6 {
        let (c, stream) = (c.clone(), stream.clone());
        tasks.spawn(async move {
            let entries = (0..500)
                .map(|i| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(format!("k-{b}-{i}"))
                        .data(Blob::new(vec![b'x'; 1024]))
                        .build()
                        .unwrap()
                })
                .collect::<Vec<_>>();
            let resp = c
                .put_records()
                .stream_name(&stream)
                .set_records(Some(entries))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.records().len(), 500);
            let (mut ok, mut throttled) = (0, 0);
            for r in resp.records() {
                match r.error_code() {
                    None => {
                        assert!(r.sequence_number().is_some() && r.shard_id().is_some());
                        ok += 1;
                    }
                    Some(THROTTLED) => throttled += 1,
                    Some(other) => panic!("unexpected ErrorCode {other}: {:?}", r.error_message()),
                }
            }
            assert_eq!(resp.failed_record_count().unwrap_or(0), throttled as i32);
            (ok, throttled)
        });
    }
    let (mut ok, mut throttled) = (0, 0);
    while let Some(res) = tasks.join_next().await {
        let (o, t) = res.unwrap();
        ok += o;
        throttled += t;
    }
    (ok, throttled)
}

#[test]
fn ferrokinesis_throttles_only_with_enforce_limits() {
    let rt = rt();

    let limited = ferrokinesis(true);
    let (ok, throttled) = rt.block_on(burst(&kinesis_client(&limited.endpoint())));
    eprintln!("enforce_limits: {ok} accepted, {throttled} throttled");
    assert_eq!(ok + throttled, 3000);
    assert!(
        throttled >= 1,
        "no {THROTTLED} for 3 MiB burst at one shard"
    );
    assert!(ok >= 1, "nothing accepted at all");

    let open = ferrokinesis(false);
    let (ok, throttled) = rt.block_on(burst(&kinesis_client(&open.endpoint())));
    eprintln!("no limits: {ok} accepted, {throttled} throttled");
    assert_eq!((ok, throttled), (3000, 0));
}
