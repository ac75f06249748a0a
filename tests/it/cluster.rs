//! `fluxcap cluster upload-resources`: the generated Drill bootstrap action
//! passes `bash -n` and shellcheck, installs Drill from a stub tarball into a
//! temporary root (checksum verified, configuration written) and starts it
//! only once "ZooKeeper" answers; the resources land in S3 (moto).

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// A tarball holding apache-drill-<v>/bin/drillbit.sh that records its start.
fn stub_tarball(dir: &Path, version: &str) -> std::path::PathBuf {
    let home = dir.join("stub").join(format!("apache-drill-{version}"));
    std::fs::create_dir_all(home.join("bin")).unwrap();
    std::fs::create_dir_all(home.join("conf")).unwrap();
    let bin = home.join("bin/drillbit.sh");
    std::fs::write(
        &bin,
        "#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/../started\"\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&bin).status().unwrap();
    let tar = dir.join("drill.tar.gz");
    let ok = Command::new("tar")
        .arg("-czf")
        .arg(&tar)
        .arg("-C")
        .arg(dir.join("stub"))
        .arg(format!("apache-drill-{version}"))
        .status()
        .unwrap();
    assert!(ok.success());
    tar
}

#[test]
fn drill_bootstrap_installs_configures_and_waits_for_zookeeper() {
    let ws_local = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        "[cluster]\nresources = \"s3://res-bucket/fluxcap\"\n",
        &[("orders", "json")],
    );
    let out_dir = ws_local.dir.path().join("resources");
    ws_local.ok(&[
        "cluster",
        "upload-resources",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    let script = out_dir.join("bootstrap-drill.sh");
    let plugins = out_dir.join("drill/storage-plugins-override.conf");
    assert!(out_dir.join("hive/register-tables.hql").exists());
    let p = std::fs::read_to_string(&plugins).unwrap();
    assert!(p.contains("\"storage\": {\n  \"archive\": {"), "{p}");
    assert!(p.contains("\"type\": \"file\""), "{p}");
    let hive = std::fs::read_to_string(out_dir.join("drill/hive-plugin.conf")).unwrap();
    assert!(hive.contains("\"type\": \"hive\"") && hive.contains("thrift://__PRIMARY__:9083"));
    let hql = std::fs::read_to_string(out_dir.join("hive/register-tables.hql")).unwrap();
    assert!(
        hql.contains("MSCK REPAIR TABLE kinesis_archive.orders;"),
        "{hql}"
    );

    // Static checks.
    assert!(
        Command::new("bash")
            .arg("-n")
            .arg(&script)
            .status()
            .unwrap()
            .success()
    );
    let sc = Command::new(root().join(".local/venv/bin/shellcheck"))
        .arg(&script)
        .output()
        .expect("shellcheck (scripts/setup installs it)");
    assert!(
        sc.status.success(),
        "{}",
        String::from_utf8_lossy(&sc.stdout)
    );

    // A run against a temporary root with a stub tarball.
    let tmp = ws_local.dir.path();
    let tar = stub_tarball(tmp, "1.22.0");
    let zk_port = free_port();
    let prefix = tmp.join("opt");
    // A 16 GiB core node, YARN taking half: Drill gets 7 GiB (heap 1792M, direct 4864M).
    let meminfo = tmp.join("meminfo");
    std::fs::write(&meminfo, "MemTotal:       16777216 kB\n").unwrap();
    let run = |sum: &str, prefix: &Path| {
        Command::new("bash")
            .arg(&script)
            .args(["--tarball", tar.to_str().unwrap(), "--sha256", sum])
            .args([
                "--version",
                "1.22.0",
                "--plugins",
                plugins.to_str().unwrap(),
            ])
            .args(["--cluster-id", "fluxcap-test"])
            .env("DRILL_BASE", prefix)
            .env("DRILL_LOG_DIR", prefix.join("log"))
            .env("EMR_INFO_DIR", prefix.join("no-emr-info"))
            .env("DRILL_SUPERVISOR", "loop")
            .env("FETCH", "cp")
            .env("ZK_HOST", "127.0.0.1")
            .env("ZK_PORT", zk_port.to_string())
            .env("ZK_WAIT_SECS", "120")
            .env("MEMINFO", &meminfo)
            .output()
            .unwrap()
    };
    // A wrong checksum installs nothing.
    let bad_prefix = tmp.join("bad");
    let o = run(&"0".repeat(64), &bad_prefix);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("checksum mismatch"));
    assert!(!bad_prefix.join("drill").exists());

    let o = run(&sha256(&tar), &prefix);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let home = prefix.join("drill");
    assert_eq!(
        std::fs::canonicalize(&home).unwrap(),
        std::fs::canonicalize(prefix.join("apache-drill-1.22.0")).unwrap()
    );
    let conf = std::fs::read_to_string(home.join("conf/drill-override.conf")).unwrap();
    assert!(conf.contains("cluster-id: \"fluxcap-test\""));
    assert!(conf.contains(&format!("zk.connect: \"127.0.0.1:{zk_port}\"")));
    let installed =
        std::fs::read_to_string(home.join("conf/storage-plugins-override.conf")).unwrap();
    assert!(installed.contains("\"archive\""));
    assert!(!installed.contains("__PRIMARY__"));
    let env = std::fs::read_to_string(home.join("conf/drill-env.sh")).unwrap();
    assert!(env.contains("DRILL_HEAP=\"1792M\""), "{env}");
    assert!(env.contains("DRILL_MAX_DIRECT_MEMORY=\"4864M\""), "{env}");
    // Without ZK_HOST and EMR's job-flow.json it refuses to guess the primary node.
    let o = Command::new("bash")
        .arg(&script)
        .args([
            "--tarball",
            "x",
            "--sha256",
            &"a".repeat(64),
            "--version",
            "1.22.0",
            "--plugins",
            "y",
        ])
        .env("EMR_INFO_DIR", prefix.join("no-emr-info"))
        .env_remove("ZK_HOST")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot tell the primary node"));
    // Not started while ZooKeeper does not answer …
    let started = home.join("started");
    assert!(!started.exists());
    // … and started once it does.
    let zk = TcpListener::bind(("127.0.0.1", zk_port)).unwrap();
    std::thread::spawn(move || for _ in zk.incoming() {});
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < deadline, "drillbit.sh was not started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The supervisor runs what the systemd unit's ExecStart runs.
    assert_eq!(std::fs::read_to_string(&started).unwrap().trim(), "run");
}

#[test]
fn resources_are_uploaded_to_s3() {
    let s3 = s3();
    let bucket = unique("res");
    create_bucket(&s3, &bucket);
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        Some(&s3.endpoint()),
        &format!("[cluster]\nresources = \"s3://{bucket}/fluxcap\"\n"),
        &[("orders", "json")],
    );
    let o = ws.ok(&["cluster", "upload-resources"]);
    let listed = String::from_utf8(o.stdout).unwrap();
    for key in [
        "fluxcap/bootstrap-drill.sh",
        "fluxcap/drill/storage-plugins-override.conf",
        "fluxcap/hive/register-tables.hql",
    ] {
        assert!(listed.contains(&format!("s3://{bucket}/{key}")), "{listed}");
    }
    let out = Command::new(python())
        .args([
            "-c",
            &format!(
                "import boto3; c = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
                 aws_access_key_id='test', aws_secret_access_key='test'); \
                 print(c.get_object(Bucket='{bucket}', Key='fluxcap/bootstrap-drill.sh')['Body'].read().decode())",
                s3.endpoint()
            ),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim_end(),
        fluxcap::cluster::resources::BOOTSTRAP_DRILL.trim_end()
    );
    // Without cluster.resources the command says what to set.
    let ws2 = Workspace::new("http://127.0.0.1:9", None, None, "", &[("orders", "json")]);
    let o = ws2.run(&["cluster", "upload-resources"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cluster.resources"));
}

/// Describe a cluster on the moto EMR endpoint with boto3 (an independent client).
fn boto_emr(endpoint: &str, id: &str) -> serde_json::Value {
    let code = format!(
        "import boto3, json\n\
         c = boto3.client('emr', endpoint_url='{endpoint}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n\
         out = {{'cluster': c.describe_cluster(ClusterId='{id}')['Cluster'],\n\
                'bootstrap': c.list_bootstrap_actions(ClusterId='{id}')['BootstrapActions'],\n\
                'steps': c.list_steps(ClusterId='{id}')['Steps'],\n\
                'groups': c.list_instance_groups(ClusterId='{id}')['InstanceGroups']}}\n\
         print(json.dumps(out, default=str))\n"
    );
    let out = Command::new(python()).args(["-c", &code]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn emr_cluster_launch_list_wait_ssh_terminate_on_moto() {
    let moto = s3();
    let sha = "ab".repeat(32);
    let extra = format!(
        "[cluster]\nresources = \"s3://res-bucket/fluxcap\"\ndrill_sha256 = \"{sha}\"\n\
         tags = [\"Team=data\"]\ntask_spot_count = 2\nkey_pair = \"my-key\"\nglue_catalog = true\n\
         ssh_command = \"echo\"\nssh_key_file = \"/keys/my-key.pem\"\nidle_timeout = \"30m\"\n\
         configurations_json = '[{{\"Classification\":\"spark-defaults\",\"Properties\":{{\"spark.sql.shuffle.partitions\":\"16\"}}}}]'\n"
    );
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        None,
        None,
        &extra,
        &[("orders", "json")],
    );
    let run = |args: &[&str]| {
        ws.cmd()
            .env("FLUXCAP_AWS_EMR_ENDPOINT", moto.endpoint())
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let o = run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let id = ok(&["cluster", "launch"]).trim().to_string();
    assert!(id.starts_with("j-"), "{id}");

    // What EMR was asked for, read back with boto3.
    let d = boto_emr(&moto.endpoint(), &id);
    let c = &d["cluster"];
    let apps: Vec<&str> = c["Applications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["Name"].as_str().unwrap())
        .collect();
    for a in ["Hadoop", "Hive", "Spark", "ZooKeeper"] {
        assert!(apps.contains(&a), "{apps:?}");
    }
    assert_eq!(c["ReleaseLabel"], "emr-7.13.0");
    let tags: Vec<(String, String)> = c["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["Key"].as_str().unwrap().into(),
                t["Value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(tags.contains(&("fluxcap:managed".into(), "true".into())));
    assert!(tags.contains(&("Team".into(), "data".into())));
    let confs = c["Configurations"].to_string();
    assert!(
        confs.contains("AWSGlueDataCatalogHiveClientFactory"),
        "{confs}"
    );
    assert!(confs.contains("spark-hive-site"), "{confs}");
    assert!(tags.contains(&(
        "for-use-with-amazon-emr-managed-policies".into(),
        "true".into()
    )));
    assert!(confs.contains("spark.sql.shuffle.partitions"), "{confs}");
    let ba = &d["bootstrap"][0];
    assert_eq!(ba["Name"], "install-drill");
    assert_eq!(
        ba["ScriptPath"],
        "s3://res-bucket/fluxcap/bootstrap-drill.sh"
    );
    let args: Vec<&str> = ba["Args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "--tarball",
            "s3://res-bucket/fluxcap/apache-drill-1.22.0.tar.gz",
            "--sha256",
            sha.as_str(),
            "--version",
            "1.22.0",
            "--plugins",
            "s3://res-bucket/fluxcap/drill/storage-plugins-override.conf",
            "--cluster-id",
            "fluxcap",
            // Glue is the metastore here: no hive plugin for Drill (it would see nothing).
            "--yarn-fraction",
            "0.5",
        ]
    );
    let step = d["steps"].to_string();
    assert!(
        step.contains("s3://res-bucket/fluxcap/hive/register-tables.hql"),
        "{step}"
    );
    let groups = d["groups"].to_string();
    assert!(
        groups.contains("SPOT") && groups.contains("TASK"),
        "{groups}"
    );

    // list, wait, ssh and tunnel (ssh_command = echo prints the command line).
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["cluster", "list", "--json"])).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str())
    );
    let w = ok(&["cluster", "wait", &id, "--skip-drill", "--timeout", "1m"]);
    assert!(w.starts_with(&id));
    let ssh = ok(&["cluster", "ssh", &id]);
    assert!(ssh.starts_with("-i /keys/my-key.pem"), "{ssh}");
    assert!(ssh.trim_end().contains("hadoop@"), "{ssh}");
    let tunnel = ok(&["cluster", "tunnel", &id]);
    assert!(
        tunnel.contains("-N -L 8047:localhost:8047 -L 31010:localhost:31010"),
        "{tunnel}"
    );
    // `wait` checks Drill over SSH (ssh_command = echo answers at once), never the public :8047.
    let w = run(&["cluster", "wait", &id, "--timeout", "1m"]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert!(
        String::from_utf8_lossy(&w.stderr).contains("checked over SSH"),
        "{}",
        String::from_utf8_lossy(&w.stderr)
    );

    // terminate; then it is no longer listed.
    ok(&["cluster", "terminate", &id]);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["cluster", "list", "--json"])).unwrap();
    assert!(
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str()),
        "{listed}"
    );

    // EMR takes idle timeouts from 60 s to 7 days.
    for bad in ["cluster.idle_timeout=30s", "cluster.idle_timeout=8d"] {
        let o = run(&["--set", bad, "cluster", "list"]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("cluster.idle_timeout"));
    }
    // Without the tarball's checksum nothing is launched.
    let o = run(&["--set", "cluster.drill_sha256=", "cluster", "launch"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cluster.drill_sha256"));
}

#[test]
fn replay_on_drill_names_an_unreachable_drill_and_records_nothing() {
    let k = ferrokinesis(false);
    let ws = Workspace::new(&k.endpoint(), None, None, "", &[("orders", "json")]);
    let url = format!("http://127.0.0.1:{}", free_port());
    let o = ws.run(&[
        "replay",
        "--stream",
        "orders",
        "--to",
        "-",
        "--compact",
        "--engine",
        "drill",
        "--drill-url",
        &url,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Drill") && err.contains(&url), "{err}");
    let o = ws.ok(&["replay", "--list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let o = ws.run(&[
        "replay", "--stream", "orders", "--to", "-", "--engine", "spark",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn generating_the_drill_plugin_and_resources_makes_no_aws_call() {
    // An S3 archive whose endpoint answers nothing: any AWS call would fail.
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        Some("s3://no-such-bucket/kinesis"),
        Some("http://127.0.0.1:9"),
        "[cluster]\nresources = \"s3://no-such-bucket/fluxcap\"\n",
        &[("orders", "json")],
    );
    let o = ws.ok(&["catalog", "drill"]);
    let plugin: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plugin["connection"], "s3a://no-such-bucket");
    assert_eq!(
        plugin["workspaces"]["scratch"]["location"],
        "/kinesis/_fluxcap/drill-scratch"
    );
    let out = ws.dir.path().join("res");
    ws.ok(&[
        "cluster",
        "upload-resources",
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert!(out.join("hive/register-tables.hql").exists());
    // A command that needs the bucket fails in one or two lines, no SDK dump.
    let o = ws.run(&["catalog", "hive"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().count() <= 2, "{err}");
    assert!(err.contains("no-such-bucket"), "{err}");
    assert!(
        !err.contains("DispatchFailure") && !err.contains("extensions"),
        "{err}"
    );
}
