#!/usr/bin/env python3
"""Helper of scripts/bench-workers: how fast N shared archivers (`fluxcap archive --shared`)
together catch up a backlog, against one archiver on the same stream, in one run.

Usage:
  bench_workers.py --shards N --records N --bin FLUXCAP --workers "1 2"
                   --work DIR [--budget 256MiB] [--timeout SECONDS] [--fill-threads 2]

Starts ferrokinesis (scripts/ferrokinesis, 127.0.0.1, a free port), fills one stream with order
events (scripts/py/bench_archive.py's generator), then for each
worker count W: a fresh local archive directory, W `fluxcap archive --shared` processes started
together, the time until the archive's checkpoints hold every record (polled every 100 ms),
(flushes at 1 s of age, so that the time is the reading and
encoding, not the flush policy's wait), then SIGTERM to all of them (each must exit 0). Per W it prints the wall time to catch up,
records/s and MB/s together and per worker, each worker's CPU seconds and the shards each one
ended up holding, and the speed-up against W = 1 (`ratio W/1`). Every archive is checked with
DuckDB (every record exactly once) before anything is printed.
Exits 1 when a step fails or an archive is wrong.
"""
import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_archive as ba  # noqa: E402  (fill, verify, child_env, toml_str)


def log(msg):
    sys.stderr.write(f"[bench-workers] {msg}\n")
    sys.stderr.flush()


def die(msg):
    log(f"ERROR: {msg}")
    sys.exit(1)


def archived(archive, stream):
    """Records the archive's checkpoints hold: the latest generation of every shard."""
    return sum(body.get("records", 0) for body in latest_objects(archive, stream, "checkpoints"))


def latest_objects(archive, stream, kind):
    """The latest JSON object (highest name) in each directory of `<stream>/_fluxcap/<kind>/`;
    one being replaced right now is left out (read again at the next poll)."""
    for d in glob.glob(os.path.join(archive, stream, "_fluxcap", kind, "*")):
        names = sorted(f for f in os.listdir(d) if f.endswith(".json"))
        if names:
            try:
                with open(os.path.join(d, names[-1])) as fh:
                    yield json.load(fh)
            except (OSError, ValueError):
                pass


def holders(archive, stream):
    """Archiver id -> shards it holds now (its latest claim per shard)."""
    out = {}
    for body in latest_objects(archive, stream, "owners"):
        holder = body.get("holder", "?")
        if holder not in ("free", "done"):
            out[holder] = out.get(holder, 0) + 1
    return out


def start_ferrokinesis(work):
    """scripts/ferrokinesis on a free loopback port; returns (process, endpoint)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    lp = os.path.join(work, "ferrokinesis.log")
    env = dict(os.environ, SHARD_LIMIT="1000")
    proc = subprocess.Popen([os.path.join(HERE, "..", "ferrokinesis"), str(port)], env=env,
                            stdout=open(lp, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while f"listening on 127.0.0.1:{port}" not in open(lp, errors="replace").read():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            die(f"ferrokinesis did not start: {open(lp, errors='replace').read()[-2000:]}")
        time.sleep(0.1)
    log(f"ferrokinesis (pid {proc.pid}) on http://127.0.0.1:{port}")
    return proc, f"http://127.0.0.1:{port}"


def run_workers(a, stream, w, env, payload):
    work = os.path.join(a.work, f"workers-{w}")
    arch = os.path.join(work, "archive")
    os.makedirs(arch, exist_ok=True)
    cfg = os.path.join(work, "fluxcap.toml")
    with open(cfg, "w") as fh:
        fh.write(f"""[aws]
region = "us-east-1"
kinesis_endpoint = {ba.toml_str(a.endpoint)}

[archive]
location = {ba.toml_str(arch)}

[archive.flush]
memory_budget = {ba.toml_str(a.budget)}
max_age = "1s"

[archiver]
shared = true
lease_ttl = "4s"
metrics_bind = ""

[[streams]]
name = {ba.toml_str(stream)}
format = "json"
""")
    procs, logs = [], []
    t0 = time.monotonic()
    for i in range(w):
        lp = os.path.join(work, f"worker-{i}.log")
        logs.append(lp)
        lf = open(lp, "wb")
        procs.append(subprocess.Popen([a.bin, "--config", cfg, "archive", "--shared"], stdout=lf,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
    deadline = t0 + a.timeout
    peak_holders = {}
    while True:
        n = archived(arch, stream)
        h = holders(arch, stream)
        if len(h) >= len(peak_holders):
            peak_holders = h
        if n >= a.records:
            break
        for p, lp in zip(procs, logs):
            if p.poll() is not None:
                tail = open(lp, errors="replace").read()[-4000:]
                die(f"a worker exited early with code {p.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            die(f"{w} workers: only {n} of {a.records} records archived after {a.timeout:.0f} s")
        time.sleep(0.1)
    wall = time.monotonic() - t0
    if n != a.records:
        die(f"{w} workers: the checkpoints count {n} records, {a.records} were put")
    for p in procs:
        p.send_signal(signal.SIGTERM)
    cpu = []
    for p, lp in zip(procs, logs):
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except ChildProcessError:
            die("lost a worker process")
        rc = os.waitstatus_to_exitcode(status)
        p.returncode = rc
        if rc != 0:
            tail = open(lp, errors="replace").read()[-4000:]
            die(f"a worker exited with code {rc} after SIGTERM:\n{tail}")
        cpu.append(ru.ru_utime + ru.ru_stime)
    ba.verify(f"{w} workers", os.path.join(arch, stream, "dt=*", "hr=*", "*.parquet"), a.records, payload)
    return {"workers": w, "wall_s": wall, "cpu_s": cpu, "holders": sorted(peak_holders.values(), reverse=True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--workers", default="1 2")
    ap.add_argument("--work", required=True)
    ap.add_argument("--budget", default="256MiB")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--fill-threads", type=int, default=2)
    a = ap.parse_args()
    counts = [int(x) for x in a.workers.split()]
    if not counts or any(c < 1 for c in counts):
        die(f"--workers must list positive integers, got '{a.workers}'")
    stream = f"bench-workers-{a.shards}"
    env = ba.child_env()
    os.makedirs(a.work, exist_ok=True)
    emulator, a.endpoint = start_ferrokinesis(a.work)
    try:
        filled = ba.fill(a.endpoint, stream, a.shards, a.records, a.fill_threads)
        payload = filled["payload_bytes"]
        results = [run_workers(a, stream, w, env, payload) for w in counts]
    finally:
        emulator.kill()
        emulator.wait()
    base = next((r for r in results if r["workers"] == 1), results[0])
    mb = payload / 1e6
    print(f"\n{a.records} records ({mb:.1f} MB of payload), {a.shards} shards, one local archive "
          f"directory per run, memory budget {a.budget} per worker")
    print(f"{'workers':>7} {'wall s':>7} {'rec/s':>8} {'MB/s':>6} {'MB/s/worker':>11} "
          f"{'CPU s per worker':>24} {'shards held':>16} {'speed-up':>8}")
    for r in results:
        rate = a.records / r["wall_s"]
        cpus = " ".join(f"{c:.1f}" for c in r["cpu_s"])
        held = "/".join(str(x) for x in r["holders"]) or "-"
        print(f"{r['workers']:>7} {r['wall_s']:>7.1f} {rate:>8.0f} {mb / r['wall_s']:>6.1f} "
              f"{mb / r['wall_s'] / r['workers']:>11.1f} {cpus:>24} {held:>16} "
              f"{base['wall_s'] / r['wall_s']:>7.2f}x")
    for r in results:
        if r is not base:
            print(f"ratio {r['workers']}/{base['workers']} workers, catch-up throughput: "
                  f"{base['wall_s'] / r['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
