//! Times fluxcap's Parquet writer on an Arrow IPC file of archive records
//! (written by scripts/bench-encode, which times pyarrow on the same file).
//!
//! Usage: bench_encode INPUT.arrow OUTPUT.parquet ZSTD_LEVEL
//! Prints one JSON line: {"seconds": …, "cpu_seconds": …, "payload_bytes": …,
//! "output_bytes": …, "rows": …} — wall and CPU time (all threads of the
//! process) of the encode call. BENCH_NO_BLOOM=1 turns the bloom filters off.

use std::time::Instant;

use arrow::array::{Array, AsArray};
use fluxcap::archive::writer::ParquetSettings;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        return Err("usage: bench_encode INPUT.arrow OUTPUT.parquet ZSTD_LEVEL".into());
    }
    let file = std::fs::File::open(&args[1])?;
    let reader = arrow::ipc::reader::FileReader::try_new(file, None)?;
    let batches: Vec<_> = reader.collect::<Result<_, _>>()?;
    let batches: Vec<_> = batches
        .into_iter()
        .map(|b| b.with_schema(fluxcap::record::schema()))
        .collect::<Result<_, _>>()?;
    let payload: usize = batches
        .iter()
        .map(|b| {
            let d = b
                .column_by_name("data")
                .map(|c| c.as_binary::<i32>().values().len());
            d.unwrap_or(0)
        })
        .sum();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let s = ParquetSettings {
        zstd_level: args[3].parse()?,
        bloom_filters: std::env::var("BENCH_NO_BLOOM").is_err(),
        ..Default::default()
    };
    let cpu0 = process_cpu_seconds();
    let t = Instant::now();
    let bytes = s.encode(&batches, vec![], &args[2])?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu0;
    std::fs::write(&args[2], &bytes)?;
    let _ = batches.first().map(|b| b.column(0).len());
    println!(
        "{{\"seconds\": {secs}, \"cpu_seconds\": {cpu}, \"payload_bytes\": {payload}, \"output_bytes\": {}, \"rows\": {rows}}}",
        bytes.len()
    );
    Ok(())
}

/// CPU time of the whole process so far (CLOCK_PROCESS_CPUTIME_ID, as
/// Python's `time.process_time`).
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
