#!/usr/bin/env python3
"""Write realistic demo traffic into a Kinesis stream (creating it if needed).

Usage: demo_traffic.py --endpoint URL --stream NAME [--shards N] [--records N]

JSON order events (created → paid → shipped, some cancelled) for a few hundred
customers, plus a few records that are not JSON (a plain-text line and some
binary bytes), which the archiver must keep exactly as they are.
"""
import argparse
import json
import random
import sys
import time

import boto3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--records", type=int, default=2000)
    a = ap.parse_args()
    k = boto3.client("kinesis", endpoint_url=a.endpoint, region_name="us-east-1",
                     aws_access_key_id="demo", aws_secret_access_key="demo")
    try:
        k.create_stream(StreamName=a.stream, ShardCount=a.shards)
    except k.exceptions.ResourceInUseException:
        pass
    for _ in range(200):
        if k.describe_stream_summary(StreamName=a.stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            break
        time.sleep(0.1)
    rnd = random.Random(42)
    countries = ["DE", "FR", "US", "BR", "JP", "IN", "NG", "GB"]
    records = []
    for i in range(a.records):
        cust = f"customer-{rnd.randrange(300):04d}"
        order = f"o-{int(time.time())}-{i:06d}"
        ev = {
            "event_id": f"e-{i:08d}",
            "type": rnd.choices(["created", "paid", "shipped", "cancelled"], [5, 4, 3, 1])[0],
            "order_id": order,
            "customer_id": cust,
            "country": rnd.choice(countries),
            "amount": round(rnd.uniform(3, 400), 2),
            "currency": "EUR",
            "items": [{"sku": f"sku-{rnd.randrange(1000):04d}", "qty": rnd.randint(1, 4)} for _ in range(rnd.randint(1, 3))],
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        records.append({"PartitionKey": cust, "Data": json.dumps(ev).encode()})
    records.append({"PartitionKey": "legacy", "Data": b"PLAIN TEXT heartbeat from legacy producer"})
    records.append({"PartitionKey": "legacy", "Data": bytes([0, 1, 2, 254, 255])})
    sent = 0
    for i in range(0, len(records), 250):
        batch = records[i:i + 250]
        while batch:
            r = k.put_records(StreamName=a.stream, Records=batch)
            batch = [b for b, res in zip(batch, r["Records"]) if "ErrorCode" in res]
        sent += len(records[i:i + 250])
    print(f"put {sent} records into {a.stream} ({a.records} JSON order events, 2 non-JSON)", file=sys.stderr)


if __name__ == "__main__":
    main()
