#!/usr/bin/env python3
"""Check archived Parquet files against the rules Apache Drill (1.21.1+) reads
by: types come from the legacy ConvertedType, so every column must be flat,
signed, and carry the annotation Drill maps (UTF8 strings, bare BYTE_ARRAY
payload, INT64 TIMESTAMP_MILLIS arrival time); no INT96; zstd; file names not
starting with '_' or '.' (Drill skips those).

Usage: drill_types.py ARCHIVE_DIR   -> prints one JSON object; exit 1 on any violation
"""
import json
import os
import sys

import pyarrow.parquet as pq

EXPECTED = {
    "shard_id": ("BYTE_ARRAY", "UTF8"),
    "sequence_number": ("BYTE_ARRAY", "UTF8"),
    "subsequence_number": ("INT64", "NONE"),
    "partition_key": ("BYTE_ARRAY", "UTF8"),
    "explicit_hash_key": ("BYTE_ARRAY", "UTF8"),
    "approximate_arrival_timestamp": ("INT64", "TIMESTAMP_MILLIS"),
    "data": ("BYTE_ARRAY", "NONE"),
}


def main():
    root = sys.argv[1]
    problems, files = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        # Data files only: the positions tables (fluxcap-positions/) have their own schema.
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(("_", ".")) and d != "fluxcap-positions"]
        for name in filenames:
            if not name.endswith(".parquet"):
                continue
            files += 1
            path = os.path.join(dirpath, name)
            if name.startswith(("_", ".")):
                problems.append("%s: Drill skips names starting with _ or ." % path)
            md = pq.ParquetFile(path).metadata
            schema = md.schema
            seen = set()
            for i in range(len(schema)):
                col = schema.column(i)
                seen.add(col.name)
                if col.max_repetition_level > 0 or "." in col.path:
                    problems.append("%s: %s is nested or repeated" % (path, col.path))
                want = EXPECTED.get(col.name)
                got = (col.physical_type, col.converted_type)
                if want is None:
                    problems.append("%s: unexpected column %s" % (path, col.name))
                elif got != want:
                    problems.append("%s: %s is %s/%s, Drill needs %s/%s" % ((path, col.name) + got + want))
                if col.physical_type == "INT96":
                    problems.append("%s: %s is INT96" % (path, col.name))
            missing = set(EXPECTED) - seen
            if missing:
                problems.append("%s: missing %s" % (path, sorted(missing)))
            for rg in range(md.num_row_groups):
                for c in range(md.num_columns):
                    codec = md.row_group(rg).column(c).compression
                    if codec != "ZSTD":
                        problems.append("%s: column %d is %s, not ZSTD" % (path, c, codec))
    print(json.dumps({"files": files, "problems": problems[:50]}))
    sys.exit(1 if problems or files == 0 else 0)


if __name__ == "__main__":
    main()
