#!/usr/bin/env bash
# EMR bootstrap action written by `fluxcap cluster upload-resources`: installs
# Apache Drill from a tarball in your own S3 bucket (checksum verified) on the
# instance store, configures it for the cluster's ZooKeeper and the fluxcap
# archive, and leaves it to a supervisor (a systemd unit on EMR) that starts it
# once ZooKeeper and Java are there: bootstrap actions run before EMR installs
# its applications, ZooKeeper included, so this script returns at once.
#
# EMR runs bootstrap actions as the unprivileged user `hadoop` (with
# passwordless sudo): privileged steps use sudo, Drill runs as that user.
#
# Usage: bootstrap-drill.sh --tarball s3://…/apache-drill-1.22.0.tar.gz --sha256 HEX
#                           --version 1.22.0 --plugins s3://…/storage-plugins-override.conf
#                           [--hive-plugin s3://…/hive-plugin.conf] [--cluster-id fluxcap]
#                           [--heap 8G] [--direct-memory 16G] [--code-cache 1G]
#                           [--yarn-fraction 0.5]
#
# Memory (heap, direct, code cache) not given is sized from the node: on a core or task
# node YARN's containers take --yarn-fraction of the memory, on the primary node its
# daemons take min(8 GiB, half); Drill gets the rest less 1 GiB for the system, a
# quarter as heap (1–16 GiB), 512 MiB code cache, the remainder as direct memory.
#
# Environment (defaults for EMR; the tests override them):
#   DRILL_BASE      where Drill and its data go (/mnt/drill, the instance store; never /tmp,
#                   a tmpfs on AL2023): <base>/apache-drill-<v>, <base>/drill → it, spill, tmp, udf
#   DRILL_LOG_DIR   Drill's logs (/mnt/var/log/drill: EMR's log pusher ships /mnt/var/log)
#   FETCH           copy command (aws s3 cp)
#   EMR_INFO_DIR    EMR's node description (/mnt/var/lib/info): job-flow.json names the
#                   primary node (ZooKeeper's host), instance.json tells whether this is it
#   ZK_HOST         ZooKeeper's host, instead of job-flow.json's masterPrivateDnsName
#   ZK_PORT         2181                  ZK_WAIT_SECS  give up waiting after this long (3600)
#   DRILL_BIND_ADDR Drill's listening address (0.0.0.0); DRILL_ALLOW_LOOPBACK=true lets it be
#                   127.0.0.1 (Drill refuses a loopback address in distributed mode otherwise)
#   DRILL_HTTP_PORT 8047   DRILL_USER_PORT 31010   DRILL_BIT_PORT 31011
#   ISBUSY_FILE     EMR's idle auto-termination marker (/emr/metricscollector/isbusy)
#   BUSY_INTERVAL   seconds between checks for running Drill queries (60)
#   DRILL_SUPERVISOR  systemd | loop (default: systemd when it runs as PID 1, else loop:
#                   a restarting shell supervisor running the unit's commands)
#   MEMINFO         /proc/meminfo
set -euo pipefail

die() { printf 'bootstrap-drill: %s\n' "$*" >&2; exit 1; }
say() { printf 'bootstrap-drill: %s\n' "$*"; }

tarball="" sha256="" version="" plugins="" hive_plugin="" cluster_id="fluxcap"
heap="" direct="" code_cache="" yarn_fraction="0.5"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tarball) tarball="${2:-}"; shift 2 ;;
    --sha256) sha256="${2:-}"; shift 2 ;;
    --version) version="${2:-}"; shift 2 ;;
    --plugins) plugins="${2:-}"; shift 2 ;;
    --hive-plugin) hive_plugin="${2:-}"; shift 2 ;;
    --cluster-id) cluster_id="${2:-}"; shift 2 ;;
    --heap) heap="${2:-}"; shift 2 ;;
    --direct-memory) direct="${2:-}"; shift 2 ;;
    --code-cache) code_cache="${2:-}"; shift 2 ;;
    --yarn-fraction) yarn_fraction="${2:-}"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n "$tarball" && -n "$sha256" && -n "$version" && -n "$plugins" ]] \
  || die "--tarball, --sha256, --version and --plugins are required"
[[ "$sha256" =~ ^[0-9a-fA-F]{64}$ ]] || die "--sha256 must be 64 hex digits"
[[ "$version" =~ ^[0-9A-Za-z._-]+$ ]] || die "--version must be a plain version such as 1.22.0"
[[ "$cluster_id" =~ ^[0-9A-Za-z._-]+$ ]] || die "--cluster-id must be letters, digits, '.', '_' or '-'"
for m in "$heap" "$direct" "$code_cache"; do
  [[ -z "$m" || "$m" =~ ^[0-9]+[KMGkmg]$ ]] || die "memory sizes look like 512M or 8G, got $m"
done
[[ "$yarn_fraction" =~ ^0(\.[0-9]+)?$ ]] || die "--yarn-fraction must be in [0, 1), got $yarn_fraction"

user="$(id -un)"
base="${DRILL_BASE:-/mnt/drill}"
log_dir="${DRILL_LOG_DIR:-/mnt/var/log/drill}"
fetch="${FETCH:-aws s3 cp --only-show-errors}"
info_dir="${EMR_INFO_DIR:-/mnt/var/lib/info}"
zk_port="${ZK_PORT:-2181}"
zk_wait="${ZK_WAIT_SECS:-3600}"
bind_addr="${DRILL_BIND_ADDR:-0.0.0.0}"
allow_loopback="${DRILL_ALLOW_LOOPBACK:-false}"
[[ "$allow_loopback" == true || "$allow_loopback" == false ]] || die "DRILL_ALLOW_LOOPBACK must be true or false"
http_port="${DRILL_HTTP_PORT:-8047}"
user_port="${DRILL_USER_PORT:-31010}"
bit_port="${DRILL_BIT_PORT:-31011}"
isbusy="${ISBUSY_FILE:-/emr/metricscollector/isbusy}"
busy_interval="${BUSY_INTERVAL:-60}"
meminfo="${MEMINFO:-/proc/meminfo}"

# Privileged steps: sudo unless we are root (EMR: hadoop has passwordless sudo).
priv() { if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo -n "$@"; fi; }

# The primary node runs ZooKeeper; EMR describes the cluster in job-flow.json.
json_field() { sed -n "s/.*\"$2\"[[:space:]]*:[[:space:]]*\"\{0,1\}\([^\",}]*\).*/\1/p" "$1" | head -n 1; }
if [[ -n "${ZK_HOST:-}" ]]; then
  zk_host="$ZK_HOST"
elif [[ -r "$info_dir/job-flow.json" ]]; then
  zk_host="$(json_field "$info_dir/job-flow.json" masterPrivateDnsName)"
else
  zk_host=""
fi
[[ -n "$zk_host" ]] || die "cannot tell the primary node: $info_dir/job-flow.json has no masterPrivateDnsName (set ZK_HOST)"
is_primary=false
if [[ -r "$info_dir/instance.json" && "$(json_field "$info_dir/instance.json" isMaster)" == "true" ]]; then
  is_primary=true
fi

# ---- memory, from the node unless given ----
mem_mib=$(( $(awk '/^MemTotal:/ {print $2}' "$meminfo") / 1024 ))
[[ "$mem_mib" -gt 0 ]] || die "cannot read the node's memory from $meminfo"
if $is_primary; then
  others=$(( mem_mib / 2 < 8192 ? mem_mib / 2 : 8192 ))
else
  others=$(awk -v m="$mem_mib" -v f="$yarn_fraction" 'BEGIN { printf "%d", m * f }')
fi
drill_mib=$(( mem_mib - others - 1024 ))
[[ "$drill_mib" -ge 2560 ]] || drill_mib=2560
auto_heap=$(( drill_mib / 4 )); [[ "$auto_heap" -ge 1024 ]] || auto_heap=1024; [[ "$auto_heap" -le 16384 ]] || auto_heap=16384
auto_direct=$(( drill_mib - auto_heap - 512 )); [[ "$auto_direct" -ge 1024 ]] || auto_direct=1024
heap="${heap:-${auto_heap}M}"
direct="${direct:-${auto_direct}M}"
code_cache="${code_cache:-512M}"

# ---- fetch, verify, unpack (on the instance store, owned by this user) ----
priv mkdir -p "$base" "$log_dir"
priv chown "$user" "$base" "$log_dir"
work="$base/download"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
$fetch "$tarball" "$work/drill.tar.gz" || die "cannot fetch $tarball"
printf '%s  %s\n' "$sha256" "$work/drill.tar.gz" | sha256sum -c --status \
  || die "checksum mismatch for $tarball (expected $sha256): not installed"
home="$base/apache-drill-$version"
rm -rf "$home"
tar -xzf "$work/drill.tar.gz" -C "$base" --no-same-owner
[[ -x "$home/bin/drillbit.sh" ]] || die "$tarball has no apache-drill-$version/bin/drillbit.sh"
ln -sfn "$home" "$base/drill"
mkdir -p "$base/spill" "$base/tmp" "$base/udf" "$base/run" "$base/bin"

# ---- configuration ----
cat > "$home/conf/drill-override.conf" <<CONF
drill.tmp-dir: "$base/tmp"
drill.exec: {
  cluster-id: "$cluster_id",
  zk.connect: "$zk_host:$zk_port",
  rpc.bind_addr: "$bind_addr",
  allow_loopback_address_binding: $allow_loopback,
  rpc.user.server.port: $user_port,
  rpc.bit.server.port: $bit_port,
  http.bind_addr: "$bind_addr",
  http.port: $http_port,
  tmp.directories: ["$base/tmp"],
  spill.directories: ["$base/spill"],
  spill.fs: "file:///",
  trace.directory: "$base/tmp/trace",
  compile.code_dir: "$base/tmp/codegen",
  sys.store.provider.local.path: "$base/tmp/store",
  udf.directory.fs: "file:///",
  udf.directory.root: "$base/udf"
}
# Drill 1.22's asynchronous Parquet page reader fails intermittently ("Stream is
# closed!") on the archive's files read through S3A; the synchronous one does not.
drill.exec.options: {
  store.parquet.reader.pagereader.async: false
}
CONF
cat > "$home/conf/drill-env.sh" <<CONF
export DRILL_HEAP="$heap"
export DRILL_MAX_DIRECT_MEMORY="$direct"
export DRILLBIT_CODE_CACHE_SIZE="$code_cache"
export DRILL_LOG_DIR="$log_dir"
export DRILL_PID_DIR="$base/run"
export DRILL_TMP_DIR="$base/tmp"
export DRILL_JAVA_OPTS="\${DRILL_JAVA_OPTS:-} -Djava.io.tmpdir=$base/tmp"
CONF
$fetch "$plugins" "$work/plugins.conf" || die "cannot fetch $plugins"
sed "s/__PRIMARY__/$zk_host/g" "$work/plugins.conf" > "$home/conf/storage-plugins-override.conf"
if [[ -n "$hive_plugin" ]]; then
  # The hive plugin's jar ships with Drill's distribution; without it the whole
  # override file would be refused, so the plugin is added only when it is there.
  if compgen -G "$home/jars/drill-storage-hive-core-*.jar" >/dev/null; then
    $fetch "$hive_plugin" "$work/hive.conf" || die "cannot fetch $hive_plugin"
    sed "s/__PRIMARY__/$zk_host/g" "$work/hive.conf" >> "$home/conf/storage-plugins-override.conf"
  else
    say "no Hive storage plugin in this Drill (jars/drill-storage-hive-core-*.jar): plugin streams not added"
  fi
fi

# ---- the supervisor's commands ----
# Wait for ZooKeeper and Java (EMR installs both after bootstrap actions).
cat > "$base/bin/wait-for-zookeeper" <<'SH'
#!/usr/bin/env bash
# Exit 0 once ZooKeeper ($1:$2) answers and java runs; 1 after $3 seconds.
deadline=$((SECONDS + $3))
until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && java -version >/dev/null 2>&1; do
  if [[ $SECONDS -ge $deadline ]]; then
    echo "ZooKeeper at $1:$2 (or java) not there after $3 s" >&2
    exit 1
  fi
  sleep 2
done
SH
# Keep EMR's idle auto-termination from ending the cluster under a running
# query: Drill is no YARN application, so touch isbusy while it has queries.
cat > "$base/bin/drill-busy" <<'SH'
#!/usr/bin/env bash
# Every $3 s: when Drill at 127.0.0.1:$1 has running queries, touch $2.
while sleep "$3"; do
  if curl -sf "http://127.0.0.1:$1/profiles.json" 2>/dev/null \
     | tr -d ' \n' | grep -q '"runningQueries":\[{'; then
    if [[ "$(id -u)" == 0 ]]; then touch "$2"; else sudo -n touch "$2"; fi
  fi
done
SH
chmod 755 "$base/bin/wait-for-zookeeper" "$base/bin/drill-busy"

wait_cmd="$base/bin/wait-for-zookeeper $zk_host $zk_port $zk_wait"
run_cmd="$home/bin/drillbit.sh run"
busy_cmd="$base/bin/drill-busy $http_port $isbusy $busy_interval"
cat > "$base/drillbit.service" <<UNIT
[Unit]
Description=Apache Drill $version (fluxcap bootstrap action)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=$user
ExecStartPre=$wait_cmd
ExecStart=$run_cmd
Restart=on-failure
RestartSec=10
TimeoutStartSec=infinity
LimitNOFILE=65536
StandardOutput=append:$log_dir/drillbit.out
StandardError=append:$log_dir/drillbit.out

[Install]
WantedBy=multi-user.target
UNIT
cat > "$base/drill-busy.service" <<UNIT
[Unit]
Description=Mark the EMR cluster busy while Drill runs queries (fluxcap)
After=drillbit.service

[Service]
Type=simple
ExecStart=$busy_cmd
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
UNIT

supervisor="${DRILL_SUPERVISOR:-}"
if [[ -z "$supervisor" ]]; then
  if [[ -d /run/systemd/system ]]; then supervisor=systemd; else supervisor=loop; fi
fi
case "$supervisor" in
  systemd)
    priv cp "$base/drillbit.service" /etc/systemd/system/drillbit.service
    units=(drillbit.service)
    if $is_primary; then
      priv cp "$base/drill-busy.service" /etc/systemd/system/drill-busy.service
      units+=(drill-busy.service)
    fi
    priv systemctl daemon-reload
    # --no-block: the unit waits for ZooKeeper, which comes after this script.
    priv systemctl enable --now --no-block "${units[@]}"
    ;;
  loop)
    # The unit's commands under a shell supervisor: wait, then run Drill and
    # restart it when it fails (Restart=on-failure, RestartSec=10).
    cat > "$base/bin/supervise" <<SH
#!/usr/bin/env bash
$wait_cmd || exit 1
if $is_primary; then $busy_cmd & fi
while true; do
  $run_cmd >> "$log_dir/drillbit.out" 2>&1 &
  echo \$! > "$base/run/drillbit.pid"
  wait \$! && break
  echo "drillbit exited with status \$?; restarting in 10 s" >> "$log_dir/drillbit.out"
  sleep 10
done
SH
    chmod 755 "$base/bin/supervise"
    setsid nohup "$base/bin/supervise" > "$log_dir/supervise.log" 2>&1 < /dev/null &
    echo $! > "$base/run/supervise.pid"
    ;;
  *) die "DRILL_SUPERVISOR must be systemd or loop, got $supervisor" ;;
esac
say "Drill $version installed in $home (heap $heap, direct $direct, code cache $code_cache; logs $log_dir);"
say "supervised by $supervisor, it starts as $user once ZooKeeper at $zk_host:$zk_port answers"
