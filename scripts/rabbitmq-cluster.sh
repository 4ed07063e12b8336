#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside the node on 5672 and with the RabbitMQ
# already installed, for the failover tests (tests/cluster.rs) and the scale-out benchmark
# (`swr-stage-worker bench-fleet`); docs/operations.md.
#
#   bash scripts/rabbitmq-cluster.sh up          start the nodes that are down, join them into one
#                                                cluster, wait until all three answer
#   bash scripts/rabbitmq-cluster.sh down        stop the three nodes and delete their data
#   bash scripts/rabbitmq-cluster.sh status      each node's state; exit 0 when all three run
#   bash scripts/rabbitmq-cluster.sh urls        the AMQP URLs of the three nodes, comma-separated
#   bash scripts/rabbitmq-cluster.sh stop NODE   stop one node cleanly (rabbitmqctl stop)
#   bash scripts/rabbitmq-cluster.sh kill NODE   kill -9 one node's Erlang VM
#   bash scripts/rabbitmq-cluster.sh start NODE  start one node again (it rejoins by itself)
#   bash scripts/rabbitmq-cluster.sh ctl NODE ARGS...   rabbitmqctl against that node
#
# NODE is a, b or c, or its full name. The nodes:
#   rabbit-a@localhost  AMQP 127.0.0.1:5681  distribution 127.0.0.1:25681
#   rabbit-b@localhost  AMQP 127.0.0.1:5682  distribution 127.0.0.1:25682
#   rabbit-c@localhost  AMQP 127.0.0.1:5683  distribution 127.0.0.1:25683
# Each has its own configuration, data, logs and pid file under $RABBITMQ_CLUSTER_DIR
# (default /var/lib/swr-stage-worker/rabbitmq-cluster/<node>), no plugins, and the guest user
# (loopback only, as on any node). They run as the rabbitmq user with its Erlang cookie and
# register with the host's epmd (4369), which starts with the first node if none runs. Nothing
# of the node on 5672 is read or changed: not its rabbitmq.conf, rabbitmq-env.conf,
# enabled_plugins or data.
#
# Idempotent: `up` on a running cluster only checks it; `down` on a stopped one does nothing.
# Run as root.
set -euo pipefail

base=${RABBITMQ_CLUSTER_DIR:-/var/lib/swr-stage-worker/rabbitmq-cluster}
letters=(a b c)
# Longest wait for one node to boot, or for one rabbitmqctl call.
boot_timeout=120

log() { echo "rabbitmq-cluster: $*"; }
die() { echo "rabbitmq-cluster: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it starts nodes as the rabbitmq user)"
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
  || die "RabbitMQ is not installed (/usr/lib/rabbitmq/bin/rabbitmq-server); apt-get install rabbitmq-server"

letter_of() { # a | rabbit-a | rabbit-a@localhost -> a
  local l=${1#rabbit-}
  l=${l%@localhost}
  case $l in a | b | c) echo "$l" ;; *) die "unknown node '$1' (a, b or c)" ;; esac
}
node_of() { echo "rabbit-$1@localhost"; }
port_of() { case $1 in a) echo 5681 ;; b) echo 5682 ;; c) echo 5683 ;; esac; }
dir_of() { echo "$base/$1"; }

# The environment of one node's server: everything it needs is named here, with a clean
# environment otherwise, so neither the caller's variables nor the host node's
# /etc/rabbitmq/rabbitmq-env.conf (whose NODENAME is rabbit@localhost) reach it.
node_env() {
  local l=$1 dir
  dir=$(dir_of "$l")
  echo env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8 \
    RABBITMQ_NODENAME="$(node_of "$l")" \
    RABBITMQ_DIST_PORT=$((20000 + $(port_of "$l"))) \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    ERL_EPMD_ADDRESS=127.0.0.1
}

# rabbitmqctl against one node, as the rabbitmq user (its cookie), bounded.
ctl() {
  local l=$1; shift
  timeout "$boot_timeout" runuser -u rabbitmq -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/var/lib/rabbitmq LANG=C.UTF-8 ERL_EPMD_ADDRESS=127.0.0.1 \
    /usr/lib/rabbitmq/bin/rabbitmqctl -n "$(node_of "$l")" "$@"
}

answers() { ctl "$1" status >/dev/null 2>&1; }

prepare() {
  local l=$1 dir
  dir=$(dir_of "$l")
  install -d -o rabbitmq -g rabbitmq -m 0750 "$base" "$dir" "$dir/mnesia" "$dir/log"
  # The distribution listens on loopback only; the schedulers do not busy-wait, so three idle
  # nodes leave the two cores to the tests.
  cat >"$dir/rabbitmq-env.conf" <<'EOF'
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none"
EOF
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(port_of "$l")
# The nodes share two cores with the tests: keep the background work small.
collect_statistics_interval = 30000
EOF
  echo '[].' >"$dir/enabled_plugins"
  chown rabbitmq:rabbitmq "$dir/rabbitmq-env.conf" "$dir/rabbitmq.conf" "$dir/enabled_plugins"
}

# Starts one node in the background unless it answers already.
start_node() {
  local l=$1
  if answers "$l"; then return 0; fi
  prepare "$l"
  log "starting $(node_of "$l") on 127.0.0.1:$(port_of "$l")"
  # shellcheck disable=SC2046 # node_env prints words meant to be split
  (cd /var/lib/rabbitmq && runuser -u rabbitmq -- $(node_env "$l") \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached)
}

wait_node() {
  local l=$1
  # await_startup waits for the boot to finish (or fail); the loop covers the moment before
  # the VM has registered with epmd, when rabbitmqctl cannot find the node at all.
  for _ in $(seq "$boot_timeout"); do
    if ctl "$l" await_startup --timeout 5 >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  tail -n 20 "$(dir_of "$l")/log/$(node_of "$l").log" >&2 2>/dev/null || true
  die "$(node_of "$l") did not start within ${boot_timeout}s (log: $(dir_of "$l")/log)"
}

# Joins node $1 to rabbit-a's cluster unless it is a member already.
join() {
  local l=$1
  if ctl "$l" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node_of a)\""; then
    return 0
  fi
  log "joining $(node_of "$l") to $(node_of a)"
  # rabbitmqctl prints the joining node's transient start-up complaints on stderr; they are
  # shown only when a step fails.
  local out step
  for step in stop_app reset "join_cluster $(node_of a)" start_app; do
    # shellcheck disable=SC2086 # a step is a command and its argument
    out=$(ctl "$l" $step 2>&1) || die "rabbitmqctl $step on $(node_of "$l") failed: $out"
  done
}

pid_of() {
  local file
  file="$(dir_of "$1")/pid"
  [ -s "$file" ] && cat "$file"
}

# Waits until the node's Erlang VM has exited, for at most $boot_timeout seconds.
wait_gone() {
  local l=$1 pid
  pid=$(pid_of "$l" || true)
  [ -n "$pid" ] || return 0
  for _ in $(seq $((boot_timeout * 10))); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  die "$(node_of "$l") (pid $pid) did not exit within ${boot_timeout}s"
}

up() {
  local started
  started=$(date +%s)
  # All at once: a node that was stopped last waits at boot for the others of its cluster.
  for l in "${letters[@]}"; do start_node "$l"; done
  for l in "${letters[@]}"; do wait_node "$l"; done
  for l in b c; do join "$l"; done
  local running
  running=$(ctl a cluster_status --formatter json | grep -o '"running_nodes":\[[^]]*\]')
  for l in "${letters[@]}"; do
    [[ $running == *"\"$(node_of "$l")\""* ]] || die "$(node_of "$l") is not running in the cluster: $running"
  done
  log "3 nodes running as one cluster ($(urls | tr ',' ' ')) after $(($(date +%s) - started))s"
}

down() {
  for l in "${letters[@]}"; do
    if answers "$l"; then
      log "stopping $(node_of "$l")"
      ctl "$l" stop >/dev/null 2>&1 || true
    fi
    local pid
    pid=$(pid_of "$l" || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
    wait_gone "$l"
  done
  rm -rf "$base"
  log "stopped; data removed"
}

status() {
  local up=0
  for l in "${letters[@]}"; do
    if answers "$l"; then
      echo "$(node_of "$l") running on 127.0.0.1:$(port_of "$l")"
      up=$((up + 1))
    else
      echo "$(node_of "$l") down"
    fi
  done
  [ "$up" = 3 ]
}

urls() {
  local out=() l
  for l in "${letters[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$(port_of "$l")/%2f"); done
  (IFS=,; echo "${out[*]}")
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  urls) urls ;;
  stop)
    l=$(letter_of "${2:?stop NODE}")
    ctl "$l" stop >/dev/null
    wait_gone "$l"
    log "$(node_of "$l") stopped"
    ;;
  kill)
    l=$(letter_of "${2:?kill NODE}")
    pid=$(pid_of "$l") || die "$(node_of "$l") has no pid file"
    kill -9 "$pid"
    wait_gone "$l"
    log "$(node_of "$l") killed (pid $pid)"
    ;;
  start)
    l=$(letter_of "${2:?start NODE}")
    start_node "$l"
    wait_node "$l"
    log "$(node_of "$l") running"
    ;;
  ctl)
    l=$(letter_of "${2:?ctl NODE ARGS...}")
    shift 2
    ctl "$l" "$@"
    ;;
  *) die "usage: $0 up|down|status|urls|stop NODE|kill NODE|start NODE|ctl NODE ARGS..." ;;
esac
