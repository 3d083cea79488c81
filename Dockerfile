# syntax=docker/dockerfile:1
#
# One image for every role of the one `cachepool` binary: operator, node, web, up, crd.
#
#   docker build -t cachepool:dev .        (or: podman build -t cachepool:dev .)
#
# The release build carries what production needs (S3, TLS to PostgreSQL, the EC2 provider
# and CloudWatch) and no benchmark code. The runtime base is distroless: glibc, libgcc, CA
# certificates and a `nonroot` user (65532), no shell and no package manager.
# `scripts/image` builds the same image without a container daemon (see docs/kubernetes.md).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --features production \
    && install -D -m 0755 target/release/cachepool /out/cachepool

FROM gcr.io/distroless/cc-debian12:nonroot
# docker build --build-arg REVISION=$(git rev-parse HEAD) --build-arg CREATED=$(date -u +%FT%TZ)
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# --build-arg SOURCE=<the repository URL> (empty by default: this repository has none yet)
ARG SOURCE=""
LABEL org.opencontainers.image.title="cachepool" \
      org.opencontainers.image.description="Elastic memcached-compatible cache pool: operator, cache node and web app in one binary" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/cachepool /usr/local/bin/cachepool
USER 65532:65532
# Data port, admin port (nodes); operator API; site.
EXPOSE 11211 11212 7070 8080
ENTRYPOINT ["cachepool"]
CMD ["--help"]
