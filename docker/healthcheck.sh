#!/bin/sh
# Container HEALTHCHECK: exit 0 only when grpc.health.v1 on this container's encoder says
# SERVING (it does not while the model loads and warms up, nor while draining).
#
# Uses the server's own settings, so TLS and mTLS deployments need nothing extra when the
# server certificate is self-signed for "localhost". Otherwise set:
#   BIFUSION_HEALTHCHECK_CA           CA bundle that signed the server certificate
#   BIFUSION_HEALTHCHECK_SERVER_NAME  a name the certificate carries (default: localhost)
#   BIFUSION_HEALTHCHECK_CERT / _KEY  client certificate for mTLS (default: the server's own)
set -eu

port="${BIFUSION_PORT:-50051}"
set -- health --address "127.0.0.1:${port}" --timeout "${BIFUSION_HEALTHCHECK_TIMEOUT:-4}"

if [ -n "${BIFUSION_TLS_CERT:-}" ]; then
  set -- "$@" --tls-ca "${BIFUSION_HEALTHCHECK_CA:-$BIFUSION_TLS_CERT}" \
    --tls-server-name "${BIFUSION_HEALTHCHECK_SERVER_NAME:-localhost}"
  if [ -n "${BIFUSION_TLS_CLIENT_CA:-}" ]; then
    set -- "$@" --tls-cert "${BIFUSION_HEALTHCHECK_CERT:-$BIFUSION_TLS_CERT}" \
      --tls-key "${BIFUSION_HEALTHCHECK_KEY:-$BIFUSION_TLS_KEY}"
  fi
fi

exec bifusion-client "$@"
