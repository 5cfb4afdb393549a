"""A pre-forked `keel-pdp serve --workers N --worker-ports` for hostile tests.

Each worker also listens alone on the listen port + 1 + i, so a test chooses which
worker takes a call. The service runs in a session of its own: cleaning up kills
its process group by id, restarted and orphaned workers included.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.conftest import free_port_block
from tests.helpers import wait_ready


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    out: list[int] = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


@dataclass
class Service:
    redis_url: str
    bundle: pathlib.Path
    args: tuple[str, ...] = ()
    workers: int = 2
    log: pathlib.Path | None = None
    port: int = field(default_factory=lambda: free_port_block(4))
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready: bool = True) -> Service:
        env = {**os.environ, "KEEL_LOG_LEVEL": "WARNING"}
        argv = [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(self.bundle),
                "--redis-url", self.redis_url, "--listen", f"127.0.0.1:{self.port}",
                "--metrics-port", "0", "--sweep-interval", "0.2", "--drain-delay", "0.1"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers), "--worker-ports"]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen([*argv, *self.args], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if not isinstance(out, int):
                out.close()
        if ready:
            try:
                for i in range(self.workers):
                    self.wait_worker(i)
            except BaseException:
                self.kill()
                raise
        return self

    def worker_target(self, i: int) -> str:
        """Worker ``i`` alone (the shared port when there is one process)."""
        return f"127.0.0.1:{self.port + 1 + i if self.workers > 1 else self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_worker(self, i: int) -> None:
        wait_ready(int(self.worker_target(i).rpartition(":")[2]))

    def stub(self, i: int) -> tuple[grpc.Channel, pb_grpc.PolicyDecisionPointStub]:
        ch = grpc.insecure_channel(self.worker_target(i))
        return ch, pb_grpc.PolicyDecisionPointStub(ch)

    def aio_stub(self, i: int) -> tuple[Any, Any]:
        """An asyncio channel and stub (the generated stubs are typed for sync calls)."""
        ch = grpc.aio.insecure_channel(self.worker_target(i))
        return ch, pb_grpc.PolicyDecisionPointStub(ch)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return children_of(self.proc.pid)

    def worker_pid(self, i: int, timeout_s: float = 10.0) -> int:
        """The pid of the process serving worker ``i``'s own port."""
        port = int(self.worker_target(i).rpartition(":")[2])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for pid in self.worker_pids():
                if _listens(pid, port):
                    return pid
            time.sleep(0.05)
        raise AssertionError(f"no worker listens on {port}")

    def kill(self) -> None:
        """SIGKILL the supervisor and every process of its session."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (drain); the supervisor's exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        finally:
            self.kill()
        return code


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a listening TCP socket on ``port``."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    want = f":{port:04X}"
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[1].endswith(want) and parts[3] == "0A" and parts[9] in inodes:
                    return True
    return False

