# swr-stage-worker in a container: the worker (`run`, the default) and every other command
# (`sim`, `submit`, `watch`, `replay`, `demo`, `bench`) from one image.
#
# Configuration comes from the environment only (AMQP_URL, SWR_ENDPOINT, SWR_AUTH_TOKEN and
# SWR_STAGE_WORKER__<SECTION>__<KEY>; every key is in config/default.toml, which is built into the
# binary). No configuration file is copied into the image.
#
#   docker build -t swr-stage-worker .
#   docker run --rm -e AMQP_URL=amqp://user:pass@rabbit:5672/%2f -e SWR_ENDPOINT=... \
#     -e SWR_AUTH_TOKEN=... swr-stage-worker

# --- build -------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, against placeholder sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. (A placeholder build rather than BuildKit cache
# mounts, so the image also builds with the classic builder and docker-compose v1.)
# Every [[bench]] the manifest declares needs a file, or cargo refuses the manifest.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for bench in $(awk '/^\[\[bench\]\]/ { b = 1; next } b && /^name *=/ { gsub(/^name *= *"|"$/, ""); print; b = 0 }' Cargo.toml); do \
           echo 'fn main() {}' > "benches/$bench.rs"; \
       done \
    && cargo build --release --locked \
    && rm -rf src benches

COPY config config
COPY benches benches
COPY src src
# Drop the placeholder's own artifacts and make the real sources newer than anything built above,
# so cargo cannot take the placeholder binary for an up-to-date one.
RUN rm -rf target/release/swr-stage-worker target/release/deps/swr_stage_worker-* \
        target/release/deps/libswr_stage_worker-* target/release/.fingerprint/swr-stage-worker-* \
    && touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin swr-stage-worker \
    && ./target/release/swr-stage-worker --version | grep -q "^swr-stage-worker " \
    && strip --strip-debug target/release/swr-stage-worker
# strip --strip-debug: the release profile's line tables are 3/4 of the binary (about 74 of 93 MB).
# The symbol table stays, so a panic's backtrace still names its functions.

# --- run ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: the system's roots, which every TLS connection trusts (RabbitMQ, SWR, IAM,
# PostgreSQL; read with rustls-native-certs, so SSL_CERT_FILE / SSL_CERT_DIR work too). A private
# CA is mounted as a file and named by amqp.tls.ca_file, http.ca_file or sslrootcert.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid, so a mounted volume's ownership can be prepared on the host.
RUN groupadd --system --gid 10001 swr \
    && useradd --system --uid 10001 --gid swr --no-create-home \
        --home-dir /var/lib/swr-stage-worker --shell /usr/sbin/nologin swr \
    && install -d -o swr -g swr -m 0750 /var/lib/swr-stage-worker

COPY --from=builder /build/target/release/swr-stage-worker /usr/local/bin/swr-stage-worker

USER swr:swr
# The embedded idempotency store lives at idempotency.path = data/idempotency.db, relative to the
# working directory: keep it on a volume so it survives a new container. One worker owns the file
# (a second container on the same volume stops at start); replicas use the postgres backend.
WORKDIR /var/lib/swr-stage-worker
VOLUME ["/var/lib/swr-stage-worker"]

# 18080: `sim` when started with --listen 0.0.0.0:18080. 9464: telemetry.listen (GET /healthz),
# which has to be set to 0.0.0.0:9464 to be reachable from outside the container.
EXPOSE 18080 9464

# No HEALTHCHECK here: the same image runs commands that serve nothing (submit, replay) and the
# simulator; docker-compose.yml gives each long-running service its own check.
ENTRYPOINT ["swr-stage-worker"]
CMD ["run"]
