# gancho in a container. The image runs `gancho run` and reads its config
# from /etc/gancho/gancho.toml, so mount a config there:
#
#   docker build -t gancho .
#   docker run --rm -v "$PWD/gancho.toml:/etc/gancho/gancho.toml:ro" \
#       --env-file gancho.env gancho install
#   docker run -d -v "$PWD/gancho.toml:/etc/gancho/gancho.toml:ro" \
#       --env-file gancho.env gancho
#
# gancho.env holds DATABASE_URL and the other variables that the config reads.
#
# The example configs and the capture SQL are also in the image, under
# /usr/share/gancho/examples and /usr/share/gancho/sql.

FROM rust:1.95-bookworm AS builder
WORKDIR /build

# Build the dependencies alone first, against empty sources, so that this
# layer stays cached until the manifests or Cargo.lock change. The workspace
# lists the benchmark suite in bench/, so Cargo needs its manifest and a
# source file to load the workspace; the build itself covers only gancho.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml ./bench/
RUN mkdir src bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked

# The binary embeds sql/ and examples/ with include_str!, so both are needed
# here. COPY keeps the modification times from the build context, which can be
# older than the empty build above. Cargo compares those times, so the crate
# roots are touched to make it rebuild gancho.
COPY src ./src
COPY sql ./sql
COPY examples ./examples
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

FROM debian:bookworm-slim

# gancho needs no OpenSSL, because reqwest uses rustls with the Mozilla root
# certificates built in (webpki-roots). The system CA store is installed for
# builds that switch reqwest to the system roots (rustls-tls-native-roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric id lets Kubernetes' runAsNonRoot check the user.
RUN groupadd --system --gid 10001 gancho \
    && useradd --system --uid 10001 --gid gancho --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin gancho

COPY --from=builder /build/target/release/gancho /usr/local/bin/gancho
COPY sql /usr/share/gancho/sql
COPY examples /usr/share/gancho/examples

# The config file that gancho's commands read when no --config is given.
# Mount your own file at this path, or point GANCHO_CONFIG at
# /usr/share/gancho/examples/solidus.toml to try the Solidus example.
ENV GANCHO_CONFIG=/etc/gancho/gancho.toml

USER 10001:10001
ENTRYPOINT ["gancho"]
CMD ["run"]
