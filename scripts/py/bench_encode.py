#!/usr/bin/env python3
"""Helper of scripts/bench-encode: generate the input, then time fluxcap's
writer and pyarrow's on it in one run and print one table.

Rows (same data, zstd at the same level, one thread, best of REPS runs,
the writers' runs interleaved so that load on a shared machine hits all;
MB/s is payload per CPU second of the encode call, which other processes
on a shared machine disturb far less than wall time, shown beside it):

- fluxcap as archived: ParquetSettings::default() (bloom filters on
  sequence_number and partition_key, page statistics + page index, no
  dictionary and no statistics on data, no dictionary on sequence_number
  and approximate_arrival_timestamp, row groups of 262,144 rows);
- pyarrow doing the same work: the same row groups, dictionary columns,
  statistics columns, page index and bloom filters (ndv = rows of a row
  group, fpp 0.01);
- both again without bloom filters (the cost of the filters, each side);
- pyarrow with its defaults (pq.write_table: one row group of up to 1Mi
  rows, dictionary and statistics on every column, no page index, no bloom
  filters) — the comparison the README showed before 2026-11-30.
"""
import json
import os
import random
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq

from archive_schema import SCHEMA  # noqa: E402

ROW_GROUP_ROWS = 262_144  # ParquetSettings::default().row_group_rows
BLOOM_COLUMNS = ["sequence_number", "partition_key"]
NO_DICTIONARY = {"data", "sequence_number", "approximate_arrival_timestamp"}
NO_STATISTICS = {"data"}


def generate(path, n):
    rnd = random.Random(7)
    types = ["created", "paid", "shipped", "cancelled"]
    countries = ["DE", "FR", "US", "BR", "JP", "IN", "NG", "GB"]
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    base_ms = 1795611600000
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, SCHEMA) as w:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            shard, seq, sub, pk, ehk, ts, data = [], [], [], [], [], [], []
            for j in range(start, start + m):
                cust = f"customer-{rnd.randrange(5000):05d}"
                ev = {
                    "event_id": f"e-{j:09d}", "type": rnd.choice(types), "order_id": f"o-{rnd.randrange(10**7):07d}",
                    "customer_id": cust, "country": rnd.choice(countries), "amount": round(rnd.uniform(3, 400), 2),
                    "currency": "EUR",
                    "items": [{"sku": f"sku-{rnd.randrange(10000):05d}", "qty": rnd.randint(1, 4)} for _ in range(rnd.randint(1, 3))],
                    "note": " ".join(rnd.choice(words) for _ in range(rnd.randint(10, 22))),
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((base_ms + j * 3) / 1000)),
                }
                shard.append(f"shardId-{j % 4:012d}")
                seq.append(f"4959033827149025660855969253836157109592157598{j:010d}")
                sub.append(0)
                pk.append(cust)
                ehk.append(None)
                ts.append(base_ms + j * 3)
                data.append(json.dumps(ev, separators=(",", ":")).encode())
            w.write_batch(pa.record_batch([shard, seq, sub, pk, ehk, pa.array(ts, pa.timestamp("ms", tz="UTC")), data], schema=SCHEMA))
    sz = sum(len(x) for x in pa.ipc.open_file(path).read_all().column("data").to_pylist()[:1000]) / 1000
    print(f"[bench-encode] generated {n} records, ~{sz:.0f} bytes of payload each", file=sys.stderr)


def pyarrow_same_work(rows, bloom):
    """pq.write_table arguments doing what ParquetSettings::default() does."""
    cols = SCHEMA.names
    kw = dict(row_group_size=ROW_GROUP_ROWS, data_page_size=1 << 20,
              use_dictionary=[c for c in cols if c not in NO_DICTIONARY],
              write_statistics=[c for c in cols if c not in NO_STATISTICS],
              write_page_index=True)
    if bloom:
        ndv = max(1, min(rows, ROW_GROUP_ROWS))
        kw["bloom_filter_options"] = {c: {"ndv": ndv, "fpp": 0.01} for c in BLOOM_COLUMNS}
    return kw


def compare(path, level, ours_bin, reps):
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    table = pa.ipc.open_file(path).read_all()
    rows = table.num_rows
    payload = pa.compute.sum(pa.compute.binary_length(table.column("data"))).as_py()
    out = path + ".out.parquet"
    common = dict(compression="zstd", compression_level=level, data_page_version="1.0")

    def ours(bloom):
        env = dict(os.environ)
        env.pop("BENCH_NO_BLOOM", None)
        if not bloom:
            env["BENCH_NO_BLOOM"] = "1"
        r = json.loads(subprocess.run([ours_bin, path, out, str(level)], env=env, check=True,
                                      capture_output=True, text=True).stdout)
        assert r["rows"] == rows and pq.read_metadata(out).num_rows == rows, "fluxcap wrote a different row count"
        return r["cpu_seconds"], r["seconds"], r["output_bytes"]

    def pyarrow(kw):
        def run():
            c, t = time.process_time(), time.perf_counter()
            pq.write_table(table, out, **common, **kw)
            return time.process_time() - c, time.perf_counter() - t, os.path.getsize(out)
        return run

    writers = [
        ("fluxcap, as archived (bloom seq+pk, page index)", "same", lambda: ours(True)),
        ("pyarrow, same work (bloom seq+pk, page index)", "same", pyarrow(pyarrow_same_work(rows, True))),
        ("fluxcap, bloom filters off", "nobloom", lambda: ours(False)),
        ("pyarrow, same work, bloom filters off", "nobloom", pyarrow(pyarrow_same_work(rows, False))),
        ("pyarrow defaults (1 row group, dict+stats all, no index/bloom)", "defaults",
         pyarrow(dict(use_dictionary=True, write_statistics=True))),
    ]
    best = {}  # name -> (cpu seconds, wall seconds, output bytes) of the run with the least CPU
    for _ in range(reps):
        for name, _, run in writers:
            cpu, wall, size = run()
            if name not in best or cpu < best[name][0]:
                best[name] = (cpu, wall, size)
    os.remove(out)
    mbs = {name: payload / best[name][0] / 1e6 for name, _, _ in writers}
    peer = {"same": mbs[writers[1][0]], "nobloom": mbs[writers[3][0]], "defaults": mbs[writers[4][0]]}
    print(f"records {rows}, payload {payload / 1e6:.1f} MB, zstd level {level}, one thread, "
          f"best of {reps}, pyarrow {pa.__version__}")
    print("MB/s = payload MB per CPU second of the encode call (robust on a shared machine); "
          "wall = its wall-clock MB/s")
    print(f"{'writer':<64} {'MB/s':>7} {'cpu s':>7} {'wall':>7} {'MB out':>7}  ratio to pyarrow, same work")
    for name, group, _ in writers:
        cpu, wall, size = best[name]
        ratio = "" if name.startswith("pyarrow") else f"{mbs[name] / peer[group]:.2f}x"
        if name.startswith("fluxcap, as"):
            ratio += f"  ({mbs[name] / peer['defaults']:.2f}x pyarrow defaults)"
        print(f"{name:<64} {mbs[name]:7.1f} {cpu:7.3f} {payload / wall / 1e6:7.1f} {size / 1e6:7.1f}  {ratio}")
    for side, with_b, without_b in (("fluxcap", writers[0][0], writers[2][0]),
                                    ("pyarrow", writers[1][0], writers[3][0])):
        d = best[with_b][0] - best[without_b][0]
        print(f"cost of {side}'s bloom filters: {d * 1e3:+.0f} ms CPU "
              f"({d / best[without_b][0] * 100:+.1f}% of its CPU time without them), "
              f"{(best[with_b][2] - best[without_b][2]) / 1e6:+.2f} MB")

if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(sys.argv[2], int(sys.argv[3]))
    else:
        compare(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
