#!/usr/bin/env python3
"""KPL-aggregate user records with the PyPI `aws_kinesis_agg` encoder (independent of ours).

Usage:
    scripts/py/kpl_encode.py [--max-per-aggregate N] [--max-bytes B] < users.jsonl > aggregated.jsonl

Input, one JSON object per line (blank lines are skipped):
    {"partition_key": "k1", "explicit_hash_key": null, "data_b64": "aGVsbG8="}
Output, one JSON object per aggregated Kinesis record, in input order:
    {"partition_key": "k1", "explicit_hash_key": null,
     "data_b64": "<base64 of F3 89 9A C2 + protobuf AggregatedRecord + md5>",
     "user_records": [0, 1, 2]}
`user_records` lists the 0-based indices of the input lines packed into that record, in order
(so user record `user_records[i]` gets sub-sequence number i once the record is put).

An aggregate is closed after N user records (--max-per-aggregate, default 10; 0 = no count
limit) or when the next record would make it exceed --max-bytes (default 1 MiB, the library's
own maximum). The outer partition_key / explicit_hash_key are those of the first user record
in the aggregate, which is what aws_kinesis_agg reports (explicit_hash_key may then be null even
when later user records carry one). Put them with PutRecord(s) using exactly these keys.

Runs with the project's .local/venv python (created by scripts/setup); when started with
another interpreter it re-executes itself with the venv's (pinned versions).
"""
import argparse
import base64
import hashlib
import json
import os
import sys
from pathlib import Path


def _use_venv():
    """Re-execute under .local/venv (pinned aws_kinesis_agg) when it exists."""
    venv = Path(__file__).resolve().parents[2] / ".local" / "venv"
    py = venv / "bin" / "python"
    if py.exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(str(py), [str(py), str(Path(__file__).resolve())] + sys.argv[1:])


if __name__ == "__main__":
    _use_venv()

try:
    from aws_kinesis_agg import MAGIC, MAX_BYTES_PER_RECORD
    from aws_kinesis_agg.aggregator import RecordAggregator
except ImportError:
    sys.exit("kpl_encode.py: python package aws_kinesis_agg not found; run scripts/setup")


def emit(out, agg_record, indices):
    pk, ehk, data = agg_record.get_contents()
    # self-check the framing: magic + protobuf + md5(protobuf)
    if data[:4] != MAGIC or hashlib.md5(data[4:-16]).digest() != data[-16:]:
        raise SystemExit("kpl_encode.py: encoder produced a record without valid magic/md5")
    if isinstance(pk, bytes):
        pk = pk.decode("utf-8")
    if isinstance(ehk, bytes):
        ehk = ehk.decode("utf-8")
    out.write(json.dumps({
        "partition_key": pk,
        "explicit_hash_key": ehk if ehk else None,
        "data_b64": base64.b64encode(data).decode("ascii"),
        "user_records": list(indices),
    }) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-per-aggregate", type=int, default=10,
                    help="user records per aggregated record (default 10; 0 = size limit only)")
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES_PER_RECORD,
                    help="max size of one aggregated record in bytes (default/maximum %d)"
                    % MAX_BYTES_PER_RECORD)
    args = ap.parse_args()
    if args.max_per_aggregate < 0:
        ap.error("--max-per-aggregate must be >= 0")

    agg = RecordAggregator(max_size=args.max_bytes)
    out = sys.stdout
    current = []  # input indices held by the aggregate being filled
    index = -1
    for lineno, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        index += 1
        try:
            rec = json.loads(line)
            pk = rec["partition_key"]
            ehk = rec.get("explicit_hash_key")
            data = base64.b64decode(rec["data_b64"], validate=True)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit("kpl_encode.py: bad input line %d: %s" % (lineno, e))
        if not isinstance(pk, str) or not (ehk is None or isinstance(ehk, str)):
            raise SystemExit("kpl_encode.py: bad input line %d: keys must be strings" % lineno)
        # returns the previous (full) aggregate when this record did not fit in it;
        # the new record then starts a fresh aggregate
        full = agg.add_user_record(pk, data, ehk)
        if full is not None:
            emit(out, full, current)
            current = []
        current.append(index)
        if args.max_per_aggregate and len(current) >= args.max_per_aggregate:
            emit(out, agg.clear_and_get(), current)
            current = []
    last = agg.clear_and_get()
    if last is not None:
        emit(out, last, current)
    out.flush()


if __name__ == "__main__":
    main()
