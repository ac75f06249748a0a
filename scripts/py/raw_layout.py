#!/usr/bin/env python3
"""What an outside reader sees in one stream's raw archive layout, right now (pyarrow, not our code).

Usage:
    scripts/py/raw_layout.py ROOT_DIR_OF_ONE_STREAM
    scripts/py/raw_layout.py --s3-endpoint http://127.0.0.1:5000 --bucket B --prefix PREFIX/OF/ONE/STREAM

Lists every object of the table directory that is not under a folder starting with "_" or "."
(what Athena, Spark or DuckDB would list; a name such as `x.parquet#3` is listed too: it sits
inside a partition), reads each one with pyarrow, and prints one JSON object:
    {"files": {"dt=…/hr=…/name": {"size": N, "sha256": "…"}},
     "unreadable": ["dt=…/name: error", …],
     "records": [[shard_id, sequence_number, subsequence_number], …]}
Runs with the project's .local/venv python when it exists.
"""
import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parents[2] / ".local" / "venv"


def use_venv():
    py = VENV / "bin" / "python"
    if py.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(py), [str(py), str(Path(__file__).resolve())] + sys.argv[1:])


def hidden(part):
    return part.startswith("_") or part.startswith(".")


def local_objects(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not hidden(d)]
        for f in filenames:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root)
            try:
                with open(full, "rb") as fh:
                    yield rel, fh.read()
            except FileNotFoundError:
                continue  # removed while we listed: it was never a published file


def s3_objects(endpoint, bucket, prefix):
    import boto3
    from botocore.config import Config
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                      aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
                      config=Config(s3={"addressing_style": "path"}))
    prefix = prefix.strip("/") + "/"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if any(hidden(p) for p in rel.split("/") if p):
                continue
            try:
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            except s3.exceptions.NoSuchKey:
                continue
            yield rel, body


def main():
    use_venv()
    import pyarrow.parquet as pq
    ap = argparse.ArgumentParser()
    ap.add_argument("--s3-endpoint")
    ap.add_argument("--bucket")
    ap.add_argument("--prefix", default="")
    ap.add_argument("root", nargs="?")
    a = ap.parse_args()
    objs = s3_objects(a.s3_endpoint, a.bucket, a.prefix) if a.s3_endpoint else local_objects(a.root)
    files, unreadable, records = {}, [], []
    for rel, body in objs:
        files[rel] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        try:
            t = pq.read_table(io.BytesIO(body), columns=["shard_id", "sequence_number", "subsequence_number"],
                              use_threads=False)
        except Exception as e:  # noqa: BLE001 - any failure is what we report
            unreadable.append("%s: %s" % (rel, e))
            continue
        for s, q, sub in zip(*(t.column(i).to_pylist() for i in range(3))):
            records.append([s, q, sub])
    json.dump({"files": files, "unreadable": unreadable, "records": records}, sys.stdout)
    sys.stdout.flush()
    # Skip interpreter teardown: Arrow's thread pools have been seen to abort
    # the process there ("terminate called without an active exception").
    os._exit(0)


if __name__ == "__main__":
    main()
