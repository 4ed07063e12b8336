#!/usr/bin/env bash
# The Docker path end to end (docs/docker.md): a Docker engine, the base images, the project's
# image, the docker-compose.yml stack, the walk-throughs of docs/docker.md run as written, the
# store surviving a worker restart, and the project's test suite against the stack.
#
#   bash scripts/compose-check.sh          all of it, then `docker-compose down -v` (also on failure)
#   bash scripts/compose-check.sh images   only the engine and the base images the files name
#   bash scripts/compose-check.sh down     tear down this script's stack
#
# Run as root. Idempotent; a second run reuses what the first made.
#
# Base images: pulled when a registry answers. Where none does (an offline or air-gapped machine),
# stand-ins are built from Debian packages, with the exact names Dockerfile and
# docker-compose.yml use, and the versions their tags say:
#   debian:bookworm-slim     debootstrap --variant=minbase bookworm, docs, man pages, locales and
#                            apt lists stripped, `docker import`
#   rust:1-bookworm          that tree plus gcc, libc6-dev, ca-certificates, the host's Rust
#                            toolchain (rustc --print sysroot) in /usr/local/rustup with
#                            CARGO_HOME /usr/local/cargo like the real image, and the host's CA
#                            bundle ($SSL_CERT_FILE), the one HTTPS to crates.io is verified with here
#   rabbitmq:4.0-management  debootstrap trixie plus rabbitmq-server (4.0) with the management
#                            plugin, in the foreground, guest/guest from any address
#   postgres:17              debootstrap trixie plus postgresql (17), an entrypoint that honours
#                            POSTGRES_DB, POSTGRES_HOST_AUTH_METHOD and POSTGRES_PASSWORD
# Each stand-in carries a label with the hash of its recipe and is rebuilt when the recipe
# changes. The trees and image tarballs are cached in $SWR_COMPOSE_CACHE. The Debian mirror is
# the host's (scripts/debian-mirror.sh), or $DEBIAN_MIRROR.
#
# The stack runs as its own compose project on ports of its own, beside any RabbitMQ or
# PostgreSQL the machine already has on 5672 and 5432:
#   COMPOSE_PROJECT_NAME          default swr-compose-check
#   SWR_COMPOSE_AMQP_PORT         default 5692    SWR_COMPOSE_MANAGEMENT_PORT  default 15692
#   SWR_COMPOSE_POSTGRES_PORT     default 5452    SWR_COMPOSE_SIM_PORT         default 18092
#   SWR_COMPOSE_TELEMETRY_PORT    default 9474
#   SWR_COMPOSE_CACHE             default /var/cache/swr-stage-worker/compose
#   SWR_COMPOSE_SKIP_SUITE=1      leave out the test suite (the rest still runs)
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${SWR_COMPOSE_CACHE:-/var/cache/swr-stage-worker/compose}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-swr-compose-check}
export SWR_COMPOSE_AMQP_PORT=${SWR_COMPOSE_AMQP_PORT:-5692}
export SWR_COMPOSE_MANAGEMENT_PORT=${SWR_COMPOSE_MANAGEMENT_PORT:-15692}
export SWR_COMPOSE_POSTGRES_PORT=${SWR_COMPOSE_POSTGRES_PORT:-5452}
export SWR_COMPOSE_SIM_PORT=${SWR_COMPOSE_SIM_PORT:-18092}
export SWR_COMPOSE_TELEMETRY_PORT=${SWR_COMPOSE_TELEMETRY_PORT:-9474}
# Docker's own log when this script starts the engine.
dockerd_log=${SWR_DOCKERD_LOG:-/var/log/swr-stage-worker-dockerd.log}
# The label that marks a stand-in and holds its recipe's hash.
label=org.swr-stage-worker.stand-in-recipe

log() { echo "compose-check: $*"; }
die() { echo "compose-check: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, starts dockerd and makes chroots)"

# Prints how long each part took, for the report at the end.
timings=()
part() { # part NAME COMMAND...: runs a part and records its wall time
  part_name=$1 part_start=$SECONDS
  shift
  log "--- $part_name"
  "$@"
  timings+=("$(printf '%-28s %4ss' "$part_name" "$((SECONDS - part_start))")")
  part_name=""
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "$what did not happen within ${seconds}s"
  return 1
}

apt_install() { # apt_install PACKAGE...: once per run an update, then the packages
  if [ -z "${apt_updated:-}" ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- the engine ---------------------------------------------------------------------------------

engine() {
  if ! command -v docker-compose >/dev/null 2>&1; then
    log "installing docker-compose"
    apt_install docker-compose
  fi
  if docker info >/dev/null 2>&1; then
    log "Docker engine $(docker info -f '{{.ServerVersion}}' 2>/dev/null) answers"
    return
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing docker.io"
    apt_install docker.io
  fi
  # No systemd here: dockerd runs in the background of its own session and outlives this script,
  # so its image store and build cache serve the next run. vfs, because it works on any
  # filesystem, including one that is itself an overlay (as in a container).
  log "starting dockerd (log: $dockerd_log)"
  setsid dockerd --storage-driver=vfs >>"$dockerd_log" 2>&1 </dev/null &
  wait_for 60 "docker info answering" docker info \
    || die "dockerd did not come up; see $dockerd_log"
}

# --- stand-in base images -----------------------------------------------------------------------

mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  bash scripts/debian-mirror.sh || die "no Debian mirror in /etc/apt/sources*; set DEBIAN_MIRROR"
}

# Runs a command in a tree, in a private mount namespace with /proc and /dev mounted (they vanish
# with the namespace's last process, so nothing stays mounted on the host). Package scripts never
# start services in it (policy-rc.d).
in_tree() { # in_tree DIR COMMAND...
  local dir=$1; shift
  printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
  chmod 755 "$dir/usr/sbin/policy-rc.d"
  unshare --mount --propagation private -- sh -c '
    dir=$1; shift
    mount -t proc proc "$dir/proc"
    mount --rbind /dev "$dir/dev"
    exec chroot "$dir" "$@"' sh "$dir" \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}

# A pristine debootstrap tree of SUITE, made once and then copied for each stand-in.
minbase() { # minbase SUITE: prints the tree's path
  local suite=$1 dir=$cache/$1-minbase
  if [ ! -e "$dir/.swr-stage-worker-ready" ]; then
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local url
    url=$(mirror)
    log "debootstrap --variant=minbase $suite into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$cache"
    debootstrap --variant=minbase "$suite" "$dir" "$url" >"$dir.debootstrap.log" 2>&1 \
      || die "debootstrap $suite failed; see $dir.debootstrap.log"
    touch "$dir/.swr-stage-worker-ready"
  fi
  echo "$dir"
}

# A fresh working copy of SUITE's tree for a stand-in, made slim: apt and dpkg keep no docs, man
# pages or translations now or in later installs (as the official slim images do), and no apt
# lists or package caches are left in it.
slim_copy() { # slim_copy SUITE DIR
  local base
  base=$(minbase "$1")
  rm -rf "$2"
  cp -a "$base" "$2"
  rm -f "$2/.swr-stage-worker-ready"
  cat >"$2/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
# Stand-in slim image (scripts/compose-check.sh): no docs but copyrights, no man pages or locales.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
  cat >"$2/etc/apt/apt.conf.d/docker-clean" <<'EOF'
# Stand-in slim image (scripts/compose-check.sh): downloaded packages are not kept.
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
}

# Removes what the slim configuration keeps out of later installs, from what debootstrap put in.
slim_strip() { # slim_strip DIR
  local dir=$1
  find "$dir/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
  find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$dir"/usr/share/{man,groff,info,locale,lintian,linda}/* \
    "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/* "$dir"/var/cache/debconf/*-old \
    "$dir"/usr/sbin/policy-rc.d "$dir"/tmp/* "$dir"/root/.[!.]* 2>/dev/null || true
  # The logs of the installation, not the directories packages made for their own logs.
  find "$dir/var/log" -type f -delete
  # Every container gets its own resolver and host names from Docker.
  : >"$dir/etc/resolv.conf"
  : >"$dir/etc/hostname"
}

# Tars a tree and imports it as TAG with the recipe's label and CHANGES (Dockerfile instructions).
import_tree() { # import_tree DIR TAG HASH CHANGE...
  local dir=$1 tag=$2 hash=$3; shift 3
  local tarball=$cache/images/${tag//[:\/]/_}.tar.gz
  mkdir -p "$cache/images"
  tar -C "$dir" --numeric-owner -czf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  echo "$hash" >"$tarball.recipe"
  printf '%s\n' "$@" >"$tarball.changes"
  import_tarball "$tarball" "$tag" "$hash" "$@"
  rm -rf "$dir"
}

import_tarball() { # import_tarball TARBALL TAG HASH CHANGE...
  local tarball=$1 tag=$2 hash=$3; shift 3
  local args=(--change "LABEL $label=$hash")
  local change
  for change in "$@"; do args+=(--change "$change"); done
  docker import "${args[@]}" "$tarball" "$tag" >/dev/null
}

# The recipe of a stand-in: the functions that make it, and anything from the host it copies.
recipe_hash() { # recipe_hash FUNCTION [EXTRA...]
  { declare -f slim_copy slim_strip in_tree "$1"; shift; printf '%s\n' "$@"; } \
    | sha256sum | cut -c1-16
}

standin_debian_slim() { # the recipe for debian:bookworm-slim
  local dir=$cache/work/debian-slim
  slim_copy bookworm "$dir"
  slim_strip "$dir"
  import_tree "$dir" debian:bookworm-slim "$1" 'CMD ["bash"]'
}

standin_rust() { # the recipe for rust:1-bookworm
  local dir=$cache/work/rust sysroot toolchain
  sysroot=$(rustc --print sysroot) || die "no host Rust toolchain (rustc) to copy into rust:1-bookworm"
  toolchain=$(basename "$sysroot")
  slim_copy bookworm "$dir"
  in_tree "$dir" sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates' \
    >"$cache/work/rust.apt.log" 2>&1 || die "installing gcc in the rust stand-in failed; see $cache/work/rust.apt.log"
  # The toolchain without its 800 MB of docs, where the real image keeps it, and cargo's bin
  # directory pointing at it (the real image has rustup's proxies there; this one has no rustup).
  mkdir -p "$dir/usr/local/rustup/toolchains/$toolchain" "$dir/usr/local/cargo/bin"
  tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$dir/usr/local/rustup/toolchains/$toolchain" -x
  local tool
  for tool in "$dir/usr/local/rustup/toolchains/$toolchain"/bin/*; do
    ln -sfn "/usr/local/rustup/toolchains/$toolchain/bin/$(basename "$tool")" \
      "$dir/usr/local/cargo/bin/$(basename "$tool")"
  done
  # The host's CA bundle, after ca-certificates wrote its own: on a machine whose HTTPS goes
  # through an inspecting proxy, only the host's bundle verifies crates.io.
  cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$dir/etc/ssl/certs/ca-certificates.crt"
  slim_strip "$dir"
  import_tree "$dir" rust:1-bookworm "$1" \
    'ENV RUSTUP_HOME=/usr/local/rustup' 'ENV CARGO_HOME=/usr/local/cargo' \
    'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'CMD ["bash"]'
}

standin_rabbitmq() { # the recipe for rabbitmq:4.0-management
  local dir=$cache/work/rabbitmq
  slim_copy trixie "$dir"
  in_tree "$dir" sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server' \
    >"$cache/work/rabbitmq.apt.log" 2>&1 || die "installing rabbitmq-server failed; see $cache/work/rabbitmq.apt.log"
  local version
  version=$(in_tree "$dir" dpkg-query -W -f '${Version}' rabbitmq-server)
  case $version in 4.0.*) ;; *) die "trixie's rabbitmq-server is $version, not 4.0: change the tag in docker-compose.yml and here" ;; esac
  in_tree "$dir" rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
  cat >"$dir/etc/rabbitmq/rabbitmq.conf" <<'EOF'
# Stand-in rabbitmq:4.0-management (scripts/compose-check.sh), configured as the official image:
# guest/guest from any address (loopback_users = none), logs on standard output only.
loopback_users = none
log.console = true
log.console.level = info
log.file = false
EOF
  # Each container makes its own Erlang cookie on its first start, never one baked in.
  rm -f "$dir/var/lib/rabbitmq/.erlang.cookie"
  cat >"$dir/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# Stand-in rabbitmq image: the server in the foreground as user rabbitmq, as PID 1, so
# `docker stop` reaches it. `rabbitmqctl stop_app` stops RabbitMQ, not the Erlang VM, so the
# container keeps running until `start_app` or `stop`.
set -e
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
if [ "$1" = rabbitmq-server ]; then
  shift
  cd /var/lib/rabbitmq
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    env HOME=/var/lib/rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
EOF
  chmod 755 "$dir/usr/local/bin/docker-entrypoint.sh"
  slim_strip "$dir"
  import_tree "$dir" rabbitmq:4.0-management "$1" \
    'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' 'CMD ["rabbitmq-server"]' \
    'EXPOSE 5672 15672' 'ENV LANG=C.UTF-8'
}

standin_postgres() { # the recipe for postgres:17
  local dir=$cache/work/postgres major=17
  slim_copy trixie "$dir"
  # No cluster from the package: the entrypoint makes one on first start, in PGDATA.
  mkdir -p "$dir/etc/postgresql-common"
  echo "create_main_cluster = false" >"$dir/etc/postgresql-common/createcluster.conf"
  in_tree "$dir" sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql-$major" \
    >"$cache/work/postgres.apt.log" 2>&1 || die "installing postgresql-$major failed; see $cache/work/postgres.apt.log"
  cat >"$dir/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# Stand-in postgres image: on the first start initdb in $PGDATA, listen on every address,
# pg_hba with $POSTGRES_HOST_AUTH_METHOD (or scram-sha-256 with $POSTGRES_PASSWORD), create
# $POSTGRES_DB; then the server in the foreground as user postgres. `docker stop` sends SIGTERM,
# which PostgreSQL takes as "wait for every client to leave"; the official image stops with
# SIGINT (fast shutdown) instead, which `docker import` cannot set, so it is passed on as SIGINT.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups env HOME=/var/lib/postgresql "$@"; }
if [ "${1:-}" != postgres ]; then exec "$@"; fi
shift
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  method=${POSTGRES_HOST_AUTH_METHOD:-}
  if [ -z "$method" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
      echo "postgres: set POSTGRES_PASSWORD, or POSTGRES_HOST_AUTH_METHOD (e.g. trust)" >&2
      exit 1
    fi
    method=scram-sha-256
  fi
  as_postgres initdb -D "$PGDATA" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host="$method" >/dev/null
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  printf 'host all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"
  # The set-up server listens on the socket only, so nothing connects before it is done.
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    as_postgres psql -q -v ON_ERROR_STOP=1 -v pw="$POSTGRES_PASSWORD" -U postgres -d postgres \
      -c "ALTER USER postgres PASSWORD :'pw'" >/dev/null
  fi
  db=${POSTGRES_DB:-postgres}
  if [ "$db" != postgres ]; then as_postgres createdb -U postgres "$db"; fi
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "postgres: initialised $PGDATA (database $db, host authentication $method)"
fi
setpriv --reuid=postgres --regid=postgres --init-groups env HOME=/var/lib/postgresql \
  postgres -D "$PGDATA" "$@" &
server=$!
trap 'kill -INT "$server"' TERM INT
# wait returns when the server stops, or when a signal arrives: then again until it has stopped.
set +e
wait "$server"; rc=$?
while kill -0 "$server" 2>/dev/null; do wait "$server"; rc=$?; done
exit "$rc"
EOF
  chmod 755 "$dir/usr/local/bin/docker-entrypoint.sh"
  slim_strip "$dir"
  import_tree "$dir" "postgres:$major" "$1" \
    "ENV PATH=/usr/lib/postgresql/$major/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    'ENV PGDATA=/var/lib/postgresql/data' 'ENV LANG=C.UTF-8' \
    'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' 'CMD ["postgres"]' \
    'EXPOSE 5432' 'VOLUME /var/lib/postgresql/data'
}

# One base image: pulled if a registry answers; otherwise what is here already, if it is a
# pulled image or a stand-in of the current recipe; otherwise a stand-in, from the cached
# tarball if that is of the current recipe, or made anew.
base_image() { # base_image TAG RECIPE-FUNCTION [RECIPE-EXTRA...]
  local tag=$1 recipe=$2; shift 2
  if timeout 600 docker pull -q "$tag" >"$cache/pull.log" 2>&1; then
    log "$tag: pulled"
    return
  fi
  local hash present tarball=$cache/images/${tag//[:\/]/_}.tar.gz
  hash=$(recipe_hash "$recipe" "$@")
  if present=$(docker image inspect -f "{{index .Config.Labels \"$label\"}}" "$tag" 2>/dev/null); then
    if [ "$present" = "$hash" ]; then log "$tag: stand-in $hash, present"; return; fi
    if [ -z "$present" ] || [ "$present" = "<no value>" ]; then log "$tag: present (pulled earlier)"; return; fi
  fi
  log "$tag: cannot be pulled ($(tail -n1 "$cache/pull.log")); making a stand-in"
  if [ -s "$tarball" ] && [ "$(cat "$tarball.recipe" 2>/dev/null)" = "$hash" ]; then
    # Docker's image store lost it (or holds an older recipe's), the cache has the current one.
    local changes
    mapfile -t changes <"$tarball.changes"
    import_tarball "$tarball" "$tag" "$hash" "${changes[@]}"
  else
    "$recipe" "$hash"
  fi
  log "$tag: stand-in $hash, $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=si)B"
}

images() {
  mkdir -p "$cache/work"
  base_image debian:bookworm-slim standin_debian_slim
  # The builder copies the host's toolchain and CA bundle: a new one of either is a new recipe.
  base_image rust:1-bookworm standin_rust "$(rustc --version 2>/dev/null)" \
    "$(sha256sum "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" 2>/dev/null)"
  base_image rabbitmq:4.0-management standin_rabbitmq
  base_image postgres:17 standin_postgres
}

# The base images this script knows how to make stand-ins for must be the ones the files name.
names_match() {
  local named known=" debian:bookworm-slim rust:1-bookworm rabbitmq:4.0-management postgres:17 swr-stage-worker:local "
  for named in $(awk '$1 == "FROM" {print $2}' Dockerfile) \
    $(awk '$1 == "image:" {print $2}' docker-compose.yml); do
    case $known in *" $named "*) ;; *) die "$named (Dockerfile or docker-compose.yml) has no stand-in recipe here" ;; esac
  done
}

# --- the stack ----------------------------------------------------------------------------------

compose() { docker-compose -f docker-compose.yml "$@"; }

down() {
  # -v: the check's volumes go too; --remove-orphans: containers of an older version of the file.
  compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
}

on_exit() {
  local rc=$?
  if [ "$rc" != 0 ] && [ -n "${stack_up:-}" ]; then
    log "failed (exit $rc): the stack as it was"
    compose ps || true
    compose logs --no-color --tail 80 || true
  fi
  if [ -n "${stack_up:-}" ]; then
    log "docker-compose down -v"
    down
  fi
  rm -rf "${work:-/nonexistent}"
  if [ -n "${part_name:-}" ]; then
    timings+=("$(printf '%-28s %4ss  FAILED' "$part_name" "$((SECONDS - part_start))")")
  fi
  if [ "${#timings[@]}" -gt 0 ]; then
    log "wall time per part:"
    printf '  %s\n' "${timings[@]}"
  fi
  exit "$rc"
}

build() {
  # The project's image, as `docker compose up` would build it (both services use the one image).
  compose build worker
  # Under vfs every layer is a full copy of its tree (the builder's are 1-2 GB each), and each
  # source change leaves the last build's layers behind, untagged. The current builder stage
  # gets a tag (a cache hit, seconds), so that its dependency layer stays cached; then the
  # untagged images of earlier builds and of replaced stand-ins go.
  docker build -q --target builder -t swr-stage-worker:builder-cache . >/dev/null
  docker image prune -f >/dev/null
  docker run --rm --read-only swr-stage-worker:local --version | grep -q '^swr-stage-worker ' \
    || die "swr-stage-worker --version does not answer in the image"
  log "image swr-stage-worker:local: $(docker run --rm --read-only swr-stage-worker:local --version), $(docker image inspect -f '{{.Size}}' swr-stage-worker:local | numfmt --to=si)B"
  [ "$(docker image inspect -f '{{.Config.User}}' swr-stage-worker:local)" = swr:swr ] \
    || die "the image does not run as user swr"
}

healthy() { # healthy: every service's container is running and its health check passes
  local ids id state
  ids=$(compose ps -q)
  [ "$(wc -w <<<"$ids")" = 4 ] || return 1
  for id in $ids; do
    state=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    [ "$state" = running/healthy ] || return 1
  done
}

up() {
  down
  # A port that something else on the machine already listens on would fail `up` with a
  # userland-proxy error; say which variable moves it instead.
  local var
  for var in SWR_COMPOSE_AMQP_PORT SWR_COMPOSE_MANAGEMENT_PORT SWR_COMPOSE_POSTGRES_PORT \
    SWR_COMPOSE_SIM_PORT SWR_COMPOSE_TELEMETRY_PORT; do
    if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/${!var}" 2>/dev/null; then
      die "127.0.0.1:${!var} is taken by another program; set $var to a free port"
    fi
  done
  stack_up=1
  compose up -d --no-build
  wait_for 240 "every service healthy" healthy || { compose ps; die "the stack did not become healthy"; }
  compose ps
}

# The fenced code blocks of LANG in docs/docker.md, the Nth (1-based) of them.
doc_block() { # doc_block LANG N
  awk -v lang="$1" -v n="$2" '
    /^```/ { if (inside) { inside = 0; next } if ($0 == "```" lang) { count++; inside = (count == n); next } }
    inside { print }' docs/docker.md
}

# docs/docker.md's "With curl and the management HTTP API", as written, against the check's
# ports (the block reads SIM_URL and MANAGEMENT_URL); each "# → X" line in it must be printed.
walkthrough_curl() {
  local block output expected
  block=$(doc_block sh 2)
  grep -q '/_sim/rules' <<<"$block" || die "docs/docker.md's second sh block is not the curl walk-through"
  output=$(SIM_URL=http://127.0.0.1:$SWR_COMPOSE_SIM_PORT \
    MANAGEMENT_URL=http://127.0.0.1:$SWR_COMPOSE_MANAGEMENT_PORT \
    bash -euo pipefail -c "$block")
  printf '%s\n' "$output"
  while IFS= read -r expected; do
    grep -qF -- "$(tr -d ' ' <<<"$expected")" <<<"$(tr -d ' ' <<<"$output")" \
      || die "the curl walk-through did not print $expected"
  done < <(grep -o '# → .*' <<<"$block" | sed 's/^# → //')
}

# docs/docker.md's "With Python and pika": its test file, run with pytest as the page says.
walkthrough_python() {
  if ! python3 -c 'import pika, pytest' >/dev/null 2>&1; then
    log "pip install pika pytest"
    python3 -m pip install -q pika pytest >/dev/null
  fi
  doc_block python 1 >"$work/test_swr_stage.py"
  grep -q '^def test_' "$work/test_swr_stage.py" || die "docs/docker.md has no Python test"
  (cd "$work" && AMQP_URL=$amqp_url SIM_URL=http://127.0.0.1:$SWR_COMPOSE_SIM_PORT \
    python3 -m pytest -q -p no:cacheprovider test_swr_stage.py)
}

# A key finished before `docker-compose restart worker` is answered from the store after it:
# replayed, and SWR still ran it once.
restart_keeps_the_store() {
  local key=restart-check-$$-$RANDOM
  publish_and_expect "$key" false
  local started
  started=$(docker inspect -f '{{.State.StartedAt}}' "$(compose ps -q worker)")
  compose restart worker
  wait_for 120 "the worker restarted and healthy" bash -c '
    id=$(docker-compose -f docker-compose.yml ps -q worker)
    [ "$(docker inspect -f "{{.State.StartedAt}}" "$id")" != "$1" ] &&
    [ "$(docker inspect -f "{{.State.Health.Status}}" "$id")" = healthy ]' _ "$started" \
    || die "the worker did not come back healthy after a restart"
  publish_and_expect "$key" true
  log "after a worker restart, $key was replayed from the store; SWR ran it once"
}

publish_and_expect() { # publish_and_expect KEY REPLAYED: with the Python walk-through's helpers
  (cd "$work" && AMQP_URL=$amqp_url SIM_URL=http://127.0.0.1:$SWR_COMPOSE_SIM_PORT \
    python3 - "$1" "$2" <<'PY'
import json, sys
import pika
from test_swr_stage import AMQP_URL, next_outcome, sim

key, replayed = sys.argv[1], sys.argv[2] == "true"
connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
channel = connection.channel()
channel.confirm_delivery()
outcomes = channel.queue_declare("", exclusive=True).method.queue
channel.queue_bind(outcomes, "swr.stage.results", routing_key="stage.#")
request = json.dumps({"pipeline_id": 45, "stage_index": 1, "idempotency_key": key})
channel.basic_publish("", "swr.stage.requests", request,
                      pika.BasicProperties(content_type="application/json", delivery_mode=2),
                      mandatory=True)
_, outcome = next_outcome(channel, outcomes, key)
assert outcome["status"] == "succeeded", outcome
assert outcome["replayed"] is replayed, outcome
assert sim("GET", "/_sim/executions")[key] == 1
connection.close()
PY
  )
}

# The project's suite against the stack, as docs/docker.md gives it, then its serial step.
suite() {
  (
    export AMQP_URL=$amqp_url
    export IDEMPOTENCY_TEST_URL=postgres://postgres@127.0.0.1:$SWR_COMPOSE_POSTGRES_PORT/test
    # tests/tls.rs needs a TLS listener, which the stack has not: it keeps to the host's node
    # (5671, with its plain URL and its own rabbitmqctl), as in .ci/run's 4.x run.
    export SWR_TEST_TLS_AMQP_URL=${SWR_TEST_TLS_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
    if [ -z "${SWR_TEST_TLS_RABBITMQCTL:-}" ] && command -v rabbitmqctl >/dev/null 2>&1; then
      SWR_TEST_TLS_RABBITMQCTL=$(command -v rabbitmqctl)
      export SWR_TEST_TLS_RABBITMQCTL
    fi
    export PATH="$PWD/docker:$PATH"
    # The cluster tests use the host's three-node cluster, not the stack, and ran in .ci/run's
    # 3.10 pass.
    export SWR_TEST_CLUSTER=skip
    # Both steps run, so a failure in the first does not hide the second's result.
    rc=0
    cargo nextest run --no-fail-fast || rc=1
    cargo nextest run --no-fail-fast --run-ignored only --test-threads 1 || rc=1
    exit "$rc"
  )
}

all() {
  trap on_exit EXIT
  work=$(mktemp -d)
  amqp_url=amqp://guest:guest@127.0.0.1:$SWR_COMPOSE_AMQP_PORT/%2f
  names_match
  part engine engine
  part "base images" images
  part "build the image" build
  part "up, healthy" up
  part "curl walk-through" walkthrough_curl
  part "Python walk-through" walkthrough_python
  part "restart keeps the store" restart_keeps_the_store
  if [ "${SWR_COMPOSE_SKIP_SUITE:-}" != 1 ]; then
    part "test suite" suite
  fi
  part "down" down
  stack_up=""
  log "passed"
}

case "${1:-all}" in
  all) all ;;
  images) names_match; engine; images ;;
  down) down ;;
  *) echo "usage: $0 [all|images|down]" >&2; exit 2 ;;
esac
