"""Pre-forked workers: N sidecar processes serving one port through SO_REUSEPORT.

One Python process serves gRPC on one core. A sidecar given more cores runs
one process per core: the supervisor forks N children before anything starts
gRPC, an event loop or a Redis connection, and each child builds its own
server with ``grpc.so_reuseport`` set, so the kernel spreads new connections
over the children. The spread is per connection, not per call: a client with
a single HTTP/2 connection still lands on one worker.

The supervisor forwards SIGTERM/SIGINT (drain and stop) and SIGHUP (reload
policies) to every child and restarts a child that dies while serving. A child
killed by a signal (the OOM killer, ``kill -9``) is always started again, after
a delay that doubles while it keeps dying right after its start: the others
keep the port served meanwhile. Only a child that *exits* with an error within
``crash_window_s`` of its start makes the supervisor give up (stopping the
others): that is a configuration error a restart will not cure. A child gets
SIGTERM (and drains) when the supervisor itself dies, so a supervisor killed
with -9 leaves no worker serving the port behind it.

Each child has its own local permit cache: a Closeout that reaches another
worker than its Authorize costs one more round trip (the permit is read from
Redis). Budgets and idempotency stay exact because they live in Redis.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("keel_pdp.workers")

WORKER_INDEX_ENV = "KEEL_WORKER_INDEX"
SUPERVISOR_ENV = "KEEL_WORKER_SUPERVISOR"
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_index() -> int | None:
    """This process's worker number (0..N-1), or None outside a supervisor."""
    value = os.environ.get(WORKER_INDEX_ENV)
    return int(value) if value is not None and value.isdigit() else None


def reload_every_worker() -> bool:
    """In a pre-forked worker: ask the supervisor to reload every worker's policies
    (SIGHUP, which it forwards to each child, this one included), as a SIGHUP to the
    service does; False outside workers or when the supervisor is gone."""
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if worker_index() is None or not supervisor.isdigit() or os.getppid() != int(supervisor):
        return False
    try:
        os.kill(int(supervisor), signal.SIGHUP)
    except OSError:
        return False
    return True


def _drain_when_orphaned() -> None:
    """Have the kernel send this child SIGTERM when its supervisor dies (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _spawn(index: int, serve_one: Callable[[int], int], old_mask: set[int]) -> int:
    supervisor = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # Child: back to normal signal handling, then serve until told to stop.
    code = 1
    try:
        _drain_when_orphaned()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if os.getppid() != supervisor:
            raise SystemExit(0)  # the supervisor died before the line above
        os.environ[WORKER_INDEX_ENV] = str(index)
        os.environ[SUPERVISOR_ENV] = str(supervisor)
        code = int(serve_one(index))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return 0  # pragma: no cover - unreachable


def run_workers(n: int, serve_one: Callable[[int], int], *, grace_s: float = 5.0,
                crash_window_s: float = 5.0, restart_delay_s: float = 0.5,
                max_restart_delay_s: float = 10.0) -> int:
    """Fork ``n`` children running ``serve_one(index)``; supervise until they stop.

    Call it before any gRPC object or event loop exists in this process
    (importing modules is fine; a server, channel or running loop is not).
    ``grace_s`` is how long a child may take to stop after SIGTERM (a sidecar:
    its drain delay and grace period); 5 s after that it is killed. Returns 0
    when every child stopped cleanly after SIGTERM/SIGINT, else the first
    non-zero exit status seen.
    """
    if n < 1:
        raise ValueError("workers must be at least 1")
    old_mask: set[int] = set(signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS))
    children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
    restart_at: dict[int, float] = {}  # index -> when to start it again
    quick_deaths: dict[int, int] = {}  # index -> deaths in a row right after a start
    try:
        for i in range(n):
            children[_spawn(i, serve_one, old_mask)] = (i, time.monotonic())
        stopping = False
        kill_at = 0.0
        result = 0
        while children or (restart_at and not stopping):
            wait = 0.5
            if restart_at:
                wait = min(wait, max(min(restart_at.values()) - time.monotonic(), 0.01))
            info = signal.sigtimedwait(_SIGNALS, wait)
            signo = info.si_signo if info is not None else None
            if signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                stopping = True
                restart_at.clear()
                kill_at = time.monotonic() + grace_s + 5.0
                _signal_all(children, signal.SIGTERM)
            elif signo == signal.SIGHUP:
                _signal_all(children, signal.SIGHUP)
            for pid, status in _reap():
                index, started = children.pop(pid, (-1, 0.0))
                code = os.waitstatus_to_exitcode(status)
                if stopping:
                    if code not in (0, -signal.SIGTERM) and result == 0:
                        result = code if code > 0 else 1
                    continue
                young = time.monotonic() - started < crash_window_s
                if young and code >= 0:
                    log.error("worker %d exited with %d right after starting: stopping all",
                              index, code)
                    result = code if code > 0 else 1
                    stopping = True
                    restart_at.clear()
                    kill_at = time.monotonic() + grace_s + 5.0
                    _signal_all(children, signal.SIGTERM)
                    continue
                # Killed from outside (a signal), or dead after serving a while: the
                # others serve the port meanwhile; a child that keeps dying at once
                # is started again less and less often.
                quick_deaths[index] = quick_deaths.get(index, 0) + 1 if young else 0
                delay = min(restart_delay_s * 2 ** quick_deaths[index], max_restart_delay_s)
                log.error("worker %d exited with %d: restarting it in %.1f s", index, code,
                          delay)
                restart_at[index] = time.monotonic() + delay
            if not stopping:
                for index, at in sorted(restart_at.items()):
                    if at <= time.monotonic():
                        del restart_at[index]
                        children[_spawn(index, serve_one, old_mask)] = (index,
                                                                        time.monotonic())
            if stopping and children and time.monotonic() > kill_at:
                _signal_all(children, signal.SIGKILL)
        return result
    finally:
        _signal_all(children, signal.SIGKILL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _signal_all(children: dict[int, tuple[int, float]], signo: signal.Signals) -> None:
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signo)


def _reap() -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))
