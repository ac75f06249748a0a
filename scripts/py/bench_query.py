#!/usr/bin/env python3
"""Driver of scripts/bench-query: the same six queries with `fluxcap sql` and DuckDB, same files.

fluxcap's time is the one it reports on stderr (planning + execution + writing the result, without
process start-up); DuckDB's is execute + fetchall in this process. Both use every core.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

DAY = "2026-11-18"
QUERIES = [
    ("count per hour, one day",
     "SELECT hr, count(*) AS n FROM archive.events WHERE dt = '%s' GROUP BY hr ORDER BY hr" % DAY,
     "SELECT hr, count(*) AS n FROM t WHERE dt = '%s' GROUP BY hr ORDER BY hr" % DAY),
    ("group by JSON field, all",
     "SELECT json_get_str(data, 'type') AS type, count(*) AS n FROM archive.events GROUP BY 1",
     "SELECT json_extract_string(decode(data), '$.type') AS type, count(*) AS n FROM t GROUP BY 1"),
    ("point lookup by key, one day",
     "SELECT * FROM archive.events WHERE dt = '%s' AND partition_key = 'customer-4242'" % DAY,
     "SELECT * FROM t WHERE dt = '%s' AND partition_key = 'customer-4242'" % DAY),
    ("last record per key",
     "SELECT partition_key, last_value(data ORDER BY approximate_arrival_timestamp, shard_id, sequence_number) AS data "
     "FROM archive.events GROUP BY partition_key",
     "SELECT partition_key, arg_max(data, (approximate_arrival_timestamp, shard_id, sequence_number)) AS data "
     "FROM t GROUP BY partition_key"),
    ("filtered count, JSON predicate",
     "SELECT count(*) AS n FROM archive.events WHERE json_get_str(data, 'country') = 'DE' "
     "AND json_get_float(data, 'amount') > 500",
     "SELECT count(*) AS n FROM t WHERE json_extract_string(decode(data), '$.country') = 'DE' "
     "AND CAST(json_extract(decode(data), '$.amount') AS DOUBLE) > 500"),
    ("sum of payload lengths, all",
     "SELECT sum(octet_length(data)) AS bytes FROM archive.events",
     "SELECT sum(octet_length(data)) AS bytes FROM t"),
]
RUNS = 3


def run_fluxcap(args, sql):
    env = dict(os.environ, FLUXCAP_STREAMS=args.stream, FLUXCAP_LOG="error")
    env.pop("FLUXCAP_CONFIG", None)
    p = subprocess.run([args.fluxcap, "--archive", args.archive, "sql", "--format", "json", "-o",
                        os.devnull, sql], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("fluxcap failed on %s:\n%s" % (sql, p.stderr))
    m = re.search(r"(\d+) rows? in ([0-9.]+) s", p.stderr)
    if not m:
        sys.exit("no timing line from fluxcap: %s" % p.stderr)
    return float(m.group(2)), int(m.group(1))


def main():
    import duckdb

    ap = argparse.ArgumentParser()
    ap.add_argument("--fluxcap", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--stream", required=True)
    args = ap.parse_args()
    threads = os.cpu_count() or 2
    con = duckdb.connect()
    con.execute("SET threads = %d" % threads)
    con.execute("SET TimeZone = 'UTC'")
    glob = os.path.join(args.archive, args.stream, "dt=*", "hr=*", "*.parquet")
    con.execute("CREATE VIEW t AS SELECT * FROM read_parquet('%s', hive_partitioning = true, "
                "hive_types = {'dt': VARCHAR, 'hr': VARCHAR})" % glob)
    files = sum(len(f) for _, _, f in os.walk(os.path.join(args.archive, args.stream)))
    print("archive: %s (%d files), %d threads, best of %d runs after a warm-up"
          % (args.archive, files, threads, RUNS))
    print("%-32s %10s %10s %8s %8s" % ("query", "fluxcap s", "duckdb s", "ratio", "rows"))
    ratios = []
    for name, ours, theirs in QUERIES:
        run_fluxcap(args, ours)
        best_ours, rows_ours = min(run_fluxcap(args, ours) for _ in range(RUNS))
        con.execute(theirs).fetchall()
        best_theirs = math.inf
        rows_theirs = 0
        for _ in range(RUNS):
            t = time.perf_counter()
            rows_theirs = len(con.execute(theirs).fetchall())
            best_theirs = min(best_theirs, time.perf_counter() - t)
        if rows_ours != rows_theirs:
            sys.exit("%s: fluxcap returned %d rows, DuckDB %d" % (name, rows_ours, rows_theirs))
        r = best_ours / best_theirs
        ratios.append(r)
        print("%-32s %10.3f %10.3f %7.2fx %8d" % (name, best_ours, best_theirs, r, rows_ours))
    g = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print("geometric mean ratio fluxcap/DuckDB: %.2fx (target <= 1.0, none above 1.5x; worst %.2fx)"
          % (g, max(ratios)))
    print(json.dumps({"geomean": round(g, 3), "worst": round(max(ratios), 3),
                      "ratios": [round(r, 3) for r in ratios]}))


if __name__ == "__main__":
    main()
