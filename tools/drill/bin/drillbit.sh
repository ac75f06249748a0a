#!/usr/bin/env bash
# drillbit.sh — fluxcap's launcher for a Drill installation assembled from Drill's jars
# (tools/drill/pom.xml; the binary distribution is not on Maven Central). It takes the
# same commands and settings as the distribution's bin/drillbit.sh that the bootstrap
# action uses on EMR:
#
#   drillbit.sh start | stop | status | run     (run: in the foreground, for systemd)
#
# Settings come from $DRILL_CONF_DIR/drill-env.sh (default <home>/conf), as in the
# distribution: DRILL_HEAP, DRILL_MAX_DIRECT_MEMORY, DRILLBIT_CODE_CACHE_SIZE,
# DRILL_LOG_DIR, DRILL_PID_DIR, DRILL_JAVA_OPTS, JAVA_HOME. The classpath is
# conf/ then jars/*: drill-override.conf, storage-plugins-override.conf,
# core-site.xml and logback.xml are read from conf/.
set -euo pipefail

home="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRILL_CONF_DIR="${DRILL_CONF_DIR:-$home/conf}"
# shellcheck disable=SC1091
[[ -r "$DRILL_CONF_DIR/drill-env.sh" ]] && . "$DRILL_CONF_DIR/drill-env.sh"
DRILL_HEAP="${DRILL_HEAP:-4G}"
DRILL_MAX_DIRECT_MEMORY="${DRILL_MAX_DIRECT_MEMORY:-8G}"
DRILLBIT_CODE_CACHE_SIZE="${DRILLBIT_CODE_CACHE_SIZE:-1G}"
DRILL_LOG_DIR="${DRILL_LOG_DIR:-$home/log}"
DRILL_PID_DIR="${DRILL_PID_DIR:-$home}"
java="${JAVA_HOME:+$JAVA_HOME/bin/}java"
pidfile="$DRILL_PID_DIR/drillbit.pid"

die() { printf 'drillbit.sh: %s\n' "$*" >&2; exit 1; }

command -v "$java" >/dev/null 2>&1 || die "no java (set JAVA_HOME or put java on PATH)"
mkdir -p "$DRILL_LOG_DIR" "$DRILL_PID_DIR" 2>/dev/null || true
[[ -w "$DRILL_LOG_DIR" ]] || die "log directory $DRILL_LOG_DIR is not writable by $(id -un)"

# Java 17: Drill and its Netty use JDK internals.
opens=(
  --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  --add-opens java.base/java.nio=ALL-UNNAMED
  --add-opens java.base/java.net=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.security.jgss/sun.security.krb5=ALL-UNNAMED
)
# shellcheck disable=SC2206
extra=(${DRILL_JAVA_OPTS:-})
cmd=(
  "$java" "-Xms$DRILL_HEAP" "-Xmx$DRILL_HEAP"
  "-XX:MaxDirectMemorySize=$DRILL_MAX_DIRECT_MEMORY"
  "-XX:ReservedCodeCacheSize=$DRILLBIT_CODE_CACHE_SIZE"
  "${opens[@]}" -Dio.netty.tryReflectionSetAccessible=true
  "-Dlog.path=$DRILL_LOG_DIR/drillbit.log" "-Dlog.query.path=$DRILL_LOG_DIR/drillbit_queries.json"
  "${extra[@]}"
  -cp "$DRILL_CONF_DIR:$home/jars/*"
  org.apache.drill.exec.server.Drillbit
)

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
  run)
    exec "${cmd[@]}"
    ;;
  start)
    running && die "already running as process $(cat "$pidfile")"
    nohup "${cmd[@]}" > "$DRILL_LOG_DIR/drillbit.out" 2>&1 < /dev/null &
    echo $! > "$pidfile"
    echo "drillbit started (process $!), log $DRILL_LOG_DIR/drillbit.log"
    ;;
  stop)
    if running; then
      pid="$(cat "$pidfile")"
      kill "$pid"
      for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      echo "drillbit stopped"
    else
      echo "no drillbit running"
    fi
    rm -f "$pidfile"
    ;;
  status)
    if running; then echo "drillbit is running (process $(cat "$pidfile"))"; else echo "drillbit is not running"; exit 1; fi
    ;;
  *)
    die "usage: drillbit.sh start|stop|status|run"
    ;;
esac
