#!/usr/bin/env python3
"""Run SQL with DuckDB over one stream's fluxcap archive: the independent oracle of the SQL tests
and the peer of scripts/bench-query.

Usage:
    scripts/py/duckdb_query.py [--threads N] [--time] STREAM_DIR SQL [SQL ...]

The view `t` is the Hive-partitioned archive STREAM_DIR/dt=*/hr=*/*.parquet with dt and hr kept as
strings (as fluxcap shows them). Each SQL's rows are printed as JSON lines (bytes as base64,
timestamps as epoch milliseconds, decimals as floats). With --time, instead of rows, one line
{"seconds": S, "rows": N} per statement, timing execution and full materialisation of the result.
"""
import argparse
import base64
import datetime
import decimal
import json
import os
import sys
import time
from pathlib import Path

VENV = Path(__file__).resolve().parents[2] / ".local" / "venv"


def use_venv():
    py = VENV / "bin" / "python"
    if py.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(py), [str(py), str(Path(__file__).resolve())] + sys.argv[1:])


def plain(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=datetime.timezone.utc)
        return int(v.timestamp() * 1000)
    if isinstance(v, decimal.Decimal):
        return float(v)
    return v


def main():
    use_venv()
    import duckdb

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("dir")
    ap.add_argument("sql", nargs="+")
    a = ap.parse_args()
    con = duckdb.connect()
    if a.threads:
        con.execute("SET threads = %d" % a.threads)
    con.execute("SET TimeZone = 'UTC'")
    glob = os.path.join(a.dir, "dt=*", "hr=*", "*.parquet")
    con.execute(
        "CREATE VIEW t AS SELECT * FROM read_parquet('%s', hive_partitioning = true, "
        "hive_types = {'dt': VARCHAR, 'hr': VARCHAR})" % glob.replace("'", "''")
    )
    for sql in a.sql:
        started = time.perf_counter()
        rows = con.execute(sql).fetchall()
        if a.time:
            print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(rows)}))
            continue
        cols = [d[0] for d in con.description]
        for r in rows:
            print(json.dumps({c: plain(v) for c, v in zip(cols, r)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
