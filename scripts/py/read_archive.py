#!/usr/bin/env python3
"""Independent reader of one stream's fluxcap Parquet archive (pyarrow or DuckDB, not our code).

Usage:
    scripts/py/read_archive.py --engine pyarrow|duckdb ROOT_DIR_OF_ONE_STREAM
    scripts/py/read_archive.py --engine pyarrow|duckdb --s3-endpoint http://127.0.0.1:5000 \
        --bucket BUCKET --prefix PREFIX/OF/ONE/STREAM

Reads the Hive-partitioned layout ROOT/dt=YYYY-MM-DD/hr=HH/*.parquet (dt and hr are kept as
strings). Files and directories whose name starts with "_" or "." (checkpoints, temp files)
are ignored, as is anything not ending in ".parquet". With --s3-endpoint the objects under
PREFIX are downloaded with boto3 to a temporary directory first (path-style addressing,
region us-east-1, credentials from the environment or dummy "test"/"test").

Prints one JSON object per user record, sorted by (shard_id, int(sequence_number),
subsequence_number), with the keys:
    shard_id, sequence_number (string), subsequence_number (int or null),
    partition_key, explicit_hash_key, approximate_arrival_timestamp (epoch ms, int),
    data_b64 (base64 of the data column), dt, hr
A column missing from the files prints as null. No Parquet files: prints nothing, exit 0.

Runs with the project's .local/venv python (created by scripts/setup); when started with an
interpreter it re-executes itself with the venv's (pinned versions).
"""
import argparse
import base64
import json
import os
import sys
import tempfile
from pathlib import Path

FIELDS = ["shard_id", "sequence_number", "subsequence_number", "partition_key",
          "explicit_hash_key", "approximate_arrival_timestamp", "data", "dt", "hr"]
VENV = Path(__file__).resolve().parents[2] / ".local" / "venv"


def use_venv():
    """Re-execute under .local/venv (pinned pyarrow/duckdb/boto3) when it exists."""
    py = VENV / "bin" / "python"
    if py.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(py), [str(py), str(Path(__file__).resolve())] + sys.argv[1:])


def need(module):
    try:
        return __import__(module)
    except ImportError:
        sys.exit("read_archive.py: python package %s not found; run scripts/setup" % module)


def hidden(name):
    return name.startswith("_") or name.startswith(".")


def find_parquet_files(root):
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not hidden(d))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not hidden(f) and f.endswith(".parquet"))
    return files


def b64(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("utf-8")
    return base64.b64encode(bytes(value)).decode("ascii")


# ---------------------------------------------------------------- pyarrow
def read_pyarrow(root, files):
    pa = need("pyarrow")
    import pyarrow.dataset as ds
    import pyarrow.compute as pc

    part = ds.partitioning(pa.schema([("dt", pa.string()), ("hr", pa.string())]), flavor="hive")
    dataset = ds.dataset(files, format="parquet", partitioning=part, partition_base_dir=root)
    names = set(dataset.schema.names)
    table = dataset.to_table(columns=[f for f in FIELDS if f in names])

    columns = {}
    for name in FIELDS:
        if name not in names:
            columns[name] = [None] * table.num_rows
            continue
        col = table.column(name)
        if name == "approximate_arrival_timestamp" and pa.types.is_timestamp(col.type):
            per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1000000}[col.type.unit]
            raw = pc.cast(col, pa.int64()).to_pylist()  # epoch in the column's unit
            if per_ms is None:
                columns[name] = [None if v is None else v * 1000 for v in raw]
            else:
                columns[name] = [None if v is None else v // per_ms for v in raw]
        elif name == "approximate_arrival_timestamp" and pa.types.is_date(col.type):
            raise SystemExit("read_archive.py: unexpected date type for %s" % name)
        else:
            columns[name] = col.to_pylist()
    return [dict(zip(FIELDS, vals)) for vals in zip(*(columns[f] for f in FIELDS))]


# ---------------------------------------------------------------- duckdb
def read_duckdb(root, files):
    duckdb = need("duckdb")
    con = duckdb.connect(":memory:")
    src = "read_parquet(?, hive_partitioning = true, hive_types = {'dt': VARCHAR, 'hr': VARCHAR})"
    types = {row[0]: row[1].upper() for row in con.execute("DESCRIBE SELECT * FROM " + src, [files]).fetchall()}
    exprs = []
    for name in FIELDS:
        q = '"%s"' % name
        t = types.get(name)
        if t is None:
            exprs.append("NULL")
        elif name == "approximate_arrival_timestamp" and t.startswith("TIMESTAMP"):
            if "TIME ZONE" in t:
                exprs.append("epoch_ms(%s)" % q)
            else:
                exprs.append("epoch_ms(CAST(%s AS TIMESTAMP))" % q)
        elif name == "approximate_arrival_timestamp":
            exprs.append("CAST(%s AS BIGINT)" % q)
        elif name == "data" and t == "BLOB":
            exprs.append("base64(%s)" % q)
        elif name == "data":
            exprs.append("base64(encode(CAST(%s AS VARCHAR)))" % q)
        elif name == "subsequence_number":
            exprs.append("CAST(%s AS BIGINT)" % q)
        else:
            exprs.append("CAST(%s AS VARCHAR)" % q)
    rows = con.execute("SELECT %s FROM %s" % (", ".join(exprs), src), [files]).fetchall()
    out = []
    for row in rows:
        rec = dict(zip(FIELDS, row))
        rec["data_b64"] = rec.pop("data")  # already base64 text
        out.append(rec)
    return out


# ---------------------------------------------------------------- s3
def download_prefix(endpoint, bucket, prefix, dest):
    boto3 = need("boto3")
    from botocore.config import Config
    s3 = boto3.client(
        "s3", endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        config=Config(s3={"addressing_style": "path"}))
    prefix = prefix.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            parts = [p for p in rel.split("/") if p]
            if not parts or any(hidden(p) for p in parts) or not rel.endswith(".parquet"):
                continue
            target = os.path.join(dest, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            s3.download_file(bucket, obj["Key"], target)


def sort_key(rec):
    seq = rec["sequence_number"]
    sub = rec["subsequence_number"]
    return (rec["shard_id"] or "",
            int(seq) if seq not in (None, "") else -1,
            sub if sub is not None else -1)


def main():
    use_venv()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["pyarrow", "duckdb"], required=True)
    ap.add_argument("--s3-endpoint", help="read from S3 at this endpoint URL instead of ROOT")
    ap.add_argument("--bucket")
    ap.add_argument("--prefix", default="", help="key prefix of one stream's archive")
    ap.add_argument("root", nargs="?", help="local root directory of one stream's archive")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="read_archive-") as tmp:
        if args.s3_endpoint:
            if not args.bucket:
                ap.error("--s3-endpoint needs --bucket")
            if args.root:
                ap.error("give either ROOT or --s3-endpoint, not both")
            root = tmp
            download_prefix(args.s3_endpoint, args.bucket, args.prefix, root)
        else:
            if not args.root:
                ap.error("ROOT is required (or use --s3-endpoint/--bucket/--prefix)")
            root = os.path.abspath(args.root)
            if not os.path.isdir(root):
                sys.exit("read_archive.py: not a directory: %s" % args.root)
        files = find_parquet_files(root)
        if not files:
            return
        if args.engine == "pyarrow":
            records = read_pyarrow(root, files)
        else:
            records = read_duckdb(root, files)

    for rec in records:
        if "data" in rec:
            rec["data_b64"] = b64(rec.pop("data"))
        for key in ("shard_id", "sequence_number"):
            if rec[key] is not None and not isinstance(rec[key], str):
                rec[key] = str(rec[key])
    records.sort(key=sort_key)
    out = sys.stdout
    for rec in records:
        out.write(json.dumps({k: rec[k] for k in (
            "shard_id", "sequence_number", "subsequence_number", "partition_key",
            "explicit_hash_key", "approximate_arrival_timestamp", "data_b64", "dt", "hr")}) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
