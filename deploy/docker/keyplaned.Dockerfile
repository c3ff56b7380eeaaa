# syntax=docker/dockerfile:1
# keyplaned: the central service. Build from the repository root:
#   docker build -f deploy/docker/keyplaned.Dockerfile -t keyplaned .
# protoc comes from the vendored protoc-bin-vendored crate (crates/keyplane-proto/build.rs),
# so the builder needs no protobuf package. No key, token or certificate is baked in:
# they are mounted at run time (see deploy/k8s and deploy/compose).

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keyplane-server --bin keyplaned \
    && install -D -m 0755 target/release/keyplaned /out/keyplaned

# The Kubernetes probes: the kubelet's own gRPC probe speaks plaintext only, and
# keyplaned serves TLS on every non-loopback address, so the probe runs inside the
# pod against 127.0.0.1 over TLS.
FROM golang:1.24-bookworm AS probe
ENV CGO_ENABLED=0
RUN go install github.com/grpc-ecosystem/grpc-health-probe@v0.4.26

FROM debian:bookworm-slim
# A fixed, unprivileged uid/gid that the Kubernetes securityContext names too.
RUN groupadd --system --gid 10001 keyplane \
    && useradd --system --uid 10001 --gid keyplane --home-dir /var/lib/keyplane --shell /usr/sbin/nologin keyplane \
    && install -d -o keyplane -g keyplane -m 0700 /var/lib/keyplane
COPY --from=build /out/keyplaned /usr/local/bin/keyplaned
COPY --from=probe /go/bin/grpc-health-probe /usr/local/bin/grpc_health_probe
USER 10001:10001
WORKDIR /var/lib/keyplane
EXPOSE 50051
ENV KEYPLANE_LISTEN=0.0.0.0:50051
ENTRYPOINT ["/usr/local/bin/keyplaned"]
CMD ["serve"]
