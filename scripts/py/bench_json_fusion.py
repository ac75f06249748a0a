#!/usr/bin/env python3
"""Driver of scripts/bench-json-fusion: JSON queries with several getters on the same payload, timed
with `fluxcap sql` with the fusion rule (one parse per row) and without it (FLUXCAP_JSON_FUSION=off,
one parse per getter), on the same files. Checks both give the same rows; prints the best of RUNS
runs after a warm-up, per query and setting (the settings alternate): fluxcap's own time (planning,
execution, output) and the process's CPU time (user + system; steadier than elapsed time on a shared
machine), and the unfused/fused ratios.
"""
import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile

QUERIES = [
    ("filtered count, 2 JSON predicates",
     "SELECT count(*) AS n FROM archive.events WHERE json_get_str(data, 'country') = 'DE' "
     "AND json_get_float(data, 'amount') > 500"),
    ("group by JSON, 2 JSON predicates",
     "SELECT json_get_str(data, 'type') AS type, count(*) AS n FROM archive.events "
     "WHERE json_get_int(data, 'items', 0, 'qty') > 3 AND json_get_str(data, 'country') = 'DE' GROUP BY 1"),
    ("group by 2 JSON fields, 2 JSON sums",
     "SELECT json_get_str(data, 'country') AS country, json_get_str(data, 'device') AS device, count(*) AS n, "
     "sum(json_get_float(data, 'amount')) AS amount, sum(json_get_int(data, 'items', 0, 'qty')) AS qty "
     "FROM archive.events GROUP BY 1, 2"),
]
RUNS = 3


def run(args, sql, fused, out):
    env = dict(os.environ, FLUXCAP_STREAMS=args.stream, FLUXCAP_LOG="error",
               FLUXCAP_JSON_FUSION="on" if fused else "off")
    env.pop("FLUXCAP_CONFIG", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([args.fluxcap, "--archive", args.archive, "sql", "--format", "json", "-o", out, sql],
                       env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if p.returncode != 0:
        sys.exit("fluxcap failed on %s:\n%s" % (sql, p.stderr))
    m = re.search(r"(\d+) rows? in ([0-9.]+) s", p.stderr)
    if not m:
        sys.exit("no timing line from fluxcap: %s" % p.stderr)
    return float(m.group(2)), cpu


def rows(path):
    """The rows of a result file, sorted by their values other than floats."""
    with open(path) as f:
        rs = [json.loads(line) for line in f if line.strip()]
    return sorted(rs, key=lambda r: json.dumps({k: v for k, v in r.items() if not isinstance(v, float)},
                                               sort_keys=True))


def same(a, b):
    """Same rows, floats equal to 1e-9 relative (sums may add up in another order)."""
    def eq(x, y):
        if isinstance(x, float) and isinstance(y, float):
            return math.isclose(x, y, rel_tol=1e-9)
        return x == y
    return len(a) == len(b) and all(r.keys() == q.keys() and all(eq(r[k], q[k]) for k in r)
                                    for r, q in zip(a, b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fluxcap", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--stream", required=True)
    args = ap.parse_args()
    files = sum(len(f) for _, _, f in os.walk(os.path.join(args.archive, args.stream)))
    print("archive: %s (%d files), best of %d runs after a warm-up" % (args.archive, files, RUNS))
    print("%-38s %10s %10s %8s %10s %10s %8s" % ("query", "unfused s", "fused s", "ratio",
                                                "unfused cpu", "fused cpu", "ratio"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, sql in QUERIES:
            # the settings alternate, so that a busy moment of a shared machine hits both
            out = {f: os.path.join(tmp, "fused" if f else "unfused") for f in (False, True)}
            best = {f: math.inf for f in (False, True)}
            cpu = {f: math.inf for f in (False, True)}
            for i in range(RUNS + 1):
                for f in (False, True):
                    t, c = run(args, sql, f, out[f])
                    if i > 0:
                        best[f] = min(best[f], t)
                        cpu[f] = min(cpu[f], c)
            if not same(rows(out[True]), rows(out[False])):
                sys.exit("%s: the fused and unfused rows differ" % name)
            print("%-38s %10.3f %10.3f %7.2fx %10.2f %10.2f %7.2fx"
                  % (name, best[False], best[True], best[False] / best[True],
                     cpu[False], cpu[True], cpu[False] / cpu[True]))


if __name__ == "__main__":
    main()
