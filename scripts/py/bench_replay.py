#!/usr/bin/env python3
"""Driver of scripts/bench-replay: `fluxcap replay --compact` to a JSON-lines file vs DuckDB
doing the same last-per-key query and writing the same JSON lines, on the same Parquet files.

Every run is a fresh process (fluxcap, or this script in --duckdb-job mode), started here and
measured by /usr/bin/time (or a small python wrapper): wall time and the process's own peak RSS.
fluxcap runs one thread per core, DuckDB as many threads (THREADS overrides); in the limited run
both get the same memory limit and spill to a directory on the same disk.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

MIB = 1024 * 1024


def duckdb_sql(glob, stream, out, replay_id="duckdb"):
    """The last record per partition key (records without a key are all kept, as fluxcap does),
    ordered by the replay position, written as fluxcap's JSON lines (same keys, same order)."""
    q = lambda s: "'%s'" % s.replace("'", "''")  # noqa: E731
    return (
        "COPY (SELECT {rid} AS replay_id, {stream} AS stream, shard_id, sequence_number, "
        "subsequence_number, partition_key, explicit_hash_key, "
        "strftime(ts::TIMESTAMP, '%Y-%m-%dT%H:%M:%S.%gZ') AS approximate_arrival_timestamp, "
        "decode(data) AS data "
        "FROM (SELECT shard_id, sequence_number, subsequence_number, partition_key, explicit_hash_key, "
        "approximate_arrival_timestamp AS ts, data "
        "FROM read_parquet({glob}, hive_partitioning = false) "
        "QUALIFY row_number() OVER (PARTITION BY partition_key ORDER BY approximate_arrival_timestamp DESC, "
        "shard_id DESC, length(sequence_number) DESC, sequence_number DESC, subsequence_number DESC) = 1 "
        "OR partition_key IS NULL) "
        "ORDER BY ts, shard_id, length(sequence_number), sequence_number, subsequence_number) "
        "TO {out} (FORMAT JSON)"
    ).format(rid=q(replay_id), stream=q(stream), glob=q(glob), out=q(out))


def duckdb_job(spec):
    """Child mode: run the DuckDB side once, print its own timing as JSON."""
    t0 = time.perf_counter()
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = %d" % spec["threads"])
    con.execute("SET TimeZone = 'UTC'")
    if spec.get("memory_limit_mib"):
        con.execute("SET memory_limit = '%dMiB'" % spec["memory_limit_mib"])
    con.execute("SET temp_directory = '%s'" % spec["temp_directory"].replace("'", "''"))
    t1 = time.perf_counter()
    con.execute(duckdb_sql(spec["glob"], spec["stream"], spec["out"]))
    t2 = time.perf_counter()
    print(json.dumps({"query_s": t2 - t1, "startup_s": t1 - t0, "duckdb": duckdb.__version__}))


# Fallback when /usr/bin/time is missing: a small fresh python runs the command and reports
# getrusage(RUSAGE_CHILDREN). Either way the measuring process is small: a child forked (or
# vforked) straight from this driver would inherit the driver's RSS high-water mark.
WRAP = ("import resource, subprocess, sys\n"
        "rc = subprocess.call(sys.argv[2:])\n"
        "open(sys.argv[1], 'w').write('0 %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(rc if rc >= 0 else 128 - rc)\n")


def measure(cmd, env, stdout, stderr, timeout, rfile):
    """Run cmd to completion; (returncode, wall seconds, peak RSS in MiB, timed_out)."""
    if os.path.exists(rfile):
        os.remove(rfile)
    if os.access("/usr/bin/time", os.X_OK):
        full = ["/usr/bin/time", "-f", "%e %M", "-o", rfile] + cmd
    else:
        full = [sys.executable, "-c", WRAP, rfile] + cmd
    t = time.perf_counter()
    p = subprocess.Popen(full, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    killed = []

    def kill():
        killed.append(True)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        rc = p.wait()
    finally:
        timer.cancel()
    wall = time.perf_counter() - t
    rss = None
    try:
        with open(rfile) as f:
            last = [line for line in f.read().splitlines() if line.strip()][-1]
        rss = int(last.split()[1]) / 1024.0
    except (OSError, IndexError, ValueError):
        pass
    return rc, wall, rss, bool(killed)


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return ""


def archive_stats(args, stream_dir, work):
    files = []
    for d, _, fs in os.walk(stream_dir):
        files += [os.path.join(d, f) for f in fs if f.endswith(".parquet")]
    disk = sum(os.path.getsize(f) for f in files)
    key = hashlib.sha256(("%s|%d|%d" % (os.path.abspath(stream_dir), len(files), disk)).encode()).hexdigest()[:16]
    cache = os.path.join(work, "stats-%s.json" % key)
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f), files
    import duckdb

    glob = os.path.join(stream_dir, "**", "*.parquet")
    con = duckdb.connect()
    rows, payload, keys = con.execute(
        "SELECT count(*), sum(octet_length(data)), count(DISTINCT partition_key) "
        "FROM read_parquet(?, hive_partitioning = false)", [glob]).fetchone()
    uncompressed = con.execute(
        "SELECT sum(total_uncompressed_size) FROM parquet_metadata(?)", [glob]).fetchone()[0]
    s = {"files": len(files), "parquet_bytes": disk, "rows": rows, "payload_bytes": int(payload or 0),
         "parquet_uncompressed_bytes": int(uncompressed or 0), "keys": keys}
    with open(cache, "w") as f:
        json.dump(s, f)
    return s, files


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ferrokinesis(script, work):
    port = free_port()
    log = open(os.path.join(work, "ferrokinesis.log"), "w")
    p = subprocess.Popen([script, str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if p.poll() is not None:
            sys.exit("ferrokinesis exited (%s):\n%s" % (p.returncode, tail(log.name)))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return p, port
        except OSError:
            time.sleep(0.2)
    p.kill()
    sys.exit("ferrokinesis did not listen on port %d within 60 s" % port)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def validate(ours_path, theirs_path):
    """Both outputs against each other: count, key set, then every field but replay_id in order."""
    ours, theirs = read_lines(ours_path), read_lines(theirs_path)
    v = {"lines_fluxcap": len(ours), "lines_duckdb": len(theirs)}
    k_ours = {(r.get("shard_id"), r.get("sequence_number")) for r in ours}
    k_theirs = {(r.get("shard_id"), r.get("sequence_number")) for r in theirs}
    v["only_fluxcap"] = len(k_ours - k_theirs)
    v["only_duckdb"] = len(k_theirs - k_ours)
    v["set_ok"] = len(ours) == len(theirs) and k_ours == k_theirs
    first_diff = None
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a = {k: x for k, x in a.items() if k != "replay_id"}
        b = {k: x for k, x in b.items() if k != "replay_id"}
        if list(a.items()) != list(b.items()):
            first_diff = {"line": i + 1, "fluxcap": a, "duckdb": b}
            for d in (first_diff["fluxcap"], first_diff["duckdb"]):
                if isinstance(d.get("data"), str) and len(d["data"]) > 120:
                    d["data"] = d["data"][:120] + "…"
            break
    v["lines_ok"] = v["set_ok"] and first_diff is None
    v["first_difference"] = first_diff
    v["ok"] = v["lines_ok"]
    return v


def run_fluxcap(args, cfg_path, out, limit_mib, work, label):
    spill = os.path.join(work, "spill-fluxcap")
    shutil.rmtree(spill, ignore_errors=True)
    os.makedirs(spill)
    if os.path.exists(out):
        os.remove(out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXCAP_") and not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_EC2_METADATA_DISABLED="true",
               TMPDIR=spill, FLUXCAP_LOG="fluxcap=info,warn,aws_config=error")
    cmd = [args.fluxcap, "--config", cfg_path, "replay", "--stream", args.stream, "--to", "file://" + out,
           "--compact", "--json"]
    if limit_mib:
        cmd[1:1] = ["--set", "query.memory_limit=%dMiB" % limit_mib]
    log = os.path.join(work, "fluxcap-%s.log" % label)
    summary_path = os.path.join(work, "fluxcap-%s.json" % label)
    with open(summary_path, "w") as so, open(log, "w") as se:
        rc, wall, rss, timed_out = measure(cmd, env, so, se, args.timeout,
                                           os.path.join(work, "rusage-fluxcap-%s" % label))
    r = {"cmd": cmd, "returncode": rc, "wall_s": wall, "rss_mib": rss, "timed_out": timed_out, "log": log}
    try:
        with open(summary_path) as f:
            s = json.load(f)
        r.update(id=s.get("id"), records=s.get("records"), internal_s=s.get("seconds"))
    except (OSError, ValueError):
        s = None
    r["ok"] = rc == 0 and s is not None and os.path.exists(out)
    if not r["ok"]:
        r["error"] = ("timed out after %d s" % args.timeout) if timed_out else tail(log)
    # The replay's manifest and progress live in the archive store; leave the shared archive as it was.
    rid = r.get("id")
    if not rid:
        m = re.search(r"\breplay (r-[0-9TZ]+-[0-9a-f]+)\b", tail(log, 1000))
        rid = m and m.group(1)
    if rid and re.fullmatch(r"r-[0-9TZ]+-[0-9a-f]+", rid):
        replays = os.path.join(args.archive, "_fluxcap", "replays")
        shutil.rmtree(os.path.join(replays, rid), ignore_errors=True)
        for d in (replays, os.path.dirname(replays)):  # only when empty
            try:
                os.rmdir(d)
            except OSError:
                break
    shutil.rmtree(spill, ignore_errors=True)
    return r


def run_duckdb(args, glob, out, limit_mib, threads, work, label):
    """DuckDB with the same threads; under a memory limit, when that runs out of memory, once more
    with 1 thread (what DuckDB's own error suggests), so that the limited run has a reference."""
    r = duckdb_once(args, glob, out, limit_mib, threads, work, label)
    if not r["ok"] and limit_mib and threads > 1 and "Out of Memory" in r.get("error", ""):
        print("[bench-replay] %s: DuckDB ran out of memory with %d threads; again with 1 thread…"
              % (label, threads), file=sys.stderr, flush=True)
        first = r
        r = duckdb_once(args, glob, out, limit_mib, 1, work, label + "-1thread")
        r["first_attempt"] = first
    return r


def duckdb_once(args, glob, out, limit_mib, threads, work, label):
    tmp = os.path.join(work, "spill-duckdb")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if os.path.exists(out):
        os.remove(out)
    spec = {"glob": glob, "stream": args.stream, "out": out, "threads": threads,
            "memory_limit_mib": limit_mib, "temp_directory": tmp}
    cmd = [sys.executable, os.path.abspath(__file__), "--duckdb-job", json.dumps(spec)]
    log = os.path.join(work, "duckdb-%s.log" % label)
    res = os.path.join(work, "duckdb-%s.json" % label)
    with open(res, "w") as so, open(log, "w") as se:
        rc, wall, rss, timed_out = measure(cmd, dict(os.environ), so, se, args.timeout,
                                           os.path.join(work, "rusage-duckdb-%s" % label))
    r = {"threads": threads, "returncode": rc, "wall_s": wall, "rss_mib": rss, "timed_out": timed_out,
         "log": log}
    try:
        with open(res) as f:
            s = json.load(f)
        r.update(internal_s=s["query_s"], version=s["duckdb"])
    except (OSError, ValueError, KeyError):
        s = None
    r["ok"] = rc == 0 and s is not None and os.path.exists(out)
    if not r["ok"]:
        r["error"] = ("timed out after %d s" % args.timeout) if timed_out else tail(log)
    shutil.rmtree(tmp, ignore_errors=True)
    return r


def best(attempts):
    """The fastest successful attempt (its peak RSS with it), else the last one."""
    ok = [a for a in attempts if a["ok"]]
    return min(ok, key=lambda a: a["wall_s"]) if ok else attempts[-1]


def fmt(x, spec):
    return (spec % x) if isinstance(x, (int, float)) else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duckdb-job")
    ap.add_argument("--fluxcap")
    ap.add_argument("--archive")
    ap.add_argument("--stream", default="events")
    ap.add_argument("--work")
    ap.add_argument("--ferrokinesis")
    ap.add_argument("--memory-limit-mib", type=int, default=int(os.environ.get("MEMORY_LIMIT_MIB") or 0))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("THREADS") or 0))
    ap.add_argument("--runs", type=int, default=max(1, int(os.environ.get("RUNS") or 1)))
    ap.add_argument("--timeout", type=int, default=int(os.environ.get("RUN_TIMEOUT") or 1800))
    args = ap.parse_args()
    if args.duckdb_job:
        return duckdb_job(json.loads(args.duckdb_job))
    for a in ("fluxcap", "archive", "work", "ferrokinesis"):
        if not getattr(args, a):
            ap.error("--%s is required" % a)
    args.archive = os.path.abspath(args.archive)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    stream_dir = os.path.join(args.archive, args.stream)
    glob = os.path.join(stream_dir, "**", "*.parquet")
    threads = args.threads or os.cpu_count() or 2

    stats, files = archive_stats(args, stream_dir, work)
    auto_limit = max(1, min(stats["parquet_bytes"] // 4, 256 * MIB) // MIB)
    limit = args.memory_limit_mib or auto_limit
    version = subprocess.run([args.fluxcap, "--version"], capture_output=True, text=True).stdout.strip()
    import duckdb

    print("archive: %s — %d records, %d keys, %d Parquet files" % (args.archive, stats["rows"], stats["keys"], stats["files"]))
    print("  on disk (zstd Parquet): %.1f MiB; payload uncompressed: %.1f MiB; Parquet uncompressed: %.1f MiB"
          % (stats["parquet_bytes"] / MIB, stats["payload_bytes"] / MIB, stats["parquet_uncompressed_bytes"] / MIB))
    print("memory limit of the limited run: %d MiB (%.2f× the Parquet files, %.3f× the payload)"
          % (limit, limit * MIB / max(1, stats["parquet_bytes"]), limit * MIB / max(1, stats["payload_bytes"])))
    print("%s (one thread per core: %d), DuckDB %s with %d threads; one fresh process per run, %s;"
          " files read once beforehand (page cache warm)"
          % (version, os.cpu_count() or 0, duckdb.__version__, threads,
             "best of %d" % args.runs if args.runs > 1 else "1 run each"))

    for f in files:  # the same warm page cache for both engines
        with open(f, "rb") as fh:
            while fh.read(1 << 22):
                pass

    kin, port = start_ferrokinesis(args.ferrokinesis, work)
    runs = []
    try:
        cfg_path = os.path.join(work, "fluxcap.toml")
        with open(cfg_path, "w") as f:
            f.write('[aws]\nregion = "us-east-1"\nkinesis_endpoint = "http://127.0.0.1:%d"\n\n'
                    '[archive]\nlocation = %s\n\n[archiver]\nmetrics_bind = ""\n\n'
                    '[[streams]]\nname = %s\nformat = "json"\n'
                    % (port, json.dumps(args.archive), json.dumps(args.stream)))
        for label, lim in (("unlimited", None), ("limited", limit)):
            ours_out = os.path.join(work, "fluxcap-%s.jsonl" % label)
            theirs_out = os.path.join(work, "duckdb-%s.jsonl" % label)
            fxs, dks, checks = [], [], []
            dk_threads = threads
            for i in range(args.runs):
                n = " (%d/%d)" % (i + 1, args.runs) if args.runs > 1 else ""
                print("[bench-replay] %s%s: fluxcap…" % (label, n), file=sys.stderr, flush=True)
                fx = run_fluxcap(args, cfg_path, ours_out, lim, work, label)
                print("[bench-replay] %s%s: DuckDB…" % (label, n), file=sys.stderr, flush=True)
                dk = run_duckdb(args, glob, theirs_out, lim, dk_threads, work, label)
                if dk["ok"]:
                    dk_threads = dk["threads"]  # after an out-of-memory retry, keep the thread count that worked
                if fx["ok"] and dk["ok"]:
                    checks.append(validate(ours_out, theirs_out))
                fxs.append(fx)
                dks.append(dk)
            fx = best(fxs)
            dk = best(dks)
            run = {"run": label, "memory_limit_mib": lim, "fluxcap": fx, "duckdb": dk,
                   "fluxcap_attempts": fxs, "duckdb_attempts": dks}
            if checks:
                bad = [c for c in checks if not c["ok"]]
                run["validation"] = bad[0] if bad else checks[-1]
            if fx["ok"] and dk["ok"]:
                run["ratio"] = fx["wall_s"] / dk["wall_s"]
                if fx["rss_mib"] and dk["rss_mib"]:
                    run["rss_ratio"] = fx["rss_mib"] / dk["rss_mib"]
            runs.append(run)
    finally:
        kin.terminate()
        try:
            kin.wait(10)
        except subprocess.TimeoutExpired:
            kin.kill()

    print()
    print("%-22s %10s %10s %8s %14s %14s %8s  %s" % ("run", "fluxcap s", "duckdb s", "ratio", "fluxcap RSS MiB",
                                                    "duckdb RSS MiB", "lines", "check"))
    failed = False
    for r in runs:
        fx, dk, v = r["fluxcap"], r["duckdb"], r.get("validation")
        name = "no memory limit" if r["memory_limit_mib"] is None else "limit %d MiB" % r["memory_limit_mib"]
        if v is None:
            check = "n/a (%s failed)" % ("fluxcap" if not fx["ok"] else "DuckDB")
        elif v["ok"]:
            check = "OK"
        else:
            check = "MISMATCH"
        failed |= (not fx["ok"]) or (v is not None and not v["ok"])
        print("%-22s %10s %10s %8s %14s %14s %8s  %s" % (
            name,
            fmt(fx["wall_s"], "%.2f") if fx["ok"] else "FAILED",
            (fmt(dk["wall_s"], "%.2f") + ("*" if dk.get("threads") != threads else "")) if dk["ok"] else "FAILED",
            fmt(r.get("ratio"), "%.2fx"),
            fmt(fx["rss_mib"], "%.0f"), fmt(dk["rss_mib"], "%.0f"),
            fmt(v and v["lines_fluxcap"], "%d"), check))
    for r in runs:
        f = next((a["first_attempt"] for a in r["duckdb_attempts"] if "first_attempt" in a), None)
        if f:
            print("* %s: DuckDB with %d threads ran out of memory after %.1f s (peak RSS %s MiB); with 1 thread it %s"
                  % (r["run"], f["threads"], f["wall_s"], fmt(f["rss_mib"], "%.0f"),
                     "succeeded (the figures shown)" if r["duckdb"]["ok"] else "failed too"))
    for r in runs:
        for side in ("fluxcap", "duckdb"):
            if not r[side]["ok"]:
                print("\n%s, %s: exit %s\n%s" % (r["run"], side, r[side]["returncode"], r[side].get("error", "")))
        v = r.get("validation")
        if v and not v["ok"]:
            print("\n%s: %d vs %d lines; %d keys only in fluxcap's output, %d only in DuckDB's" % (
                r["run"], v["lines_fluxcap"], v["lines_duckdb"], v["only_fluxcap"], v["only_duckdb"]))
            if v["first_difference"]:
                print("first differing line (replay_id ignored): %s" % json.dumps(v["first_difference"]))
    print("\nwall time of the whole process (fluxcap: config, Kinesis lookup, query, file; DuckDB: python + "
          "import + query + file); fluxcap's own figure and DuckDB's query alone:")
    for r in runs:
        print("  %-20s fluxcap %s s, DuckDB %s s" % (r["run"], fmt(r["fluxcap"].get("internal_s"), "%.2f"),
                                                   fmt(r["duckdb"].get("internal_s"), "%.2f")))
    ratios = [r["ratio"] for r in runs if "ratio" in r]
    lim_run = runs[-1]
    below = limit * MIB < stats["parquet_bytes"]
    print("target: ratio <= 1.0 — %s; success with a memory limit smaller than the data — %s" % (
        ("met (worst %.3fx)" if max(ratios) <= 1.0 else "not met (worst %.3fx)") % max(ratios) if ratios else "n/a",
        ("met" if lim_run["fluxcap"]["ok"] and below else
         "not met" if below else "n/a (the limit is not below this small archive)")))

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "fluxcap": version, "fluxcap_bin": args.fluxcap, "duckdb": duckdb.__version__, "threads": threads,
        "archive": dict(stats, path=args.archive, stream=args.stream),
        "memory_limit_mib": limit, "runs": runs,
        "ok": not failed,
    }
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("results: %s" % os.path.join(work, "results.json"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
