# syntax=docker/dockerfile:1
# keyplane-agent: the edge agent for one site. Build from the repository root:
#   docker build -f deploy/docker/keyplane-agent.Dockerfile -t keyplane-agent .
# protoc comes from the vendored protoc-bin-vendored crate; no token, enrollment code
# or certificate is baked in.

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keyplane-agent --bin keyplane-agent \
    && install -D -m 0755 target/release/keyplane-agent /out/keyplane-agent

FROM debian:bookworm-slim
RUN groupadd --system --gid 10002 keyplane-agent \
    && useradd --system --uid 10002 --gid keyplane-agent --home-dir /var/lib/keyplane-agent --shell /usr/sbin/nologin keyplane-agent \
    && install -d -o keyplane-agent -g keyplane-agent -m 0700 /var/lib/keyplane-agent
COPY --from=build /out/keyplane-agent /usr/local/bin/keyplane-agent
USER 10002:10002
WORKDIR /var/lib/keyplane-agent
# The journal (and the certificate the agent enrolls for) lives here: mount a volume.
ENV KEYPLANE_STATE_DIR=/var/lib/keyplane-agent/state
VOLUME ["/var/lib/keyplane-agent"]
ENTRYPOINT ["/usr/local/bin/keyplane-agent"]
