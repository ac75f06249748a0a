#!/usr/bin/env python3
"""Driver of scripts/bench-s3: `fluxcap sql` vs DuckDB + httpfs on an archive in the local S3
server, behind a proxy that adds a fixed delay to every request (a round trip from a laptop).

It uploads the archive to the S3 server (directly, not through the proxy), starts the proxy in
this process (asyncio, on a thread; it counts every request it forwards), then runs each query
once per engine, each engine in a fresh process, and prints time and requests per engine and the
ratios. Both engines' rows are compared before anything is printed.

fluxcap's time is the wall time of its process; DuckDB's is measured inside its process from
connect (with the httpfs extension loaded from the pinned PyPI package, nothing downloaded) to the
last row fetched, leaving out the Python interpreter's start.
"""
import argparse
import asyncio
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time

import boto3

BUCKET = "bench"
STREAM = "events"
HOUR = ("2026-11-18 13:00:00", "2026-11-18 14:00:00")
DAY = "2026-11-18"
KEY = "customer-4242"


def queries():
    t0, t1 = HOUR
    return [
        ("one hour by arrival time",
         "SELECT count(*) AS n, count(DISTINCT partition_key) AS keys FROM {t} "
         "WHERE approximate_arrival_timestamp >= {ts0} AND approximate_arrival_timestamp < {ts1}"),
        ("one day, count per hour",
         "SELECT hr, count(*) AS n FROM {t} WHERE dt = '%s' GROUP BY hr ORDER BY hr" % DAY),
        ("partition_key = …, all days",
         "SELECT count(*) AS n, sum(octet_length(data)) AS bytes FROM {t} "
         "WHERE partition_key = '%s'" % KEY),
    ], t0, t1


class Proxy:
    """TCP proxy: each request (a client chunk that starts with an HTTP method) waits `delay` s."""

    METHOD = re.compile(rb"^(GET|HEAD|PUT|POST|DELETE) (\S+)")

    def __init__(self, upstream, delay):
        self.upstream = upstream
        self.delay = delay
        self.lines = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = None
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def up():
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                m = self.METHOD.match(chunk)
                if m:
                    with self.lock:
                        self.lines.append((m.group(1).decode(), m.group(2).decode()))
                    await asyncio.sleep(self.delay)
                up_w.write(chunk)
                await up_w.drain()
            up_w.close()

        async def down():
            while True:
                chunk = await up_r.read(262144)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(up(), down())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            up_w.close()

    def take(self):
        with self.lock:
            lines, self.lines = self.lines, []
        return lines


def upload(endpoint, archive):
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=BUCKET)
    files = []
    for root, _, names in os.walk(archive):
        for n in names:
            if n.startswith(".complete"):
                continue
            path = os.path.join(root, n)
            files.append((path, os.path.relpath(path, archive)))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: s3.upload_file(f[0], BUCKET, f[1]), files))
    return sum(1 for _, k in files if k.endswith(".parquet") and "/_fluxcap/" not in k)


def run_fluxcap(args, proxy_port, sql):
    env = dict(os.environ, FLUXCAP_STREAMS=STREAM + ":json", FLUXCAP_LOG="error",
               FLUXCAP_ARCHIVE_LOCATION="s3://%s" % BUCKET,
               FLUXCAP_AWS_REGION="us-east-1",
               FLUXCAP_AWS_S3_ENDPOINT="http://127.0.0.1:%d" % proxy_port,
               AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    env.pop("FLUXCAP_CONFIG", None)
    t = time.perf_counter()
    p = subprocess.run([args.fluxcap, "sql", "--format", "json", sql], env=env,
                       capture_output=True, text=True, cwd=args.workdir)
    took = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit("fluxcap failed on %s:\n%s" % (sql, p.stderr))
    return took, [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


DUCKDB_CHILD = r"""
import json, sys, time
t = time.perf_counter()
import duckdb
port, ext, threads, sql = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
con = duckdb.connect(config={"autoinstall_known_extensions": False,
                             "autoload_known_extensions": False})
con.execute("SET enable_progress_bar = false")
con.execute("LOAD '%s'" % ext)
if threads != "0":
    con.execute("SET threads = %s" % threads)
con.execute("SET TimeZone = 'UTC'")
con.execute("CREATE SECRET (TYPE s3, KEY_ID 'test', SECRET 'test', REGION 'us-east-1', "
            "ENDPOINT '127.0.0.1:%s', URL_STYLE 'path', USE_SSL false)" % port)
rows = con.execute(sql).fetchall()
cols = [d[0] for d in con.description]
took = time.perf_counter() - t
print(json.dumps({"seconds": took, "rows": [dict(zip(cols, r)) for r in rows]}, default=str))
"""


def run_duckdb(args, proxy_port, sql):
    p = subprocess.run([args.duckdb_python, "-c", DUCKDB_CHILD, str(proxy_port), args.httpfs,
                        str(args.duckdb_threads), sql], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("DuckDB failed on %s:\n%s" % (sql, p.stderr))
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit("DuckDB printed no result on %s:\n%s" % (sql, p.stdout))
    out = json.loads(lines[-1])
    return out["seconds"], out["rows"]


def norm(rows):
    return sorted(json.dumps({k: (int(v) if isinstance(v, (int, float)) or
                                  (isinstance(v, str) and v.isdigit()) else v)
                              for k, v in r.items()}, sort_keys=True) for r in rows)


def describe(lines):
    data = sum(1 for m, p in lines if m == "GET" and p.split("?")[0].endswith(".parquet"))
    files = len({p.split("?")[0] for m, p in lines if m == "GET" and p.split("?")[0].endswith(".parquet")})
    return len(lines), data, files


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fluxcap", required=True)
    ap.add_argument("--archive", required=True, help="the local archive root (holds events/)")
    ap.add_argument("--s3-port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=25)
    ap.add_argument("--duckdb-python", required=True)
    ap.add_argument("--httpfs", required=True)
    ap.add_argument("--duckdb-threads", type=int, default=0, help="0: DuckDB's default")
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()

    t = time.perf_counter()
    files = upload("http://127.0.0.1:%d" % args.s3_port, args.archive)
    print("[bench-s3] uploaded %d data files to the S3 server in %.0f s"
          % (files, time.perf_counter() - t), file=sys.stderr)
    proxy = Proxy(args.s3_port, args.delay_ms / 1000.0)
    qs, t0, t1 = queries()
    print("archive: %d data files on the local S3 server (moto) behind a proxy adding %g ms per "
          "request; each engine a fresh process per query; %d cores" % (files, args.delay_ms,
                                                                         os.cpu_count() or 0))
    print("%-30s %9s %9s %7s | %10s %10s | %s" % ("query", "fluxcap s", "duckdb s", "ratio",
                                                  "fluxcap rq", "duckdb rq", "data GETs per file opened (fluxcap / duckdb)"))
    result = []
    for name, sql in qs:
        ours = sql.format(t="archive.events", ts0="TIMESTAMP '%s'" % t0, ts1="TIMESTAMP '%s'" % t1)
        theirs = sql.format(
            t="read_parquet('s3://%s/%s/*/*/*.parquet', hive_partitioning = true, "
              "hive_types = {'dt': VARCHAR, 'hr': VARCHAR})" % (BUCKET, STREAM),
            ts0="TIMESTAMPTZ '%s+00'" % t0, ts1="TIMESTAMPTZ '%s+00'" % t1)
        proxy.take()
        f_s, f_rows = run_fluxcap(args, proxy.port, ours)
        f_req, f_data, f_files = describe(proxy.take())
        d_s, d_rows = run_duckdb(args, proxy.port, theirs)
        d_req, d_data, d_files = describe(proxy.take())
        if norm(f_rows) != norm(d_rows):
            sys.exit("%s: the engines disagree:\nfluxcap %s\nDuckDB  %s" % (name, f_rows, d_rows))
        per = lambda d, f: "%.2f" % (d / f) if f else "-"
        print("%-30s %9.2f %9.2f %6.2fx | %10d %10d | %s (%d files) / %s (%d files)"
              % (name, f_s, d_s, f_s / d_s, f_req, d_req, per(f_data, f_files), f_files,
                 per(d_data, d_files), d_files))
        result.append({"query": name, "fluxcap_s": round(f_s, 3), "duckdb_s": round(d_s, 3),
                       "fluxcap_requests": f_req, "duckdb_requests": d_req,
                       "fluxcap_files": f_files, "fluxcap_data_gets": f_data})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
