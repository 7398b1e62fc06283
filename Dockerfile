# syntax=docker/dockerfile:1
# carve's one image: carve-controller, carvectl, carve-agent, carve-cni and
# carve-ipam in /usr/local/bin, the reference portmap plugin (CNI 1.1.0) that
# carve-agent's install-cni step copies to the node, and nft for the agent's
# SNAT rules.
#
#   docker build -t ghcr.io/carve-dev/carve:v0.1.0 .
#
# The default user stays root: carve-agent programs the node's network. The
# controller Deployment runs as 65532 (the `nonroot` user below).

ARG RUST_VERSION=1.95
ARG GO_VERSION=1.25
ARG DEBIAN_RELEASE=bookworm

# --- carve, built against the same Debian release as the runtime (glibc) ---
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS carve
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p carve-controller -p carve-node-plugin \
    && mkdir -p /out \
    && cd target/release \
    && cp carve-controller carvectl carve-agent carve-cni carve-ipam /out/

# --- portmap from the reference plugins; Debian's packaged ones stop at CNI 1.0.0 ---
FROM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS cni-plugins
ARG CNI_PLUGINS_VERSION=v1.9.1
RUN --mount=type=cache,target=/go/pkg/mod \
    CGO_ENABLED=0 GOBIN=/out go install -trimpath \
    -ldflags "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=${CNI_PLUGINS_VERSION}" \
    "github.com/containernetworking/plugins/plugins/meta/portmap@${CNI_PLUGINS_VERSION}"

# --- runtime ---
FROM debian:${DEBIAN_RELEASE}-slim
ARG VERSION=v0.1.0
LABEL org.opencontainers.image.title="carve" \
      org.opencontainers.image.description="Kubernetes IPAM and overlay networking operator" \
      org.opencontainers.image.source="https://github.com/carve-dev/carve" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nonroot
COPY --from=carve /out/ /usr/local/bin/
COPY --from=cni-plugins /out/portmap /usr/local/lib/carve/cni/portmap
