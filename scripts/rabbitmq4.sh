#!/usr/bin/env bash
# A second RabbitMQ node, 4.x from Debian trixie, in a chroot beside the host's 3.10 node, so the
# test suite can run against both (README "Tests", docs/contract.md "RabbitMQ 3.10–3.13 and 4.x").
#
#   bash scripts/rabbitmq4.sh up      make or reuse the chroot, start the node, wait until it answers
#   bash scripts/rabbitmq4.sh down    stop the node (and its epmd)
#   bash scripts/rabbitmq4.sh status  say whether it answers (exit 0) or not (exit 1)
#
# Run as root. Idempotent: `up` reuses a finished chroot and a running node. The node:
#   NODENAME rabbit4@localhost, AMQP on 127.0.0.1:5673, distribution on 127.0.0.1:25673,
#   epmd on 127.0.0.1:4370, data and logs under the chroot's /var/lib and /var/log/rabbitmq,
#   its own Erlang cookie (the chroot's /var/lib/rabbitmq/.erlang.cookie).
# `up` also writes $RABBITMQ4_BIN/rabbitmqctl, which runs the chroot's rabbitmqctl against this
# node only; put that directory first on PATH to point the broker-fault tests at the 4.x node.
#
#   RABBITMQ4_CHROOT  the chroot (default /var/cache/swr-stage-worker/rabbitmq4-trixie)
#   RABBITMQ4_BIN     the wrapper's directory (default $RABBITMQ4_CHROOT-bin)
#   RABBITMQ4_MIRROR  the Debian mirror (default: the first Debian mirror in the host's apt sources)
set -euo pipefail

dir=${RABBITMQ4_CHROOT:-/var/cache/swr-stage-worker/rabbitmq4-trixie}
bin=${RABBITMQ4_BIN:-$dir-bin}
node=rabbit4@localhost
amqp_port=5673
dist_port=25673
# The node gets an epmd of its own on 4370 rather than sharing the host's on 4369. Sharing would
# work (node names differ, and epmd's protocol is the same across OTP releases), but then the 4.x
# node would depend on a daemon that belongs to the host's 3.10 installation and may be missing
# on a fresh machine or restarted with it; with its own port, `down` can stop everything `up`
# started and nothing of the host's is touched. Both the server and the wrapper set it.
epmd_port=4370
ready=$dir/.swr-stage-worker-ready

log() { echo "rabbitmq4: $*"; }
die() { echo "rabbitmq4: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it makes a chroot and starts a node in it)"

# The environment every command inside the chroot runs with: the node's name, ports and epmd.
node_env=(
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8
  RABBITMQ_NODENAME=$node ERL_EPMD_PORT=$epmd_port ERL_EPMD_ADDRESS=127.0.0.1
)

# Runs a command in the chroot, in a private mount namespace with /proc and /dev mounted: the
# mounts belong to that namespace and vanish with its last process, so none is left on the host.
in_chroot() {
  unshare --mount --propagation private -- sh -c '
    dir=$1; shift
    mount -t proc proc "$dir/proc"
    mount --rbind /dev "$dir/dev"
    exec chroot "$dir" "$@"' sh "$dir" "${node_env[@]}" "$@"
}

# The first Debian mirror in the host's apt sources (scripts/debian-mirror.sh).
mirror() {
  if [ -n "${RABBITMQ4_MIRROR:-}" ]; then echo "$RABBITMQ4_MIRROR"; return; fi
  bash "$(dirname "${BASH_SOURCE[0]}")/debian-mirror.sh" \
    || die "no Debian mirror in /etc/apt/sources*; set RABBITMQ4_MIRROR"
}

answers() {
  [ -x "$dir/usr/sbin/rabbitmqctl" ] || return 1
  timeout 30 chroot "$dir" "${node_env[@]}" /usr/sbin/rabbitmqctl -n "$node" -q status \
    >/dev/null 2>&1 || return 1
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$amqp_port" 2>/dev/null
}

make_chroot() {
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
  fi
  local url
  url=$(mirror)
  if [ ! -x "$dir/usr/bin/apt-get" ]; then
    log "debootstrap trixie into $dir"
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    debootstrap --variant=minbase trixie "$dir" "$url" >"$dir.debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $dir.debootstrap.log"
  fi
  # Services are never started by package scripts inside the chroot; this script starts the node.
  printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
  chmod 755 "$dir/usr/sbin/policy-rc.d"
  cp /etc/hosts "$dir/etc/hosts"
  log "apt-get install rabbitmq-server in the chroot"
  in_chroot env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server' \
    >"$dir.apt.log" 2>&1 || die "installing rabbitmq-server failed; see $dir.apt.log"
  configure
  touch "$ready"
}

configure() {
  mkdir -p "$dir/etc/rabbitmq" "$dir/var/lib/rabbitmq" "$dir/var/log/rabbitmq"
  cat >"$dir/etc/rabbitmq/rabbitmq-env.conf" <<EOF
# Written by scripts/rabbitmq4.sh: a second node beside the host's, on its own ports.
NODENAME=$node
DIST_PORT=$dist_port
MNESIA_BASE=/var/lib/rabbitmq/mnesia
LOG_BASE=/var/log/rabbitmq
EOF
  cat >"$dir/etc/rabbitmq/rabbitmq.conf" <<EOF
# Written by scripts/rabbitmq4.sh.
listeners.tcp.default = 127.0.0.1:$amqp_port
# The CLI and the distribution listen on loopback only.
distribution.listener.interface = 127.0.0.1
EOF
  local cookie=$dir/var/lib/rabbitmq/.erlang.cookie
  if [ ! -s "$cookie" ]; then
    # A cookie of the node's own, never the host's.
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$cookie"
  fi
  in_chroot chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
  chmod 400 "$cookie"
}

write_wrapper() {
  mkdir -p "$bin"
  cat >"$bin/rabbitmqctl.tmp" <<EOF
#!/bin/sh
# Written by scripts/rabbitmq4.sh: rabbitmqctl for the 4.x node $node only (never the host's).
exec chroot '$dir' env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8 \\
  ERL_EPMD_PORT=$epmd_port RABBITMQ_NODENAME=$node \\
  /usr/sbin/rabbitmqctl -n $node "\$@"
EOF
  chmod 755 "$bin/rabbitmqctl.tmp"
  mv "$bin/rabbitmqctl.tmp" "$bin/rabbitmqctl"
}

up() {
  local start=$SECONDS
  if [ ! -e "$ready" ]; then make_chroot; else configure; fi
  write_wrapper
  if answers; then
    log "$node already answers on 127.0.0.1:$amqp_port"
  else
    log "starting $node"
    # setsid: the node outlives this script and its session. Its /proc and /dev mounts live in
    # its own mount namespace (in_chroot) and go away when it stops.
    setsid bash -c "$(declare -f in_chroot); $(declare -p dir node_env); \
      in_chroot /usr/sbin/rabbitmq-server" >"$dir.server.log" 2>&1 </dev/null &
    local ok=0
    for _ in $(seq 120); do
      if timeout 60 chroot "$dir" "${node_env[@]}" /usr/sbin/rabbitmqctl -n "$node" -q \
        await_startup --timeout 5 >/dev/null 2>&1 && answers; then
        ok=1; break
      fi
      sleep 1
    done
    [ "$ok" = 1 ] || die "$node did not answer within 120 tries; see $dir.server.log and $dir/var/log/rabbitmq"
  fi
  local version
  version=$(chroot "$dir" "${node_env[@]}" /usr/sbin/rabbitmqctl -n "$node" -q version 2>/dev/null || true)
  log "$node (RabbitMQ $version) answers on 127.0.0.1:$amqp_port after $((SECONDS - start))s"
  log "wrapper: $bin/rabbitmqctl"
}

down() {
  if answers; then
    log "stopping $node"
    chroot "$dir" "${node_env[@]}" /usr/sbin/rabbitmqctl -n "$node" -q stop >/dev/null
  else
    log "$node is not running"
  fi
  # The node's own epmd, by its pid, and only if it runs inside this chroot.
  local pid
  for pid in $(ss -Hltnp "sport = :$epmd_port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    if [ "$(readlink "/proc/$pid/root")" = "$(readlink -f "$dir")" ]; then
      kill "$pid" 2>/dev/null || true
    fi
  done
}

status() {
  if answers; then
    log "$node answers on 127.0.0.1:$amqp_port"
  else
    log "$node does not answer"
    return 1
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
