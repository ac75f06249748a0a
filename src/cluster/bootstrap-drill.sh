#!/usr/bin/env bash
# EMR bootstrap action written by `fluxcap cluster upload-resources`: installs
# Apache Drill from a tarball in your own S3 bucket (checksum verified),
# configures it for the cluster's ZooKeeper and the fluxcap archive, and starts
# it in the background once ZooKeeper answers (bootstrap actions run before
# EMR installs its applications, ZooKeeper included).
#
# Usage: bootstrap-drill.sh --tarball s3://…/apache-drill-1.22.0.tar.gz --sha256 HEX
#                           --version 1.22.0 --plugins s3://…/storage-plugins-override.conf
#                           [--cluster-id fluxcap]
# Environment (defaults for EMR; tests override them):
#   DRILL_PREFIX   where Drill goes (/opt)                FETCH   copy command (aws s3 cp)
#   ZK_HOST        ZooKeeper host (the primary node)      ZK_PORT 2181
#   ZK_WAIT_SECS   give up waiting after this long (3600) DRILL_HEAP / DRILL_MAX_DIRECT_MEMORY
set -euo pipefail

die() { printf 'bootstrap-drill: %s\n' "$*" >&2; exit 1; }

tarball="" sha256="" version="" plugins="" cluster_id="fluxcap"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tarball) tarball="${2:-}"; shift 2 ;;
    --sha256) sha256="${2:-}"; shift 2 ;;
    --version) version="${2:-}"; shift 2 ;;
    --plugins) plugins="${2:-}"; shift 2 ;;
    --cluster-id) cluster_id="${2:-}"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n "$tarball" && -n "$sha256" && -n "$version" && -n "$plugins" ]] \
  || die "--tarball, --sha256, --version and --plugins are required"
[[ "$sha256" =~ ^[0-9a-fA-F]{64}$ ]] || die "--sha256 must be 64 hex digits"

prefix="${DRILL_PREFIX:-/opt}"
fetch="${FETCH:-aws s3 cp}"
zk_port="${ZK_PORT:-2181}"
zk_wait="${ZK_WAIT_SECS:-3600}"

# The primary node runs ZooKeeper; EMR describes the cluster in job-flow.json.
primary_host() {
  local info=/mnt/var/lib/info/job-flow.json
  if [[ -n "${ZK_HOST:-}" ]]; then
    printf '%s' "$ZK_HOST"
  elif [[ -r "$info" ]]; then
    sed -n 's/.*"masterPrivateDnsName"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$info" | head -n 1
  else
    hostname -f
  fi
}
zk_host="$(primary_host)"
[[ -n "$zk_host" ]] || die "cannot tell the primary node (set ZK_HOST)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
$fetch "$tarball" "$work/drill.tar.gz" || die "cannot fetch $tarball"
printf '%s  %s\n' "$sha256" "$work/drill.tar.gz" | sha256sum -c --status \
  || die "checksum mismatch for $tarball (expected $sha256)"
mkdir -p "$prefix"
tar -xzf "$work/drill.tar.gz" -C "$prefix"
home="$prefix/apache-drill-$version"
[[ -x "$home/bin/drillbit.sh" ]] || die "$tarball has no apache-drill-$version/bin/drillbit.sh"
ln -sfn "$home" "$prefix/drill"

cat > "$home/conf/drill-override.conf" <<CONF
drill.exec: {
  cluster-id: "$cluster_id",
  zk.connect: "$zk_host:$zk_port"
}
CONF
cat > "$home/conf/drill-env.sh" <<CONF
export DRILL_HEAP="${DRILL_HEAP:-4G}"
export DRILL_MAX_DIRECT_MEMORY="${DRILL_MAX_DIRECT_MEMORY:-8G}"
CONF
$fetch "$plugins" "$work/plugins.conf" || die "cannot fetch $plugins"
sed "s/__PRIMARY__/$zk_host/g" "$work/plugins.conf" > "$home/conf/storage-plugins-override.conf"

# Start Drill once ZooKeeper answers, in the background: EMR installs
# ZooKeeper only after every bootstrap action has finished. (The single
# quotes are on purpose: the waiter expands its own arguments.)
# shellcheck disable=SC2016
nohup bash -c '
  deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    [[ $SECONDS -lt $deadline ]] || { echo "ZooKeeper at $1:$2 never answered" >&2; exit 1; }
    sleep 2
  done
  "$4/bin/drillbit.sh" start
' waiter "$zk_host" "$zk_port" "$zk_wait" "$home" > "$prefix/drill-start.log" 2>&1 &
echo "bootstrap-drill: Drill $version installed in $home; it starts once ZooKeeper at $zk_host:$zk_port answers"
