#!/usr/bin/env bash
# Bring up the local stack: Redis (on a free port if 6379 is taken) and the
# sidecar serving policies/. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
port="${REDIS_PORT:-6379}"
if redis-cli -p "$port" ping >/dev/null 2>&1; then
  echo "redis: using the server already on 127.0.0.1:$port"
else
  redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/var" --appendonly yes \
    --hash-max-listpack-value 512 \
    --daemonize yes --pidfile "$PWD/var/redis.pid" --logfile "$PWD/var/redis.log"
  started_redis=1
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "redis: listening on 127.0.0.1:$port (data in var/, log var/redis.log)"
fi
cleanup() {
  [ -n "${ledger_pid:-}" ] && kill "$ledger_pid" 2>/dev/null || true
  if [ -n "${started_redis:-}" ]; then redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
if .venv/bin/keel-pdp ledger --help >/dev/null 2>&1; then
  .venv/bin/keel-pdp ledger --redis-url "redis://127.0.0.1:$port/0" \
    --store "sqlite:///$PWD/var/ledger.db" --metrics-port 9465 &
  ledger_pid=$!
  echo "ledger writer: consuming the decision stream into var/ledger.db (metrics :9465)"
fi
exec_args=(serve --policies "${POLICIES:-policies}" --redis-url "redis://127.0.0.1:$port/0"
  --listen "${LISTEN:-127.0.0.1:50051}" --metrics-port "${METRICS_PORT:-9464}"
  --outbox-dir "$PWD/var/outbox")
.venv/bin/keel-pdp "${exec_args[@]}"
