//! `fluxcap cluster launch|list|wait|ssh|tunnel|terminate`: an EMR cluster
//! with Drill over the archive, from the configuration.
//!
//! ```text
//!   upload-resources ─▶ launch: RunJobFlow
//!                         applications (Hadoop, Hive, Spark, ZooKeeper …)
//!                         bootstrap action: bootstrap-drill.sh (Drill from your tarball, checksum)
//!                         step: hive -f register-tables.hql (the archive's tables)
//!                         auto-termination after cluster.idle_timeout, tag fluxcap:managed
//!                  ─▶ wait (ready, then Drill answers, checked over SSH) ─▶ tunnel (8047, 31010 → localhost) / ssh ─▶ terminate
//! ```

use std::time::{Duration, Instant};

use aws_sdk_emr::types::{
    Application, AutoTerminationPolicy, BootstrapActionConfig, ClusterState, Configuration,
    HadoopJarStepConfig, InstanceGroupConfig, InstanceRoleType, JobFlowInstancesConfig, MarketType,
    ScriptBootstrapActionConfig, StepConfig, Tag,
};

use crate::cluster::resources;
use crate::config::Config;
use crate::error::{Error, Result};

/// The tag that marks clusters this tool launched.
pub const MANAGED_TAG: &str = "fluxcap:managed";

fn emr_err(op: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Emr {
        operation: op,
        message: e.to_string(),
    }
}

fn err_text<E: std::error::Error + 'static>(e: &E) -> String {
    crate::aws::error_text(e)
}

async fn client(cfg: &Config) -> aws_sdk_emr::Client {
    let sdk = crate::aws::sdk_config(&cfg.aws).await;
    let mut b = aws_sdk_emr::config::Builder::from(&sdk);
    if let Some(ep) = &cfg.aws.emr_endpoint {
        b = b.endpoint_url(ep);
    }
    aws_sdk_emr::Client::from_conf(b.build())
}

fn bad(key: &str, message: String) -> Error {
    Error::Config {
        file: "configuration".into(),
        key: key.into(),
        message,
    }
}

/// EMR configurations: Glue as the metastore when asked, plus `cluster.configurations_json`.
fn configurations(cfg: &Config) -> Result<Vec<Configuration>> {
    let mut out = Vec::new();
    if cfg.cluster.glue_catalog {
        // Hive and Spark each read their own classification.
        for class in ["hive-site", "spark-hive-site"] {
            out.push(
                Configuration::builder()
                    .classification(class)
                    .properties(
                        "hive.metastore.client.factory.class",
                        "com.amazonaws.glue.catalog.metastore.AWSGlueDataCatalogHiveClientFactory",
                    )
                    .build(),
            );
        }
    }
    let extra = cfg.cluster.configurations_json.trim();
    if !extra.is_empty() {
        let v: Vec<serde_json::Value> = serde_json::from_str(extra).map_err(|e| {
            bad(
                "cluster.configurations_json",
                format!("expected a JSON list of EMR configurations: {e}"),
            )
        })?;
        for c in v {
            out.push(configuration(&c)?);
        }
    }
    Ok(out)
}

fn configuration(v: &serde_json::Value) -> Result<Configuration> {
    let class = v["Classification"].as_str().ok_or_else(|| {
        bad(
            "cluster.configurations_json",
            "every configuration needs a \"Classification\"".into(),
        )
    })?;
    let mut b = Configuration::builder().classification(class);
    if let Some(props) = v["Properties"].as_object() {
        for (k, val) in props {
            let val = val
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| val.to_string());
            b = b.properties(k, val);
        }
    }
    if let Some(children) = v["Configurations"].as_array() {
        for c in children {
            b = b.configurations(configuration(c)?);
        }
    }
    Ok(b.build())
}

/// The tag EMR's v2 managed policies (`AmazonEMRServicePolicy_v2`) require on
/// the resources the service role may act on; cluster tags reach the EC2 instances.
pub const MANAGED_POLICY_TAG: &str = "for-use-with-amazon-emr-managed-policies";

fn tags(cfg: &Config) -> Result<Vec<Tag>> {
    let mut out = vec![
        Tag::builder().key(MANAGED_TAG).value("true").build(),
        Tag::builder().key(MANAGED_POLICY_TAG).value("true").build(),
    ];
    for t in &cfg.cluster.tags {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| bad("cluster.tags", format!("expected \"Key=Value\", got {t:?}")))?;
        out.push(Tag::builder().key(k.trim()).value(v.trim()).build());
    }
    Ok(out)
}

/// Launch the cluster; its id.
pub async fn launch(cfg: &Config) -> Result<String> {
    let c = &cfg.cluster;
    let base = resources::base_url(cfg)?;
    if c.drill_sha256.len() != 64 || !c.drill_sha256.chars().all(|x| x.is_ascii_hexdigit()) {
        return Err(bad(
            "cluster.drill_sha256",
            "expected the SHA-256 (64 hex digits) of the Drill tarball: the bootstrap action verifies it".into(),
        ));
    }
    let log_uri = if c.log_uri.is_empty() {
        format!("{base}/logs/")
    } else {
        c.log_uri.clone()
    };
    let mut groups = vec![
        InstanceGroupConfig::builder()
            .name("primary")
            .instance_role(InstanceRoleType::Master)
            .market(MarketType::OnDemand)
            .instance_type(&c.primary_instance_type)
            .instance_count(1)
            .build(),
        InstanceGroupConfig::builder()
            .name("core")
            .instance_role(InstanceRoleType::Core)
            .market(MarketType::OnDemand)
            .instance_type(&c.core_instance_type)
            .instance_count(c.core_instance_count.max(1))
            .build(),
    ];
    if c.task_spot_count > 0 {
        groups.push(
            InstanceGroupConfig::builder()
                .name("task-spot")
                .instance_role(InstanceRoleType::Task)
                .market(MarketType::Spot)
                .instance_type(&c.task_instance_type)
                .instance_count(c.task_spot_count)
                .build(),
        );
    }
    let mut instances = JobFlowInstancesConfig::builder()
        .set_instance_groups(Some(groups))
        .keep_job_flow_alive_when_no_steps(true)
        .termination_protected(false);
    if !c.key_pair.is_empty() {
        instances = instances.ec2_key_name(&c.key_pair);
    }
    if !c.subnet_id.is_empty() {
        instances = instances.ec2_subnet_id(&c.subnet_id);
    }
    let bootstrap = BootstrapActionConfig::builder()
        .name("install-drill")
        .script_bootstrap_action(
            ScriptBootstrapActionConfig::builder()
                .path(format!("{base}/bootstrap-drill.sh"))
                .set_args(Some(resources::bootstrap_args(cfg)?))
                .build(),
        )
        .build();
    let step = StepConfig::builder()
        .name("register the archive's tables")
        .action_on_failure(aws_sdk_emr::types::ActionOnFailure::Continue)
        .hadoop_jar_step(
            HadoopJarStepConfig::builder()
                .jar("command-runner.jar")
                .set_args(Some(vec![
                    "hive-script".into(),
                    "--run-hive-script".into(),
                    "--args".into(),
                    "-f".into(),
                    format!("{base}/hive/register-tables.hql"),
                ]))
                .build(),
        )
        .build();
    let apps: Vec<Application> = c
        .applications
        .iter()
        .map(|a| Application::builder().name(a).build())
        .collect();
    let resp = client(cfg)
        .await
        .run_job_flow()
        .name(&c.name)
        .release_label(&c.release_label)
        .log_uri(log_uri)
        .service_role(&c.service_role)
        .job_flow_role(&c.instance_profile)
        .visible_to_all_users(true)
        .set_applications(Some(apps))
        .instances(instances.build())
        .bootstrap_actions(bootstrap)
        .steps(step)
        .set_configurations(Some(configurations(cfg)?))
        .set_tags(Some(tags(cfg)?))
        .auto_termination_policy(
            AutoTerminationPolicy::builder()
                // validated in the configuration: 60 s to 7 days
                .idle_timeout(c.idle_timeout.0.as_secs() as i64)
                .build(),
        )
        .send()
        .await
        .map_err(|e| emr_err("RunJobFlow", err_text(&e)))?;
    resp.job_flow_id()
        .map(str::to_string)
        .ok_or_else(|| emr_err("RunJobFlow", "no cluster id in the answer"))
}

/// One cluster as `cluster list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterInfo {
    /// Cluster id.
    pub id: String,
    /// Name.
    pub name: String,
    /// EMR state.
    pub state: String,
    /// The primary node's public DNS name, once known.
    pub primary_dns: Option<String>,
}

async fn describe(client: &aws_sdk_emr::Client, id: &str) -> Result<(ClusterInfo, bool)> {
    let d = client
        .describe_cluster()
        .cluster_id(id)
        .send()
        .await
        .map_err(|e| emr_err("DescribeCluster", err_text(&e)))?;
    let c = d
        .cluster()
        .ok_or_else(|| emr_err("DescribeCluster", format!("no cluster {id}")))?;
    let managed = c.tags().iter().any(|t| t.key() == Some(MANAGED_TAG));
    Ok((
        ClusterInfo {
            id: id.to_string(),
            name: c.name().unwrap_or_default().to_string(),
            state: c
                .status()
                .and_then(|s| s.state())
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            primary_dns: c.master_public_dns_name().map(str::to_string),
        },
        managed,
    ))
}

/// Active clusters this tool launched.
pub async fn list(cfg: &Config) -> Result<Vec<ClusterInfo>> {
    let client = client(cfg).await;
    let mut out = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let r = client
            .list_clusters()
            .set_cluster_states(Some(vec![
                ClusterState::Starting,
                ClusterState::Bootstrapping,
                ClusterState::Running,
                ClusterState::Waiting,
                ClusterState::Terminating,
            ]))
            .set_marker(marker.clone())
            .send()
            .await
            .map_err(|e| emr_err("ListClusters", err_text(&e)))?;
        for c in r.clusters() {
            if let Some(id) = c.id() {
                let (info, managed) = describe(&client, id).await?;
                if managed {
                    out.push(info);
                }
            }
        }
        match r.marker() {
            Some(m) if !m.is_empty() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// Terminate clusters.
pub async fn terminate(cfg: &Config, ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    client(cfg)
        .await
        .terminate_job_flows()
        .set_job_flow_ids(Some(ids.to_vec()))
        .send()
        .await
        .map_err(|e| emr_err("TerminateJobFlows", err_text(&e)))?;
    Ok(())
}

/// Wait until the cluster is ready and, unless `skip_drill`, Drill answers
/// on the primary node — checked through SSH (`curl` on the node itself):
/// EMR's security groups and block-public-access let only SSH in from
/// outside, so the public `:8047` is never probed. Without `cluster.key_pair`
/// there is no SSH, and only the cluster's state is waited for (said on
/// stderr). Progress goes to stderr.
pub async fn wait(
    cfg: &Config,
    id: &str,
    timeout: Duration,
    skip_drill: bool,
) -> Result<ClusterInfo> {
    let client = client(cfg).await;
    let started = Instant::now();
    let mut last = String::new();
    let check_drill = !skip_drill && !cfg.cluster.key_pair.is_empty();
    if !skip_drill && !check_drill {
        eprintln!(
            "cluster.key_pair is not set: waiting for the cluster's state only (Drill is checked over SSH)"
        );
    }
    loop {
        let (info, _) = describe(&client, id).await?;
        if info.state != last {
            eprintln!(
                "[{:>4} s] cluster {id}: {}",
                started.elapsed().as_secs(),
                info.state
            );
            last = info.state.clone();
        }
        match info.state.as_str() {
            "WAITING" | "RUNNING" => {
                if !check_drill {
                    return Ok(info);
                }
                if let Some(dns) = &info.primary_dns
                    && drill_answers_over_ssh(cfg, dns).await
                {
                    eprintln!("Drill answers on the primary node (checked over SSH)");
                    return Ok(info);
                }
            }
            "TERMINATING" | "TERMINATED" | "TERMINATED_WITH_ERRORS" => {
                return Err(emr_err(
                    "DescribeCluster",
                    format!(
                        "cluster {id} is {} (see its logs under the log URI)",
                        info.state
                    ),
                ));
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            return Err(emr_err(
                "DescribeCluster",
                format!(
                    "cluster {id} not ready after {} s (state {})",
                    timeout.as_secs(),
                    info.state
                ),
            ));
        }
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
}

/// The SSH command that asks Drill's `/status` on the primary node itself.
pub fn drill_probe_command(cfg: &Config, dns: &str) -> Vec<String> {
    let mut cmd = ssh_base(cfg);
    cmd.extend([
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
        format!("hadoop@{dns}"),
        "curl -sf -o /dev/null http://localhost:8047/status".into(),
    ]);
    cmd
}

async fn drill_answers_over_ssh(cfg: &Config, dns: &str) -> bool {
    let cmd = drill_probe_command(cfg, dns);
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(60), run).await,
        Ok(Ok(Ok(s))) if s.success()
    )
}

fn ssh_base(cfg: &Config) -> Vec<String> {
    let c = &cfg.cluster;
    let mut cmd = vec![c.ssh_command.clone()];
    if !c.ssh_key_file.is_empty() {
        cmd.extend(["-i".into(), c.ssh_key_file.clone()]);
    }
    cmd.extend(["-o".into(), "ServerAliveInterval=30".into()]);
    cmd
}

/// The SSH command line for the cluster's primary node (`tunnel`: forward
/// Drill's ports 8047 (web UI, REST) and 31010 (JDBC/ODBC) to localhost
/// instead of a shell).
pub async fn ssh_command(cfg: &Config, id: &str, tunnel: bool) -> Result<Vec<String>> {
    let client = client(cfg).await;
    let (info, _) = describe(&client, id).await?;
    let dns = info.primary_dns.ok_or_else(|| {
        emr_err(
            "DescribeCluster",
            format!("cluster {id} has no primary node address yet ({}): run `fluxcap cluster wait {id}`", info.state),
        )
    })?;
    let mut cmd = ssh_base(cfg);
    if tunnel {
        // Drill's web UI and REST API, and its JDBC/ODBC (user RPC) port.
        cmd.extend([
            "-N".into(),
            "-L".into(),
            "8047:localhost:8047".into(),
            "-L".into(),
            "31010:localhost:31010".into(),
        ]);
    }
    cmd.push(format!("hadoop@{dns}"));
    Ok(cmd)
}
