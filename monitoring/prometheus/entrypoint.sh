#!/bin/sh
# Writes Prometheus' configuration from the backend's own credentials, then starts Prometheus.
#
# /metrics needs a credential whenever one is configured (README, Auth): Basic auth when
# BASIC_AUTH_USER/BASIC_AUTH_PASS are set, else the shared WEBHOOK_SECRET as ?token=. Prometheus
# does not expand environment variables in its configuration, hence this script. The password goes
# into a file of its own (basic_auth.password_file), never into the configuration or a log.
set -eu

CONFIG="${LSB_PROMETHEUS_CONFIG:-/tmp/prometheus.yml}"
TARGET="${LSB_METRICS_TARGET:-backend:9090}"
INTERVAL="${LSB_SCRAPE_INTERVAL:-15s}"
umask 077

{
  echo "global:"
  echo "  scrape_interval: ${INTERVAL}"
  echo "scrape_configs:"
  echo "  - job_name: lsb-backend"
  echo "    metrics_path: /metrics"
  echo "    static_configs:"
  echo "      - targets: ['${TARGET}']"
  if [ -n "${BASIC_AUTH_USER:-}" ] && [ -n "${BASIC_AUTH_PASS:-}" ]; then
    printf '%s' "${BASIC_AUTH_PASS}" > "${CONFIG}.password"
    user=$(printf '%s' "${BASIC_AUTH_USER}" | sed "s/'/''/g")  # a quote in YAML's single-quoted scalar: twice
    echo "    basic_auth:"
    echo "      username: '${user}'"
    echo "      password_file: '${CONFIG}.password'"
  elif [ -n "${WEBHOOK_SECRET:-}" ]; then
    secret=$(printf '%s' "${WEBHOOK_SECRET}" | sed "s/'/''/g")  # as above
    echo "    params:"
    echo "      token: ['${secret}']"
  fi
} > "${CONFIG}"

exec "${PROMETHEUS_BIN:-/bin/prometheus}" --config.file="${CONFIG}" --storage.tsdb.path=/prometheus "$@"
