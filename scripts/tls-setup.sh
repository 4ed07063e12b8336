#!/usr/bin/env bash
# Turns on TLS for the local test services, with a throwaway CA, so that the TLS tests run against
# real servers: RabbitMQ's TLS listener on 127.0.0.1:5671 (with the rabbitmq_auth_mechanism_ssl
# plugin, for client certificates) and PostgreSQL's `ssl = on` with a certificate of that CA.
#
# Idempotent: on a fresh machine it makes everything; where it ran before it reuses the
# certificates (until a day before they expire) and restarts RabbitMQ only when its TLS listener
# is not up with them. Run as root, before the test command (.ci/run does).
#
#   SWR_TEST_TLS_DIR  where the CA and certificates go (default /var/lib/swr-stage-worker/test-tls);
#                     the tests read it from the same variable.
set -euo pipefail

dir=${SWR_TEST_TLS_DIR:-/var/lib/swr-stage-worker/test-tls}
amqps_port=5671
client_user=swr-tls-client
marker_begin="# BEGIN swr-stage-worker test TLS"
marker_end="# END swr-stage-worker test TLS"

log() { echo "tls-setup: $*"; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "tls-setup: $what did not come up within ${seconds}s" >&2
  return 1
}

fresh() { # fresh FILE: exists and is valid for at least another day
  [ -s "$1" ] && openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1
}

make_certificates() {
  mkdir -p "$dir"
  chmod 755 "$dir"
  local tmp
  tmp=$(mktemp -d)
  # The test CA, and a second CA that signed nothing the servers use (a "wrong root").
  for ca in ca other-ca; do
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
      -subj "/CN=swr-stage-worker test ${ca}" \
      -keyout "$tmp/$ca.key" -out "$tmp/$ca.pem" >/dev/null 2>&1
  done
  # The servers' certificate: valid for localhost and 127.0.0.1, nothing else.
  cat >"$tmp/server.ext" <<EOF
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
EOF
  openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
    -keyout "$tmp/server.key" -out "$tmp/server.csr" >/dev/null 2>&1
  openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -CAcreateserial -days 825 -sha256 -extfile "$tmp/server.ext" -out "$tmp/server.pem" >/dev/null 2>&1
  # A client certificate whose CN is a RabbitMQ user (EXTERNAL login).
  cat >"$tmp/client.ext" <<EOF
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
EOF
  openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=${client_user}" \
    -keyout "$tmp/client.key" -out "$tmp/client.csr" >/dev/null 2>&1
  openssl x509 -req -in "$tmp/client.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -CAcreateserial -days 825 -sha256 -extfile "$tmp/client.ext" -out "$tmp/client.pem" >/dev/null 2>&1
  # PKCS#8 keys: what every TLS library reads.
  for key in server client; do
    openssl pkcs8 -topk8 -nocrypt -in "$tmp/$key.key" -out "$tmp/$key.pk8" >/dev/null 2>&1
    mv "$tmp/$key.pk8" "$tmp/$key.key"
  done
  cp "$tmp"/{ca,other-ca,server,client}.pem "$tmp"/{server,client}.key "$dir"/
  chmod 644 "$dir"/*.pem "$dir"/*.key
  rm -rf "$tmp"
  log "made a CA and certificates in $dir"
}

if fresh "$dir/ca.pem" && fresh "$dir/server.pem" && fresh "$dir/client.pem" && [ -s "$dir/server.key" ]; then
  log "reusing the certificates in $dir"
else
  make_certificates
fi

# --- RabbitMQ: a TLS listener on 5671 and the EXTERNAL mechanism ---------------------------------
rabbit_dir=/etc/rabbitmq/swr-test-tls
mkdir -p "$rabbit_dir"
changed=0
for f in ca.pem server.pem server.key; do
  if ! cmp -s "$dir/$f" "$rabbit_dir/$f"; then
    cp "$dir/$f" "$rabbit_dir/$f"
    changed=1
  fi
done
chown -R rabbitmq:rabbitmq "$rabbit_dir"
chmod 600 "$rabbit_dir/server.key"

conf=/etc/rabbitmq/rabbitmq.conf
touch "$conf"
block=$(cat <<EOF
$marker_begin
listeners.ssl.default = 127.0.0.1:${amqps_port}
ssl_options.cacertfile = ${rabbit_dir}/ca.pem
ssl_options.certfile = ${rabbit_dir}/server.pem
ssl_options.keyfile = ${rabbit_dir}/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_cert_login_from = common_name
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
$marker_end
EOF
)
current=$(sed -n "/^${marker_begin}\$/,/^${marker_end}\$/p" "$conf")
if [ "$current" != "$block" ]; then
  sed -i "/^${marker_begin}\$/,/^${marker_end}\$/d" "$conf"
  printf '%s\n' "$block" >>"$conf"
  changed=1
  log "wrote the TLS listener into $conf"
fi
if ! grep -q rabbitmq_auth_mechanism_ssl /etc/rabbitmq/enabled_plugins 2>/dev/null; then
  rabbitmq-plugins enable --offline rabbitmq_auth_mechanism_ssl >/dev/null
  changed=1
fi

listening() { bash -c "exec 3<>/dev/tcp/127.0.0.1/${amqps_port}" 2>/dev/null; }
if [ "$changed" = 1 ] || ! listening; then
  log "restarting RabbitMQ for its TLS listener"
  if rabbitmqctl status >/dev/null 2>&1; then
    rabbitmqctl stop >/dev/null 2>&1 || true
    wait_for 60 "RabbitMQ to stop" bash -c '! rabbitmqctl status'
  fi
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for 120 "RabbitMQ" rabbitmqctl status
  wait_for 60 "RabbitMQ on 127.0.0.1:5672" bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672'
fi
wait_for 60 "RabbitMQ's TLS listener on 127.0.0.1:${amqps_port}" listening
# The user a client certificate logs in as (EXTERNAL takes the certificate's CN); it has no password.
if ! rabbitmqctl list_users --silent 2>/dev/null | awk '{print $1}' | grep -qx "$client_user"; then
  rabbitmqctl add_user "$client_user" "$(openssl rand -hex 24)" >/dev/null
  rabbitmqctl clear_password "$client_user" >/dev/null
fi
rabbitmqctl set_permissions -p / "$client_user" '.*' '.*' '.*' >/dev/null

# --- PostgreSQL: ssl = on with the test CA's certificate -----------------------------------------
pg_version=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_conf_dir=/etc/postgresql/${pg_version}/main
pg_tls=${pg_conf_dir}/swr-test-tls
mkdir -p "$pg_tls"
for f in ca.pem server.pem server.key; do cp "$dir/$f" "$pg_tls/$f"; done
chown -R postgres:postgres "$pg_tls"
chmod 600 "$pg_tls/server.key"
pg_drop_in=${pg_conf_dir}/conf.d/swr-test-tls.conf
cat >"$pg_drop_in" <<EOF
# Written by swr-stage-worker's scripts/tls-setup.sh: TLS with the test CA's certificate.
ssl = on
ssl_cert_file = '${pg_tls}/server.pem'
ssl_key_file = '${pg_tls}/server.key'
ssl_ca_file = '${pg_tls}/ca.pem'
EOF
if pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  # SSL settings take effect on reload.
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload >/dev/null
else
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || true
  wait_for 60 "PostgreSQL" pg_isready -h 127.0.0.1 -p 5432
fi
# The reload is asynchronous: wait until a TLS session presents the new certificate.
wait_for 30 "PostgreSQL TLS with the test certificate" bash -c \
  "echo | openssl s_client -starttls postgres -connect 127.0.0.1:5432 -CAfile '$dir/ca.pem' -verify_return_error 2>/dev/null | grep -q 'Verify return code: 0'"
log "RabbitMQ amqps://127.0.0.1:${amqps_port} and PostgreSQL TLS are on (CA: $dir/ca.pem)"
