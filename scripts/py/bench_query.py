#!/usr/bin/env python3
"""Driver of scripts/bench-query: the same queries with fluxcap and DuckDB on the same files, measured
two ways in one run.

* cold — each engine a fresh process per query, whole wall time as a user at a shell sees it:
  `fluxcap sql "…"` against a fresh Python process that imports duckdb, opens a connection, creates
  the view and runs the query (there is no DuckDB CLI on PyPI; the start-up of both is printed).
* warm — repeated queries in one long-lived process: `fluxcap serve`'s `POST /api/sql` (CSV, the
  whole result over loopback HTTP) against DuckDB in this process (execute + fetchall).

Each cell is the best of RUNS runs after one warm-up run (so the files are in the page cache in both
columns: "cold" means a cold process, not a cold disk). Both engines use every core.

The unified view `S` (`events` = archive.events ∪ live.events) is measured with a local Kinesis
emulator (ferrokinesis, started here on a free port) holding LIVE_RECORDS records that are not in
the archive; DuckDB reads the archive plus those records (fetched from the emulator with boto3 and
written to a Parquet file) as a UNION ALL with S's rule: a live record counts only after its
shard's last archived record (DuckDB finds that by a scan; fluxcap reads its checkpoints). Results of both engines are compared (values for small
results, row counts for large ones) before anything is timed.

`--compare A.json B.json …` prints one table of earlier runs' --json-out files (one per archive
layout: scripts/bench-query with LAYOUTS).
"""
import argparse
import csv
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

DAY = "2026-11-18"
LAST_HOUR = ("2026-11-19 23:00:00", "2026-11-20 00:00:00")
KEY = "customer-4242"
RUNS = 3
LIVE_RECORDS = 20000
LIVE_SHARDS = 2

# (name, fluxcap SQL, DuckDB SQL); DuckDB's view `t` is the archive, `s` archive ∪ live records.
QUERIES = [
    ("count per hour, one day",
     "SELECT hr, count(*) AS n FROM archive.events WHERE dt = '%s' GROUP BY hr ORDER BY hr" % DAY,
     "SELECT hr, count(*) AS n FROM t WHERE dt = '%s' GROUP BY hr ORDER BY hr" % DAY),
    ("group by JSON field, all",
     "SELECT json_get_str(data, 'type') AS type, count(*) AS n FROM archive.events GROUP BY 1 ORDER BY 1",
     "SELECT json_extract_string(decode(data), '$.type') AS type, count(*) AS n FROM t GROUP BY 1 ORDER BY 1"),
    ("point lookup by key, one day",
     "SELECT * FROM archive.events WHERE dt = '%s' AND partition_key = '%s'" % (DAY, KEY),
     "SELECT * FROM t WHERE dt = '%s' AND partition_key = '%s'" % (DAY, KEY)),
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
    ("last hour by arrival time",
     "SELECT count(*) AS n, count(DISTINCT partition_key) AS keys, sum(octet_length(data)) AS bytes "
     "FROM archive.events WHERE approximate_arrival_timestamp >= TIMESTAMP '%s' "
     "AND approximate_arrival_timestamp < TIMESTAMP '%s'" % LAST_HOUR,
     "SELECT count(*) AS n, count(DISTINCT partition_key) AS keys, sum(octet_length(data)) AS bytes "
     "FROM t WHERE approximate_arrival_timestamp >= TIMESTAMPTZ '%s+00' "
     "AND approximate_arrival_timestamp < TIMESTAMPTZ '%s+00'" % LAST_HOUR),
    ("partition_key = …, all days",
     "SELECT shard_id, sequence_number, octet_length(data) AS len FROM archive.events "
     "WHERE partition_key = '%s' ORDER BY shard_id, sequence_number" % KEY,
     "SELECT shard_id, sequence_number, octet_length(data) AS len FROM t "
     "WHERE partition_key = '%s' ORDER BY shard_id, sequence_number" % KEY),
    ("unified view S (archive + live)",
     "SELECT count(*) AS n, count(DISTINCT partition_key) AS keys, sum(octet_length(data)) AS bytes "
     "FROM events",
     "SELECT count(*) AS n, count(DISTINCT partition_key) AS keys, sum(octet_length(data)) AS bytes "
     "FROM s"),
]

DUCKDB_SETUP = """
import duckdb, os, sys
con = duckdb.connect()
con.execute("SET threads = %d" % (os.cpu_count() or 2))
con.execute("SET TimeZone = 'UTC'")
con.execute("SET enable_progress_bar = false")
con.execute("CREATE VIEW t AS SELECT * FROM read_parquet('%s', hive_partitioning = true, "
            "hive_types = {'dt': VARCHAR, 'hr': VARCHAR})" % sys.argv[1])
# S: the archive, plus the live records after each shard's last archived one (S's rule).
con.execute("CREATE VIEW s AS SELECT partition_key, data FROM t UNION ALL "
            "SELECT l.partition_key, l.data FROM read_parquet('%s') l LEFT JOIN "
            "(SELECT shard_id, max(lpad(sequence_number, 129, '0')) AS k FROM t GROUP BY shard_id) a "
            "USING (shard_id) WHERE a.k IS NULL OR lpad(l.sequence_number, 129, '0') > a.k"
            % sys.argv[2])
"""
# A fresh process: set up, run the query, print the row count.
DUCKDB_CHILD = DUCKDB_SETUP + "print(len(con.execute(sys.argv[3]).fetchall()))\n"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def norm(v):
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "replace")
    return v


class Fluxcap:
    def __init__(self, args, config):
        self.args = args
        self.env = dict(os.environ, FLUXCAP_STREAMS=args.stream, FLUXCAP_LOG="error",
                        FLUXCAP_CONFIG=config, AWS_EC2_METADATA_DISABLED="true",
                        AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                        AWS_REGION="us-east-1")
        self.server = None
        self.port = None
        self.token = "bench-%032x" % int.from_bytes(os.urandom(16), "big")

    def cold(self, sql, out=os.devnull):
        """Wall time of a fresh `fluxcap sql` process, and its row count."""
        t = time.perf_counter()
        p = subprocess.run([self.args.fluxcap, "--archive", self.args.archive, "sql", "--format",
                            "json", "-o", out, sql], env=self.env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            sys.exit("fluxcap failed on %s:\n%s" % (sql, p.stderr))
        m = re.search(r"(\d+) rows? in ([0-9.]+) s", p.stderr)
        if not m:
            sys.exit("no timing line from fluxcap: %s" % p.stderr)
        return wall, int(m.group(1))

    def rows(self, sql):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            self.cold(sql, f.name)
            return [tuple(norm(v) for v in json.loads(l).values())
                    for l in open(f.name) if l.strip()]

    def start_server(self):
        env = dict(self.env, FLUXCAP_SERVER_TOKEN=self.token)
        self.server = subprocess.Popen([self.args.fluxcap, "--archive", self.args.archive, "serve",
                                        "--bind", "127.0.0.1:0"], env=env, stdout=subprocess.PIPE,
                                       text=True)
        line = self.server.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not m:
            sys.exit("fluxcap serve did not start: %r" % line)
        self.port = int(m.group(1))

    def warm(self, sql):
        """Time of one POST /api/sql (whole CSV result) to the long-lived server, and rows."""
        body = json.dumps({"sql": sql, "format": "csv"}).encode()
        req = urllib.request.Request("http://127.0.0.1:%d/api/sql" % self.port, data=body,
                                     headers={"Authorization": "Bearer " + self.token,
                                              "Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            text = r.read().decode()
        took = time.perf_counter() - t
        rows = sum(1 for _ in csv.reader(io.StringIO(text))) - 1
        return took, rows

    def stop(self):
        if self.server:
            self.server.terminate()
            self.server.wait()


def start_emulator(root):
    port = free_port()
    p = subprocess.Popen([os.path.join(root, "scripts/ferrokinesis"), str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if "listening" in line:
            break
    return p, "http://127.0.0.1:%d" % port


def fill_live(endpoint, stream, path):
    """Create `stream` on the emulator, put LIVE_RECORDS order events, read them back and write
    them (as Kinesis returned them) to the Parquet file `path` for DuckDB."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    k = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test")
    k.create_stream(StreamName=stream, ShardCount=LIVE_SHARDS)
    k.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.2})
    for start in range(0, LIVE_RECORDS, 500):
        batch = [{"PartitionKey": "customer-%d" % ((i * 7919) % 50000),
                  "Data": json.dumps({"event_id": "live-%d" % i, "type": "paid", "country": "DE",
                                      "amount": i % 1000 + 0.5}).encode()}
                 for i in range(start, min(start + 500, LIVE_RECORDS))]
        r = k.put_records(StreamName=stream, Records=batch)
        if r.get("FailedRecordCount"):
            sys.exit("the emulator refused %d records" % r["FailedRecordCount"])
    shards, seqs, keys, datas = [], [], [], []
    for shard in k.list_shards(StreamName=stream)["Shards"]:
        it = k.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                  ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            r = k.get_records(ShardIterator=it, Limit=10000)
            for rec in r["Records"]:
                shards.append(shard["ShardId"])
                seqs.append(rec["SequenceNumber"])
                keys.append(rec["PartitionKey"])
                datas.append(rec["Data"])
            if not r["Records"] and r.get("MillisBehindLatest", 0) == 0:
                break
            it = r.get("NextShardIterator")
    if len(keys) != LIVE_RECORDS:
        sys.exit("read back %d of %d live records" % (len(keys), LIVE_RECORDS))
    pq.write_table(pa.table({"shard_id": pa.array(shards, pa.string()),
                             "sequence_number": pa.array(seqs, pa.string()),
                             "partition_key": pa.array(keys, pa.string()),
                             "data": pa.array(datas, pa.binary())}), path)


def best(f, sql):
    f(sql)
    runs = [f(sql) for _ in range(RUNS)]
    return min(t for t, _ in runs), runs[0][1]


def geo(rs):
    return math.exp(sum(math.log(r) for r in rs) / len(rs))


def compare(paths):
    """One table of several runs (one per archive layout): each engine's time per layout, and how
    much slower each engine is on every layout than on the first."""
    runs = [json.load(open(p)) for p in paths]
    base = runs[0]
    print("layouts: " + "; ".join("%s = %d files" % (r["layout"], r["files"]) for r in runs))
    for way in ("cold", "warm"):
        print()
        head = ["query"] + ["%s %s %s" % (way, e, r["layout"]) for r in runs for e in ("fluxcap", "DuckDB")]
        head += ["%s/%s %s" % (r["layout"], base["layout"], e) for r in runs[1:] for e in ("fluxcap", "DuckDB")]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for i, row in enumerate(base["rows"]):
            cells = [row["query"]]
            cells += ["%.3f s" % t for r in runs for t in r["rows"][i][way]]
            cells += ["%.2f×" % (r["rows"][i][way][e] / row[way][e]) for r in runs[1:] for e in (0, 1)]
            print("| " + " | ".join(cells) + " |")
        for r in runs:
            print("%s, %s: geometric mean fluxcap/DuckDB %.2f×" % (
                r["layout"], way, geo([x[way][0] / x[way][1] for x in r["rows"]])))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--compare":
        return compare(sys.argv[2:])
    import duckdb

    ap = argparse.ArgumentParser()
    ap.add_argument("--fluxcap", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--skip-live", action="store_true",
                    help="leave out the unified view (an archive whose shard ids are the emulator's)")
    ap.add_argument("--layout", default="", help="name of the archive's layout, for --json-out")
    ap.add_argument("--json-out", help="also write the table to this JSON file (for --compare)")
    args = ap.parse_args()
    if args.skip_live:
        QUERIES.pop()
    threads = os.cpu_count() or 2
    work = tempfile.mkdtemp(prefix="bench-query-")
    live_path = os.path.join(work, "live.parquet")
    emulator, endpoint = start_emulator(args.root)
    flux = None
    try:
        fill_live(endpoint, args.stream, live_path)
        config = os.path.join(work, "fluxcap.toml")
        with open(config, "w") as f:
            f.write('[aws]\nkinesis_endpoint = "%s"\n' % endpoint)
        flux = Fluxcap(args, config)
        glob = os.path.join(args.archive, args.stream, "dt=*", "hr=*", "*.parquet")
        scope = {}
        exec(DUCKDB_SETUP.replace("sys.argv[1]", repr(glob)).replace("sys.argv[2]", repr(live_path)),
             {"duckdb": duckdb, "os": os, "sys": sys}, scope)
        con = scope["con"]

        def duck_warm(sql):
            t = time.perf_counter()
            n = len(con.execute(sql).fetchall())
            return time.perf_counter() - t, n

        def duck_cold(sql):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", DUCKDB_CHILD, glob, live_path, sql],
                               capture_output=True, text=True)
            wall = time.perf_counter() - t
            if p.returncode != 0:
                sys.exit("duckdb failed on %s:\n%s" % (sql, p.stderr))
            return wall, int(p.stdout.split()[-1])

        files = sum(len(f) for _, _, f in os.walk(os.path.join(args.archive, args.stream)))
        print("archive: %s (%d files) + %d live records on ferrokinesis; %d threads; best of %d "
              "runs after a warm-up" % (args.archive, files, LIVE_RECORDS, threads, RUNS))
        # Same answers first: values of small results of plain columns, row counts of the
        # others (`SELECT *` prints payloads and times differently, and fluxcap adds the
        # annotation columns).
        for name, ours, theirs in QUERIES:
            want = [tuple(norm(v) for v in r) for r in con.execute(theirs).fetchall()]
            if len(want) > 1000 or "SELECT *" in ours:
                if flux.cold(ours)[1] != len(want):
                    sys.exit("%s: fluxcap and DuckDB return different row counts" % name)
            else:
                got = flux.rows(ours)
                if sorted(map(repr, got)) != sorted(map(repr, want)):
                    sys.exit("%s: fluxcap and DuckDB disagree:\n%s\n%s" % (name, got[:5], want[:5]))
        start_up = (best(flux.cold, "SELECT 1")[0], best(duck_cold, "SELECT 1")[0])
        print("process start-up (SELECT 1): fluxcap %.3f s, python + duckdb %.3f s"
              % start_up)
        flux.start_server()
        table = []
        for name, ours, theirs in QUERIES:
            fc, rows = best(flux.cold, ours)
            dc, rows_d = best(duck_cold, theirs)
            fw, rows_w = best(flux.warm, ours)
            dw, rows_dw = best(duck_warm, theirs)
            if len({rows, rows_d, rows_w, rows_dw}) != 1:
                sys.exit("%s: row counts differ: fluxcap %d/%d, DuckDB %d/%d"
                         % (name, rows, rows_w, rows_d, rows_dw))
            table.append((name, fc, dc, fw, dw, rows))
        print()
        print("| query | cold fluxcap | cold DuckDB | ratio | warm fluxcap | warm DuckDB | ratio | rows |")
        print("|---|---|---|---|---|---|---|---|")
        for name, fc, dc, fw, dw, rows in table:
            print("| %s | %.3f s | %.3f s | %.2f× | %.3f s | %.3f s | %.2f× | %d |"
                  % (name, fc, dc, fc / dc, fw, dw, fw / dw, rows))
        cold = [fc / dc for _, fc, dc, _, _, _ in table]
        warm = [fw / dw for _, _, _, fw, dw, _ in table]
        print()
        for label, rs in (("cold", cold), ("warm", warm)):
            print("%s: geometric mean fluxcap/DuckDB %.2f× (target ≤ 1.0), worst %.2f× "
                  "(target ≤ 1.5)" % (label, geo(rs), max(rs)))
        print(json.dumps({"cold": {"geomean": round(geo(cold), 3), "ratios": [round(r, 3) for r in cold]},
                          "warm": {"geomean": round(geo(warm), 3), "ratios": [round(r, 3) for r in warm]}}))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"layout": args.layout, "files": files,
                           "rows": [{"query": name, "cold": [fc, dc], "warm": [fw, dw]}
                                    for name, fc, dc, fw, dw, _ in table]}, f)
    finally:
        if flux:
            flux.stop()
        emulator.terminate()
        emulator.wait()


if __name__ == "__main__":
    main()
