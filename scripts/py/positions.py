#!/usr/bin/env python3
"""Independent reader of a fluxcap positions table, and writer of a live stand-in table.

Usage:
    scripts/py/positions.py read (--s3-endpoint URL --bucket B --key KEY | --file PATH)
        Read the positions table (one Parquet object) with DuckDB; print one JSON object per
        row (every column, as stored) and a last line {"version": footer version}.
    scripts/py/positions.py live --kinesis-endpoint URL --stream S (--s3-endpoint URL --bucket B --key KEY | --out PATH)
        Read every record of the stream from its trim horizon with boto3 (GetRecords) and write
        them with pyarrow as one Parquet object of the live table's shape (the columns of
        `fluxcap catalog hive --live`: shard_id, sequence_number, subsequence_number (0),
        partition_key, explicit_hash_key (null), approximate_arrival_timestamp (epoch ms),
        data). Prints the number of records.

Runs with the project's .local/venv python (pinned pyarrow, duckdb, boto3).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

VENV = Path(__file__).resolve().parents[2] / ".local" / "venv"


def use_venv():
    py = VENV / "bin" / "python"
    if py.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(py), [str(py), str(Path(__file__).resolve())] + sys.argv[1:])


def client(service, endpoint):
    import boto3
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))


def read(args):
    import duckdb
    import pyarrow.parquet as pq
    with tempfile.TemporaryDirectory() as d:
        path = args.file
        if not path:
            s3 = client("s3", args.s3_endpoint)
            body = s3.get_object(Bucket=args.bucket, Key=args.key)["Body"].read()
            path = os.path.join(d, "positions.parquet")
            with open(path, "wb") as f:
                f.write(body)
        con = duckdb.connect()
        cur = con.execute(f"SELECT * FROM read_parquet('{path}') ORDER BY shard_id")
        names = [c[0] for c in cur.description]
        for row in cur.fetchall():
            print(json.dumps(dict(zip(names, row))))
        meta = pq.read_metadata(path).metadata or {}
        version = meta.get(b"fluxcap.positions.version", b"").decode()
        print(json.dumps({"version": version}))


def live(args):
    import pyarrow as pa
    import pyarrow.parquet as pq
    k = client("kinesis", args.kinesis_endpoint)
    rows = {n: [] for n in ["shard_id", "sequence_number", "subsequence_number", "partition_key",
                            "explicit_hash_key", "approximate_arrival_timestamp", "data"]}
    shards = k.list_shards(StreamName=args.stream)["Shards"]
    for s in shards:
        it = k.get_shard_iterator(StreamName=args.stream, ShardId=s["ShardId"],
                                  ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            r = k.get_records(ShardIterator=it, Limit=10000)
            for rec in r["Records"]:
                rows["shard_id"].append(s["ShardId"])
                rows["sequence_number"].append(rec["SequenceNumber"])
                rows["subsequence_number"].append(0)
                rows["partition_key"].append(rec["PartitionKey"])
                rows["explicit_hash_key"].append(None)
                rows["approximate_arrival_timestamp"].append(
                    int(rec["ApproximateArrivalTimestamp"].timestamp() * 1000))
                rows["data"].append(rec["Data"])
            if not r["Records"] and r.get("MillisBehindLatest", 0) == 0:
                break
            it = r.get("NextShardIterator")
    schema = pa.schema([("shard_id", pa.string()), ("sequence_number", pa.string()),
                        ("subsequence_number", pa.int64()), ("partition_key", pa.string()),
                        ("explicit_hash_key", pa.string()),
                        ("approximate_arrival_timestamp", pa.int64()), ("data", pa.binary())])
    table = pa.table(rows, schema=schema)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        pq.write_table(table, args.out)
    else:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "live.parquet")
            pq.write_table(table, path)
            client("s3", args.s3_endpoint).upload_file(path, args.bucket, args.key)
    print(table.num_rows)


def main():
    use_venv()
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("read")
    r.add_argument("--s3-endpoint")
    r.add_argument("--bucket")
    r.add_argument("--key")
    r.add_argument("--file")
    lv = sub.add_parser("live")
    lv.add_argument("--kinesis-endpoint", required=True)
    lv.add_argument("--stream", required=True)
    lv.add_argument("--s3-endpoint")
    lv.add_argument("--bucket")
    lv.add_argument("--key")
    lv.add_argument("--out")
    args = p.parse_args()
    {"read": read, "live": live}[args.cmd](args)


if __name__ == "__main__":
    main()
