//! The writer's files read back by independent readers (pyarrow, DuckDB) and
//! by our own: Hive partitions, every column, exact payload bytes.

use std::sync::Arc;

use bytes::Bytes;
use fluxcap::archive::layout::{Layout, hour_key};
use fluxcap::archive::writer::{ParquetSettings, put_object};
use fluxcap::record::{Position, Record, RecordBatchBuilder};
use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::harness::*;

fn records() -> Vec<Record> {
    let base = 1_795_611_600_000i64; // 2026-11-25T13:00:00Z
    let mut out = Vec::new();
    for i in 0..500i64 {
        let data: Vec<u8> = match i % 5 {
            0 => vec![0u8, 255, 1, 2, 0xC3, 0x28, i as u8], // not UTF-8
            1 => b"not json at all".to_vec(),
            _ => format!(r#"{{"i":{i},"type":"t{}"}}"#, i % 3).into_bytes(),
        };
        out.push(Record {
            shard_id: "shardId-000000000007".into(),
            sequence_number: format!("4959033827149025660855969253836157109592157598913{:07}", i)
                .into(),
            subsequence_number: i % 3,
            partition_key: format!("pk-{}", i % 11),
            explicit_hash_key: (i % 4 == 0).then(|| format!("{}", 1u128 << (i % 100))),
            // Two hours: 13:xx and 14:xx.
            arrival_ms: base + i * 14_400,
            data: Bytes::from(data),
        });
    }
    // A large record (2 MiB).
    out.push(Record {
        shard_id: "shardId-000000000007".into(),
        sequence_number: "49590338271490256608559692538361571095921575989139999999".into(),
        subsequence_number: 0,
        partition_key: "big".into(),
        explicit_hash_key: None,
        arrival_ms: base + 7_000_000,
        data: Bytes::from((0..2 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
    });
    out
}

#[test]
fn pyarrow_and_duckdb_read_the_writers_files() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let layout = Layout::new("");
    let recs = records();
    let settings = ParquetSettings::default();
    // One file per hour, as the archiver does.
    let mut by_hour: std::collections::BTreeMap<i64, Vec<&Record>> = Default::default();
    for r in &recs {
        by_hour.entry(hour_key(r.arrival_ms)).or_default().push(r);
    }
    rt().block_on(async {
        for (hour, rs) in &by_hour {
            let mut b = RecordBatchBuilder::default();
            for r in rs {
                b.push(r);
            }
            let first: Position = rs[0].position();
            let path = layout.data_file("orders", *hour, "shardId-000000000007", &first, rs.len());
            let bytes = settings
                .encode(&[b.finish()], vec![], path.as_ref())
                .unwrap();
            put_object(&store, &path, bytes.into()).await.unwrap();
        }
        // Non-data state beside the table must be ignored by every engine.
        store
            .put(
                &"orders/_fluxcap/checkpoints/x/1.json".into(),
                Bytes::from_static(b"{}").into(),
            )
            .await
            .unwrap();
    });
    let hours: Vec<_> = std::fs::read_dir(dir.path().join("orders/dt=2026-11-25"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(hours.len(), by_hour.len(), "{hours:?}");

    let mut expected: Vec<_> = recs
        .iter()
        .map(|r| {
            let (dt, hr) = fluxcap::archive::layout::partition_of(r.arrival_ms);
            Archived {
                shard_id: r.shard_id.to_string(),
                sequence_number: r.sequence_number.to_string(),
                subsequence_number: r.subsequence_number,
                partition_key: r.partition_key.clone(),
                explicit_hash_key: r.explicit_hash_key.clone(),
                arrival_ms: r.arrival_ms,
                data: r.data.to_vec(),
                dt,
                hr,
            }
        })
        .collect();
    expected.sort();
    for engine in ["pyarrow", "duckdb"] {
        let mut got = read_local(engine, &dir.path().join("orders"));
        got.sort();
        assert_eq!(got.len(), expected.len(), "{engine}");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "{engine} disagrees");
        }
    }
}
