"""Processes and load tools shared by the benchmarks.

Everything a benchmark starts runs on 127.0.0.1 on free ports, is bounded in
time and is stopped when the benchmark ends: a redis-server of its own, the
sidecar (``keel-pdp serve`` through ``bench.serve``) and the load driver.

The load driver is ``bench/driver/h2grpc.c`` (compiled on first use): like
h2load it drives gRPC unary calls over h2c with almost no CPU, but it sends a
different body with each call, because Authorize is idempotent by request_id
and Closeout by permit_id, and a fixed body would measure the replay path.
h2load itself is used as a cross-check of the floor.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
POLICIES = BENCH / "policies"
BUILD = ROOT / "var" / "bench"

NOOP = "/keel.pdp.v1.Diagnostics/Noop"
AUTHORIZE = "/keel.pdp.v1.PolicyDecisionPoint/Authorize"
CLOSEOUT = "/keel.pdp.v1.PolicyDecisionPoint/Closeout"
VOID = "/keel.pdp.v1.PolicyDecisionPoint/Void"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark could not run (missing tool, server did not start, driver failed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Row:
    """One line of the results table."""

    section: str
    name: str
    value: float
    unit: str
    ratio: float | None = None
    baseline: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"section": self.section, "name": self.name, "value": self.value,
                "unit": self.unit, "ratio": self.ratio, "baseline": self.baseline,
                "note": self.note}


# --------------------------------------------------------------------- redis
class RedisServer:
    """A redis-server of the benchmark's own, without persistence."""

    def __init__(self, workdir: pathlib.Path, *, extra: Sequence[str] = (),
                 apart: bool = False) -> None:
        self.workdir = workdir
        # In a session (so a scheduling group) of its own, that group's priority
        # raised: see bench.bench_envoy_burst.
        self.port = free_port()
        self.extra = tuple(extra)
        self.apart = apart
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(port=self.port, socket_timeout=120)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (make deps installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=self.apart)
        # In production Redis has cores of its own; on a shared 2-core machine other
        # work can starve it past the store timeout, which would measure the
        # machine, not the sidecar. A higher priority (where allowed) avoids that.
        if self.apart:
            with contextlib.suppress(OSError):
                pathlib.Path(f"/proc/{self.proc.pid}/autogroup").write_text("-5")
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, -5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise BenchError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        self.client.close()

    def info(self, section: str) -> dict[str, Any]:
        return dict(self.client.info(section))

    def commandstats(self) -> dict[str, int]:
        """Calls per command (script-internal calls included: Redis counts them too),
        and under "<command>.usec" the microseconds Redis spent in it."""
        out: dict[str, int] = {}
        for name, stats in self.client.info("commandstats").items():
            cmd = name.removeprefix("cmdstat_")
            out[cmd] = int(stats["calls"]) if isinstance(stats, dict) else 0
            out[cmd + ".usec"] = int(stats.get("usec", 0)) if isinstance(stats, dict) else 0
        return out

    def cpu_s(self) -> float:
        info = self.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def used_memory(self) -> int:
        return int(self.info("memory")["used_memory"])

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def commandstats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in delta.items() if v and k != "info"}


class Monitor:
    """Counts the commands clients send to Redis, apart from those Lua scripts run.

    INFO commandstats counts the commands a script calls as well, so it cannot
    tell one round trip from the inside of a script. MONITOR marks script calls
    with ``[db lua]``; it slows Redis down, so it runs only in a short,
    untimed verification pass.
    """

    _LINE = re.compile(rb'^\+?[0-9.]+ \[(\d+) ([^\]]+)\] "([^"]+)"')

    def __init__(self, port: int) -> None:
        self.port = port
        self.counts: dict[str, int] = {}
        self.script_counts: dict[str, int] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> Monitor:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(b"MONITOR\r\n")
        first = b""
        while not first.endswith(b"\r\n"):
            first += sock.recv(1)
        if first != b"+OK\r\n":
            raise BenchError(f"MONITOR refused: {first!r}")
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._sock is not None
        pending = b""
        while not self._stop.is_set():
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            for line in lines:
                m = self._LINE.match(line)
                if not m:
                    continue
                cmd = m.group(3).decode(errors="replace").lower()
                target = self.script_counts if m.group(2) == b"lua" else self.counts
                target[cmd] = target.get(cmd, 0) + 1

    def settle(self, quiet_s: float = 0.3) -> None:
        """Wait until MONITOR output stopped arriving (Redis writes it asynchronously)."""
        last = -1
        while True:
            total = sum(self.counts.values()) + sum(self.script_counts.values())
            if total == last:
                return
            last = total
            time.sleep(quiet_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()


# ---------------------------------------------------------------- processes
def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(x) for x in (task / "children").read_text().split())
    return out


def process_tree(pid: int) -> list[int]:
    seen = [pid]
    i = 0
    while i < len(seen):
        seen.extend(c for c in _children(seen[i]) if c not in seen)
        i += 1
    return seen


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time (user + system) of a process, or of one of its threads."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with contextlib.suppress(OSError):
        stat = pathlib.Path(path).read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    return 0.0


class Sidecar:
    """``keel-pdp serve`` in a subprocess (through bench.serve), on a free port.

    ``command`` replaces the server command (``{port}`` is filled in), for the
    benchmarks' own servers such as bench.rt_server.
    """

    def __init__(self, redis_url: str, policies: pathlib.Path, logdir: pathlib.Path, *,
                 workers: int = 1, redis_client: str = "resp", store_timeout_ms: int = 25,
                 name: str = "pdp", command: Sequence[str] = (),
                 launcher_args: Sequence[str] = ()) -> None:
        self.redis_url = redis_url
        self.policies = policies
        self.workers = workers
        self.redis_client = redis_client
        self.store_timeout_ms = store_timeout_ms
        self.command = tuple(command)
        self.launcher_args = tuple(launcher_args)
        self.port = free_port()
        self.log = logdir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.serve", "--redis-client", self.redis_client,
               "--workers", str(self.workers), *self.launcher_args, "--",
               "--policies", str(self.policies), "--redis-url", self.redis_url,
               "--listen", f"127.0.0.1:{self.port}", "--metrics-port", "0",
               "--store-timeout", str(self.store_timeout_ms / 1000), "--log-level", "WARNING"]
        if self.command:
            cmd = [c.replace("{port}", str(self.port)) for c in self.command]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if text.count("gRPC listening on") >= self.workers:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"sidecar did not start; log:\n{self.log.read_text(errors='replace')}")

    @property
    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def worker_pids(self) -> list[int]:
        """The processes that serve calls (the supervisor only forks and waits)."""
        pids = self.pids
        return pids[1:] if self.workers > 1 and len(pids) > 1 else pids

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.worker_pids())

    def cpu_s(self) -> float:
        """CPU of every process and thread (gRPC runs threads of its own)."""
        return sum(cpu_seconds(p) for p in self.pids)

    def main_cpu_s(self) -> float:
        """CPU of the event-loop threads, the ones a Python server saturates."""
        return sum(cpu_seconds(p, p) for p in self.worker_pids())

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def log_line(self, prefix: str) -> str:
        """The last line of the server's output that starts with ``prefix`` ('' if none)."""
        found = [line for line in self.log.read_text(errors="replace").splitlines()
                 if line.startswith(prefix)]
        return found[-1] if found else ""

    def __enter__(self) -> Sidecar:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------- drivers
def build_driver() -> pathlib.Path:
    """Compile bench/driver/h2grpc.c into var/bench/ when the source is newer."""
    src = BENCH / "driver" / "h2grpc.c"
    exe = BUILD / "h2grpc"
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (cc) to build the load driver: "
                         "apt-get install build-essential")
    BUILD.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(".tmp")
    subprocess.run([cc, "-O2", "-o", str(tmp), str(src)], check=True)
    tmp.replace(exe)
    return exe


def drive(driver: pathlib.Path, port: int, path: str, bodies: pathlib.Path, *,
          conns: int = 1, streams: int = 32, n: int | None = None, warmup: int = 0,
          duration: float | None = None, rps: float | None = None,
          out: pathlib.Path | None = None, cycle: bool = False, timeout_s: float = 300,
          headers: Sequence[str] = ()) -> dict[str, Any]:
    """Run the load driver once; returns its JSON summary."""
    cmd = [str(driver), "--port", str(port), "--path", path, "--bodies", str(bodies),
           "-c", str(conns), "-m", str(streams), "--warmup", str(warmup),
           "--timeout", str(timeout_s)]
    if n is not None:
        cmd += ["-n", str(n)]
    if duration is not None:
        cmd += ["--duration", str(duration)]
    if rps is not None:
        cmd += ["--rps", str(rps)]
    if out is not None:
        cmd += ["--out", str(out)]
    if cycle:
        cmd.append("--cycle")
    for h in headers:
        cmd += ["-H", h]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 30,
                          check=False)
    if proc.returncode not in (0, 4) or not proc.stdout.strip():
        raise BenchError(f"driver failed ({proc.returncode}): {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    result["stderr"] = proc.stderr.strip()
    return result


_H2LOAD_REQ = re.compile(r"finished in ([0-9.]+)(m?s), ([0-9.]+) req/s")
_H2LOAD_OK = re.compile(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded")


def h2load(port: int, path: str, body: pathlib.Path, *, n: int, conns: int = 1,
           streams: int = 32, timeout_s: float = 120) -> dict[str, Any]:
    """h2load with one fixed body (only meaningful for Noop); returns req/s and CPU."""
    exe = shutil.which("h2load")
    if exe is None:
        raise BenchError("h2load is not installed (make deps installs nghttp2-client)")
    cmd = [exe, "-n", str(n), "-c", str(conns), "-m", str(streams), "-d", str(body),
           "-H", "content-type: application/grpc", "-H", "te: trailers",
           f"http://127.0.0.1:{port}{path}"]
    before = os.times()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    after = os.times()
    m = _H2LOAD_REQ.search(proc.stdout)
    ok = _H2LOAD_OK.search(proc.stdout)
    if proc.returncode != 0 or m is None or ok is None:
        raise BenchError(f"h2load failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return {"rps": float(m.group(3)), "ok": int(ok.group(1)),
            "client_cpu_s": (after.children_user - before.children_user)
            + (after.children_system - before.children_system)}


# -------------------------------------------------------------------- bodies
def frame(message: bytes) -> bytes:
    """gRPC length-prefixed message (not compressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def write_bodies(path: pathlib.Path, messages: Iterable[bytes]) -> int:
    n = 0
    with path.open("wb") as f:
        for m in messages:
            f.write(frame(m))
            n += 1
    return n


def read_responses(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    """Records written by the driver's --out: (request index, response message)."""
    data = path.read_bytes()
    pos = 0
    while pos + 8 <= len(data):
        idx, length = struct.unpack_from("<II", data, pos)
        yield idx, data[pos + 8:pos + 8 + length]
        pos += 8 + length


@dataclass
class Workload:
    """Authorize requests shaped like the bench bundle expects."""

    tenants: int = 100
    workloads: tuple[str, ...] = ("chat", "search", "summarize", "agent")
    model: str = "gpt-4o-mini"
    provider: str = "openai"
    input_tokens: int = 800
    max_output_tokens: int = 256
    labels: dict[str, str] = field(default_factory=lambda: {"team": "bench"})

    def authorize(self, tag: str, start: int, count: int) -> Iterator[bytes]:
        from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb

        for i in range(start, start + count):
            yield pb.AuthorizeRequest(
                request_id=f"{tag}-{i:09d}", tenant=f"t{i % self.tenants:05d}",
                workload=self.workloads[i % len(self.workloads)], model=self.model,
                provider=self.provider, estimated_input_tokens=self.input_tokens + i % 400,
                max_output_tokens=self.max_output_tokens, labels=self.labels,
            ).SerializeToString()


def noop_body(path: pathlib.Path, payload: bytes = b"") -> pathlib.Path:
    from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb

    write_bodies(path, [pb.NoopRequest(payload=payload).SerializeToString()])
    return path


def closeout_bodies(path: pathlib.Path, permit_ids: Sequence[str]) -> int:
    from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb

    usage = pb.Usage(input_tokens=900, cached_input_tokens=100, output_tokens=180)
    return write_bodies(path, (pb.CloseoutRequest(
        permit_id=p, usage=usage, outcome=pb.SUCCEEDED).SerializeToString()
        for p in permit_ids))


def decisions(path: pathlib.Path) -> tuple[list[str], dict[str, int]]:
    """Permit ids of the held decisions in a driver --out file, and the decision counts."""
    from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb

    permits: list[str] = []
    counts: dict[str, int] = {}
    resp = pb.AuthorizeResponse()
    for _, raw in read_responses(path):
        resp.ParseFromString(raw)
        name = pb.Decision.Name(resp.decision)
        if resp.degraded:
            name += " degraded"  # taken without the store (timeout): must not happen here
        if resp.replayed:
            name += " replayed"
        counts[name] = counts.get(name, 0) + 1
        if resp.decision != pb.DENY and not resp.degraded and not resp.replayed:
            permits.append(resp.permit_id)
    return permits, counts


def closeout_statuses(path: pathlib.Path) -> dict[str, int]:
    from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb

    counts: dict[str, int] = {}
    resp = pb.CloseoutResponse()
    for _, raw in read_responses(path):
        resp.ParseFromString(raw)
        name = pb.CloseoutStatus.Name(resp.status)
        counts[name] = counts.get(name, 0) + 1
    return counts


# ------------------------------------------------------------------- context
@dataclass
class Context:
    """What every benchmark section gets from run_all."""

    quick: bool
    work: pathlib.Path
    driver: pathlib.Path
    duration_s: float
    rounds: int
    options: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> pathlib.Path:
        return self.work / name

    def redis(self, name: str = "redis", extra: Sequence[str] = ()) -> RedisServer:
        return RedisServer(self.work / name, extra=extra)

    def sidecar(self, redis_url: str, policies: str = "generous", **kw: Any) -> Sidecar:
        return Sidecar(redis_url, POLICIES / policies, self.work, **kw)


def new_workdir() -> pathlib.Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix="run-", dir=BUILD))


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def spread(values: Sequence[float]) -> str:
    """min..max of repeated measurements, for the table's noise note."""
    if len(values) < 2:
        return ""
    return f"{min(values):.2f}..{max(values):.2f}"


@dataclass
class Sample:
    """One driver run and what it cost the sidecar and Redis."""

    result: dict[str, Any]
    server_cpu_s: float
    redis_cpu_s: float
    commands: dict[str, int]
    issued: int
    main_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return float(self.result["rps"])

    @property
    def us_per_call(self) -> float:
        """Event-loop thread CPU per call: less sensitive to a busy machine than calls/s."""
        return self.main_cpu_s / max(self.issued, 1) * 1e6

    @property
    def lat(self) -> dict[str, float]:
        return dict(self.result["lat_us"])

    def per_call(self, *commands: str) -> float:
        return sum(self.commands.get(c, 0) for c in commands) / max(self.issued, 1)

    def cpu_share(self) -> str:
        wall = max(float(self.result["wall_s"]), 1e-9)
        return (f"cpu: sidecar {self.server_cpu_s / wall:.0%}, redis "
                f"{self.redis_cpu_s / wall:.0%}, driver "
                f"{float(self.result['client_cpu_s']) / wall:.0%} of one core")


def measure(ctx: Context, sidecar: Sidecar, server: RedisServer, path: str,
            bodies: pathlib.Path, **kw: Any) -> Sample:
    """Drive ``path`` once, with the sidecar's and Redis' CPU and Redis' command counts."""
    cpu0, rcpu0, cmd0 = sidecar.cpu_s(), server.cpu_s(), server.commandstats()
    main0 = sidecar.main_cpu_s()
    result = drive(ctx.driver, sidecar.port, path, bodies, **kw)
    main1 = sidecar.main_cpu_s()
    cpu1, rcpu1, cmd1 = sidecar.cpu_s(), server.cpu_s(), server.commandstats()
    if result["errors"]:
        raise BenchError(f"{path}: {result['errors']} calls failed ({result['stderr']}); "
                         f"see {sidecar.log}")
    issued = int(result["calls"]) + int(kw.get("warmup", 0))
    return Sample(result, cpu1 - cpu0, rcpu1 - rcpu0, commandstats_delta(cmd0, cmd1), issued,
                  main1 - main0)
