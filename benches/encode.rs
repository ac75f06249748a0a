//! Record batches → zstd Parquet bytes (the archiver's encode step).

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fluxcap::archive::writer::ParquetSettings;
use fluxcap::record::{Record, RecordBatchBuilder};

fn batch(n: usize) -> (arrow::array::RecordBatch, u64) {
    let mut b = RecordBatchBuilder::default();
    let mut bytes = 0u64;
    for i in 0..n {
        let data = format!(
            r#"{{"event_id":"e-{i:08}","type":"{}","order_id":"o-{:07}","customer_id":"customer-{:04}","country":"{}","amount":{}.{:02},"currency":"EUR","items":[{{"sku":"sku-{:04}","qty":{}}}],"ts":"2026-11-25T12:{:02}:{:02}Z","note":"{}"}}"#,
            ["created", "paid", "shipped", "cancelled"][i % 4],
            i / 3,
            i % 300,
            ["DE", "FR", "US", "BR"][i % 4],
            (i * 7) % 400,
            i % 100,
            i % 1000,
            1 + i % 4,
            (i / 60) % 60,
            i % 60,
            "x".repeat(60 + i % 40),
        );
        bytes += data.len() as u64;
        b.push(&Record {
            shard_id: format!("shardId-{:012}", i % 4).into(),
            sequence_number: format!("49590338271490256608559692538361571095921575989{:09}", i)
                .into(),
            subsequence_number: 0,
            partition_key: format!("customer-{:04}", i % 300),
            explicit_hash_key: None,
            arrival_ms: 1_795_611_600_000 + i as i64,
            data: Bytes::from(data),
        });
    }
    (b.finish(), bytes)
}

fn bench(c: &mut Criterion) {
    let (b, bytes) = batch(50_000);
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    for level in [1, 3] {
        let s = ParquetSettings {
            zstd_level: level,
            ..Default::default()
        };
        g.bench_function(format!("zstd{level}_50k_records"), |bench| {
            bench.iter(|| {
                s.encode(std::slice::from_ref(&b), vec![], "bench")
                    .expect("encode")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
