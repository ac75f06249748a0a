#!/usr/bin/env python3
"""Helper of scripts/bench-archive: one benchmark case per shard count, and the report.

Usage:
  bench_archive.py case --endpoint URL --shards N --records N --bin FLUXCAP --budget 256MiB
                        --work DIR --timeout SECONDS --result FILE.json [--fill-threads 2]
      fill a new stream (N shards) with order events, run `fluxcap archive --once`
      and peer_archiver.py on it (each measured as a child process: wall, user+sys
      CPU, max RSS), check both archives with DuckDB, write the figures to FILE.json.
  bench_archive.py report FILE.json...
      print one table per case, the CPU/GB ratio and fluxcap's peak RSS vs budget, then one
      table of peak RSS (fluxcap and peer) against the budget over all cases.
  bench_archive.py exec-measure --json OUT --timeout SECONDS -- CMD...
      (internal) run CMD as a forked child of this small process and write its wall time,
      user/sys CPU and max RSS (os.wait4) to OUT.

Exits 1 (loudly, on stderr) when a step fails or an archive does not hold every record once.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[bench-archive] {msg}", file=sys.stderr, flush=True)


def die(msg):
    print(f"[bench-archive] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def parse_size(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", s)
    if not m:
        die(f"bad size {s!r} (expected e.g. 256MiB, 1GB, 4096)")
    mult = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
            "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
    return int(float(m.group(1)) * mult)


def child_env():
    """The parent's environment without FLUXCAP_*/AWS_* settings (they would override the
    benchmark's configuration), plus dummy credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and not (k.startswith("FLUXCAP_") and k != "FLUXCAP_LOG")}
    env.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_EC2_METADATA_DISABLED="true",
               AWS_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


# ---------------------------------------------------------------- fill

def make_events(n, seed):
    """Realistic JSON order events, ~350 bytes each (bench_encode.py's generator plus a channel and a session id)."""
    rnd = random.Random(seed)
    types = ["created", "paid", "shipped", "cancelled"]
    countries = ["DE", "FR", "US", "BR", "JP", "IN", "NG", "GB"]
    channels = ["web", "ios", "android", "pos"]
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    now = time.time()
    out = []
    for j in range(n):
        cust = f"customer-{rnd.randrange(5000):05d}"
        ev = {
            "event_id": f"e-{j:09d}", "type": rnd.choice(types), "order_id": f"o-{rnd.randrange(10**7):07d}",
            "customer_id": cust, "country": rnd.choice(countries), "amount": round(rnd.uniform(3, 400), 2),
            "currency": "EUR",
            "items": [{"sku": f"sku-{rnd.randrange(10000):05d}", "qty": rnd.randint(1, 4)} for _ in range(rnd.randint(1, 3))],
            "note": " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))),
            "channel": rnd.choice(channels), "session_id": f"{rnd.getrandbits(64):016x}",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + j * 0.003)),
        }
        # partition key: random customer → MD5 spreads the keys over every shard
        out.append({"PartitionKey": cust, "Data": json.dumps(ev, separators=(",", ":")).encode()})
    return out


def kinesis_client(endpoint):
    import boto3
    from botocore.config import Config
    return boto3.session.Session().client(
        "kinesis", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=10, read_timeout=60))


def fill(endpoint, stream, shards, n, threads):
    k = kinesis_client(endpoint)
    k.create_stream(StreamName=stream, ShardCount=shards)
    deadline = time.monotonic() + 60
    while k.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        if time.monotonic() > deadline:
            die(f"stream {stream} not ACTIVE after 60 s")
        time.sleep(0.1)
    t0 = time.monotonic()
    records = make_events(n, seed=7 + shards)
    payload = sum(len(r["Data"]) for r in records)
    log(f"generated {n} events, {payload / n:.0f} bytes each on average, in {time.monotonic() - t0:.1f} s")
    batches = [records[i:i + 500] for i in range(0, n, 500)]
    local = threading.local()

    def put(batch):
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = kinesis_client(endpoint)
        for attempt in range(50):
            r = c.put_records(StreamName=stream, Records=batch)
            if r.get("FailedRecordCount", 0) == 0:
                return
            # retry the failed entries only (order within a batch is kept: all keys random)
            batch = [b for b, res in zip(batch, r["Records"]) if "ErrorCode" in res]
            time.sleep(min(0.05 * 2 ** attempt, 2))
        raise RuntimeError(f"put_records still failing after 50 attempts ({len(batch)} records)")

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as ex:
        for _ in ex.map(put, batches):
            pass
    dt = time.monotonic() - t0
    log(f"put {n} records ({payload / 1e6:.1f} MB) into {stream} ({shards} shards) in {dt:.1f} s "
        f"({n / dt:.0f} rec/s, {threads} threads)")
    return {"records": n, "payload_bytes": payload, "put_seconds": dt}


# ---------------------------------------------------------------- measure

def measure(cmd, log_path, timeout, env):
    """Run cmd as a measured child; return its wall time, user+sys CPU and max RSS.

    The measuring is done by `exec-measure` in a fresh, small interpreter that fork()s the
    command: on Linux a child's ru_maxrss starts from the RSS of the process image it was
    exec'ed from, so a command spawned directly from this (large) process would inherit our
    RSS as its peak. The floor is now the small wrapper's RSS (~10 MiB)."""
    res_path = log_path + ".rusage.json"
    with open(log_path, "wb") as lf:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "exec-measure", "--json", res_path,
                            "--timeout", str(timeout), "--", *cmd],
                           stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if p.returncode != 0 or not os.path.exists(res_path):
        die(f"measuring wrapper failed (exit code {p.returncode}); see {log_path}")
    with open(res_path) as fh:
        return json.load(fh)


def exec_measure(a):
    """fork + exec the command, wait4 for it (killing it after the timeout), write the figures."""
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        die("exec-measure: no command given")
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    deadline, timed_out = t0 + a.timeout, False
    while True:
        wpid, status, ru = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            break
        now = time.monotonic()
        if now > deadline:
            if not timed_out:
                timed_out = True
                log(f"TIMEOUT after {a.timeout:.0f} s: sending SIGTERM to {cmd[0]} (pid {pid})")
                os.kill(pid, signal.SIGTERM)
                deadline = now + 10
            else:
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
        time.sleep(0.01)
    wall = time.monotonic() - t0
    res = {
        "rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out, "wall_s": wall,
        "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "cpu_s": ru.ru_utime + ru.ru_stime,
        "maxrss_bytes": ru.ru_maxrss * 1024,  # Linux: KiB
    }
    with open(a.json, "w") as fh:
        json.dump(res, fh)


# ---------------------------------------------------------------- verify

def verify(label, glob, n, payload):
    import duckdb
    con = duckdb.connect()
    g = glob.replace("'", "''")
    try:
        rows, keys, data, shards, files = con.execute(f"""
            SELECT count(*),
                   count(DISTINCT (shard_id, sequence_number, subsequence_number)),
                   sum(octet_length(data)),
                   count(DISTINCT shard_id),
                   count(DISTINCT filename)
            FROM read_parquet('{g}', hive_partitioning = false, filename = true)""").fetchone()
    except duckdb.Error as e:
        die(f"{label}: cannot read its archive {glob}: {e}")
    problems = []
    if rows != n:
        problems.append(f"{rows} rows, expected {n}")
    if keys != rows:
        problems.append(f"{rows - keys} duplicate (shard_id, sequence_number, subsequence_number)")
    if data != payload:
        problems.append(f"{data} payload bytes, expected {payload}")
    if problems:
        die(f"{label}: archive {glob} is wrong: " + "; ".join(problems))
    log(f"{label}: archive checked with DuckDB: {rows} rows, all distinct, {data} payload bytes, "
        f"{shards} shards, {files} files")
    return {"rows": rows, "shards_with_data": shards, "files": files}


# ---------------------------------------------------------------- case

def toml_str(s):
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def case(a):
    os.makedirs(a.work, exist_ok=True)
    stream = f"bench-{a.shards}"
    budget = parse_size(a.budget)
    f = fill(a.endpoint, stream, a.shards, a.records, a.fill_threads)
    env = child_env()

    # ---- fluxcap
    arch = os.path.join(a.work, "archive")
    cfg = os.path.join(a.work, "fluxcap.toml")
    with open(cfg, "w") as fh:
        fh.write(f"""[aws]
region = "us-east-1"
kinesis_endpoint = {toml_str(a.endpoint)}

[archive]
location = {toml_str(arch)}

[archive.flush]
memory_budget = {toml_str(a.budget)}

[archiver]
metrics_bind = ""

[[streams]]
name = {toml_str(stream)}
format = "json"
""")
    flog = os.path.join(a.work, "fluxcap.log")
    log(f"fluxcap archive --once ({a.bin})")
    fm = measure([a.bin, "--config", cfg, "archive", "--once"], flog, a.timeout, env)
    ftext = open(flog, errors="replace").read()
    if fm["rc"] != 0:
        sys.stderr.write(f"----- fluxcap output (exit code {fm['rc']}) -----\n{ftext[-8000:]}\n-----\n")
        die(f"fluxcap archive --once failed with exit code {fm['rc']}" + (" (timed out)" if fm["timed_out"] else ""))
    m = re.search(r"^archived (\d+) records", ftext, re.M)  # the summary line, not progress lines
    if not m or int(m.group(1)) != a.records:
        sys.stderr.write(f"----- fluxcap output -----\n{ftext[-8000:]}\n-----\n")
        die(f"fluxcap did not report 'archived {a.records} records'"
            + (f" (it reported {m.group(1)})" if m else ""))
    log("fluxcap: " + ftext.strip().splitlines()[-1] + f" — {fm['wall_s']:.1f} s wall, {fm['cpu_s']:.1f} s CPU")

    # ---- peer
    peer_out = os.path.join(a.work, "peer")
    plog = os.path.join(a.work, "peer.log")
    log("peer: boto3 + pyarrow (scripts/py/peer_archiver.py)")
    pm = measure([sys.executable, os.path.join(HERE, "peer_archiver.py"), "--endpoint", a.endpoint,
                  "--stream", stream, "--out", peer_out], plog, a.timeout, env)
    ptext = open(plog, errors="replace").read()
    if pm["rc"] != 0:
        sys.stderr.write(f"----- peer output (exit code {pm['rc']}) -----\n{ptext[-8000:]}\n-----\n")
        die(f"peer_archiver.py failed with exit code {pm['rc']}" + (" (timed out)" if pm["timed_out"] else ""))
    log("peer: " + ptext.strip().splitlines()[-1] + f" — {pm['wall_s']:.1f} s wall, {pm['cpu_s']:.1f} s CPU")

    # ---- check both archives
    fv = verify("fluxcap", os.path.join(arch, stream, "dt=*", "hr=*", "*.parquet"), a.records, f["payload_bytes"])
    pv = verify("peer", os.path.join(peer_out, "dt=*", "hr=*", "*.parquet"), a.records, f["payload_bytes"])
    if fv["shards_with_data"] != a.shards:
        log(f"note: only {fv['shards_with_data']} of {a.shards} shards received records")

    res = {"shards": a.shards, "stream": stream, "budget": a.budget, "budget_bytes": budget,
           "emulator": a.emulator,
           "binary": a.bin, "fill": f, "fluxcap": {**fm, **fv}, "peer": {**pm, **pv}}
    with open(a.result, "w") as fh:
        json.dump(res, fh, indent=1)


# ---------------------------------------------------------------- report

# Peak RSS target: the budget plus a small constant (issue 14).
RSS_SLACK_MIB = 48


def report(paths):
    rows = []
    for path in paths:
        r = json.load(open(path))
        n, b = r["fill"]["records"], r["fill"]["payload_bytes"]
        print()
        print(f"== {r['shards']} shards: {n} records, {b / 1e6:.1f} MB of JSON payload "
              f"(~{b / n:.0f} B each), {r.get('emulator', 'kinesalite')}, memory_budget {r['budget']} ==")
        hdr = f"{'archiver':<22}{'records':>9}{'payload MB':>12}{'wall s':>9}{'records/s':>11}{'MB/s':>8}" \
              f"{'CPU s':>8}{'CPU s/GB':>10}{'peak RSS MiB':>14}"
        print(hdr)
        print("-" * len(hdr))
        per_gb = {}
        for name, label in (("fluxcap", "fluxcap"), ("peer", "peer boto3+pyarrow")):
            m = r[name]
            per_gb[name] = m["cpu_s"] / (b / 1e9)
            print(f"{label:<22}{m['rows']:>9}{b / 1e6:>12.1f}{m['wall_s']:>9.2f}{n / m['wall_s']:>11.0f}"
                  f"{b / 1e6 / m['wall_s']:>8.2f}{m['cpu_s']:>8.2f}{per_gb[name]:>10.1f}"
                  f"{m['maxrss_bytes'] / 2**20:>14.1f}")
        ratio = per_gb["fluxcap"] / per_gb["peer"]
        print(f"ratio CPU/GB fluxcap/peer: {ratio:.2f}x (target <= 0.33) {'ok' if ratio <= 1 / 3 else 'MISSED'}")
        rss = r["fluxcap"]["maxrss_bytes"] / 2**20
        bud = r["budget_bytes"] / 2**20
        ok = rss <= bud + RSS_SLACK_MIB
        print(f"fluxcap peak RSS: {rss:.0f} MiB (budget {bud:.0f} MiB; "
              f"{'within budget' if rss <= bud else f'{rss - bud:.0f} MiB over budget'}; "
              f"target <= budget + {RSS_SLACK_MIB} MiB: {'ok' if ok else 'MISSED'})")
        print(f"fluxcap binary: {r['binary']}")
        rows.append((r["shards"], bud, rss, r["peer"]["maxrss_bytes"] / 2**20, ok))
    print()
    print(f"== peak RSS against the memory budget (target: budget + {RSS_SLACK_MIB} MiB) ==")
    hdr = f"{'shards':>7}{'budget MiB':>12}{'target MiB':>12}{'fluxcap MiB':>13}{'peer MiB':>10}  target"
    print(hdr)
    print("-" * len(hdr))
    for shards, bud, rss, peer, ok in rows:
        print(f"{shards:>7}{bud:>12.0f}{bud + RSS_SLACK_MIB:>12.0f}{rss:>13.0f}{peer:>10.0f}  "
              f"{'met' if ok else 'MISSED'}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("case")
    c.add_argument("--endpoint", required=True)
    c.add_argument("--shards", type=int, required=True)
    c.add_argument("--records", type=int, required=True)
    c.add_argument("--bin", required=True)
    c.add_argument("--budget", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--timeout", type=float, default=1800)
    c.add_argument("--result", required=True)
    c.add_argument("--fill-threads", type=int, default=2)
    c.add_argument("--emulator", default="kinesalite")
    r = sub.add_parser("report")
    r.add_argument("results", nargs="+")
    m = sub.add_parser("exec-measure")
    m.add_argument("--json", required=True)
    m.add_argument("--timeout", type=float, required=True)
    m.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.cmd == "case":
        case(a)
    elif a.cmd == "exec-measure":
        exec_measure(a)
    else:
        report(a.results)


if __name__ == "__main__":
    main()
