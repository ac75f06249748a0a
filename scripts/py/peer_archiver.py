#!/usr/bin/env python3
"""A plain, hand-written Kinesis → zstd Parquet archiver (boto3 + pyarrow): the
peer that scripts/bench-archive measures fluxcap against.

Usage: peer_archiver.py --endpoint URL --stream NAME --out DIR
                        [--region us-east-1] [--limit 10000] [--zstd-level 3]
                        [--min-call-interval 0.2]

What it does — what a reasonable single-process archiver written in an
afternoon does:
  * lists the shards (ListShards, following NextToken), reads them one after
    the other from TRIM_HORIZON with GetRecords (Limit 10000), at most 5 calls
    per second per shard, until a response is empty with MillisBehindLatest 0
    (caught up) or NextShardIterator is null (closed shard fully read);
  * retries throttling with exponential backoff and replaces an expired iterator
    with one AFTER_SEQUENCE_NUMBER of the last record read;
  * buffers the rows of a shard in memory, grouped by arrival hour, and writes
    one zstd Parquet file per shard per hour:
        DIR/dt=YYYY-MM-DD/hr=HH/<shard>_<first-sequence-number>.parquet
    with fluxcap's 7 columns (shard_id, sequence_number, subsequence_number,
    partition_key, explicit_hash_key, approximate_arrival_timestamp, data).

It does not de-aggregate KPL records, validate JSON, keep checkpoints, write
bloom filters or bound its memory: it is the cheap baseline.
Credentials come from the boto3 default chain (the benchmark sets dummy ones).
Prints one summary line on stderr: "peer archived N records (X MB of payload) in F files".
"""
import argparse
import os
import random
import sys
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from archive_schema import SCHEMA  # noqa: E402

HOUR_MS = 3_600_000


def list_shards(k, stream):
    shards, token = [], None
    while True:
        r = k.list_shards(NextToken=token) if token else k.list_shards(StreamName=stream)
        shards.extend(s["ShardId"] for s in r["Shards"])
        token = r.get("NextToken")
        if not token:
            return shards


def write_hour(out, shard, hour, cols, level):
    t = time.gmtime(hour * 3600)
    d = os.path.join(out, time.strftime("dt=%Y-%m-%d", t), time.strftime("hr=%H", t))
    os.makedirs(d, exist_ok=True)
    n = len(cols["seq"])
    table = pa.table([
        pa.array([shard] * n, pa.string()),
        pa.array(cols["seq"], pa.string()),
        pa.array([0] * n, pa.int64()),
        pa.array(cols["pk"], pa.string()),
        pa.nulls(n, pa.string()),
        pa.array(cols["ts"], pa.timestamp("ms", tz="UTC")),
        pa.array(cols["data"], pa.binary()),
    ], schema=SCHEMA)
    path = os.path.join(d, f"{shard}_{cols['seq'][0]}.parquet")
    tmp = path + ".tmp"
    pq.write_table(table, tmp, compression="zstd", compression_level=level)
    os.replace(tmp, path)


def archive_shard(k, a, stream, shard):
    it = k.get_shard_iterator(StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    hours = {}  # arrival hour (epoch hours) -> column lists
    last_seq, last_call, backoff = None, 0.0, 0.1
    records = payload = 0
    while it:
        wait = a.min_call_interval - (time.monotonic() - last_call)
        if wait > 0:
            time.sleep(wait)
        last_call = time.monotonic()
        try:
            r = k.get_records(ShardIterator=it, Limit=a.limit)
        except k.exceptions.ProvisionedThroughputExceededException:
            time.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 10.0)
            continue
        except k.exceptions.ExpiredIteratorException:
            if last_seq is None:
                it = k.get_shard_iterator(StreamName=stream, ShardId=shard,
                                          ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            else:
                it = k.get_shard_iterator(StreamName=stream, ShardId=shard, ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                          StartingSequenceNumber=last_seq)["ShardIterator"]
            continue
        backoff = 0.1
        recs = r["Records"]
        for rec in recs:
            ms = int(rec["ApproximateArrivalTimestamp"].timestamp() * 1000)
            cols = hours.get(ms // HOUR_MS)
            if cols is None:
                cols = hours[ms // HOUR_MS] = {"seq": [], "pk": [], "ts": [], "data": []}
            cols["seq"].append(rec["SequenceNumber"])
            cols["pk"].append(rec["PartitionKey"])
            cols["ts"].append(ms)
            cols["data"].append(rec["Data"])
            payload += len(rec["Data"])
        if recs:
            last_seq = recs[-1]["SequenceNumber"]
            records += len(recs)
        it = r.get("NextShardIterator")
        if not recs and r.get("MillisBehindLatest", 0) == 0:
            break
    for hour in sorted(hours):
        write_hour(a.out, shard, hour, hours[hour], a.zstd_level)
    return records, payload, len(hours)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", help="Kinesis endpoint URL (unset: AWS)")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--stream", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--min-call-interval", type=float, default=0.2,
                    help="seconds between GetRecords calls on one shard (Kinesis allows 5/s)")
    a = ap.parse_args()
    k = boto3.client("kinesis", endpoint_url=a.endpoint, region_name=a.region)
    total = payload = files = 0
    for shard in list_shards(k, a.stream):
        n, b, f = archive_shard(k, a, a.stream, shard)
        total, payload, files = total + n, payload + b, files + f
    print(f"peer archived {total} records ({payload / 1e6:.1f} MB of payload) in {files} files", file=sys.stderr)


if __name__ == "__main__":
    main()
