# Stand-in for prom/prometheus in tests/compose, where no registry can be pulled from: Prometheus from
# Debian's package on the local base image (deploy/make-base-image.sh), laid out like the official image.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
# Debian's build stores under /var/lib/prometheus by default; the official image (and this one) in /prometheus.
ENTRYPOINT ["/usr/bin/prometheus", "--storage.tsdb.path=/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml"]
