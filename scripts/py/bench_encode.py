#!/usr/bin/env python3
"""Helper of scripts/bench-encode: generate the input, time pyarrow, print the comparison."""
import json
import os
import random
import sys
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq

from archive_schema import SCHEMA  # noqa: E402


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


def compare(path, level, ours_json, ours_file):
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    table = pa.ipc.open_file(path).read_all()
    payload = pa.compute.sum(pa.compute.binary_length(table.column("data"))).as_py()
    best = None
    out = path + ".pyarrow.parquet"
    for _ in range(3):
        t = time.perf_counter()
        pq.write_table(table, out, compression="zstd", compression_level=level, use_dictionary=True,
                       write_statistics=True, data_page_version="1.0")
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    ours = json.loads(ours_json)
    ours_mbs = ours["payload_bytes"] / ours["seconds"] / 1e6
    py_mbs = payload / best / 1e6
    assert pq.read_metadata(ours_file).num_rows == table.num_rows, "fluxcap wrote a different row count"
    print(f"records:            {table.num_rows}")
    print(f"payload:            {payload / 1e6:.1f} MB, zstd level {level}, single thread")
    print(f"fluxcap writer:     {ours_mbs:8.1f} MB/s  ({ours['seconds']:.3f} s, {ours['output_bytes'] / 1e6:.1f} MB out)")
    print(f"pyarrow {pa.__version__:<10} {py_mbs:8.1f} MB/s  ({best:.3f} s, {os.path.getsize(out) / 1e6:.1f} MB out)")
    print(f"ratio fluxcap/pyarrow: {ours_mbs / py_mbs:.2f}x")


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(sys.argv[2], int(sys.argv[3]))
    else:
        compare(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
