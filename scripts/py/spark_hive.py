#!/usr/bin/env python3
"""Run `fluxcap catalog hive` DDL in a local Spark with Hive support (Derby
metastore in a temporary folder), then the given queries twice: with Spark's
Parquet reader and with Hive's own (spark.sql.hive.convertMetastoreParquet=false).

Usage: spark_hive.py DDL_FILE QUERY...   -> JSON {"spark": [[rows]...], "hive": [[rows]...]}
"""
import json
import os
import sys
import tempfile


def main():
    ddl_file, queries = sys.argv[1], sys.argv[2:]
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    tmp = tempfile.mkdtemp(prefix="fluxcap-spark-")
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("fluxcap-catalog-test")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.warehouse.dir", os.path.join(tmp, "warehouse"))
        .config("spark.hadoop.javax.jdo.option.ConnectionURL",
                "jdbc:derby:;databaseName=%s;create=true" % os.path.join(tmp, "metastore_db"))
        .config("spark.driver.extraJavaOptions", "-Dderby.system.home=%s" % tmp)
        .enableHiveSupport()
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    text = open(ddl_file).read()
    lines = [l for l in text.splitlines() if not l.strip().startswith("--")]
    for stmt in "\n".join(lines).split(";\n"):
        stmt = stmt.strip().rstrip(";")
        if stmt:
            spark.sql(stmt)
    out = {}
    for name, convert in (("spark", "true"), ("hive", "false")):
        spark.conf.set("spark.sql.hive.convertMetastoreParquet", convert)
        out[name] = [[list(r) for r in spark.sql(q).collect()] for q in queries]
    spark.stop()
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
