"""A real PostgreSQL server for the ledger tests, started from Debian's binaries.

initdb and postgres refuse to run as root, so when the tests run as root the
server runs as the ``postgres`` system user (its data directory is chowned to
it). The server listens on a free loopback port with its socket in the data
directory; each test gets a fresh database.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import free_port


def _bindir() -> pathlib.Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return pathlib.Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return pathlib.Path(initdb).parent
    pytest.fail("PostgreSQL server binaries are not installed (make deps installs the "
                "Debian package postgresql)")


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("running as root needs runuser to start PostgreSQL as user postgres")
    return [runuser, "-u", "postgres", "--", *cmd]


@dataclass
class PostgresServer:
    """A restartable postgres instance on a free port (``fast`` trades durability for
    speed and is fine for tests that kill the writer, not the server)."""

    workdir: pathlib.Path
    port: int = field(default_factory=free_port)
    fast: bool = True
    bindir: pathlib.Path = field(default_factory=_bindir)

    @property
    def datadir(self) -> pathlib.Path:
        return self.workdir / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(_as_server_user([*args]), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {proc.stdout}\n{proc.stderr}")

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.workdir, 0o700)
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")

    def start(self) -> None:
        opts = [f"-p {self.port}", "-c listen_addresses=127.0.0.1",
                f"-k {self.datadir}", "-c max_connections=50"]
        if self.fast:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(str(self.bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D",
                  str(self.datadir), "-l", str(self.workdir / "server.log"), "-o",
                  " ".join(opts))
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-t", "60", "-m", mode, "-D",
                  str(self.datadir))

    def running(self) -> bool:
        proc = subprocess.run(_as_server_user([str(self.bindir / "pg_ctl"), "status", "-D",
                                               str(self.datadir)]),
                              capture_output=True, check=False)
        return proc.returncode == 0

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres_server(fast: bool = True) -> Iterator[PostgresServer]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="keel-pg-"))
    server = PostgresServer(workdir, fast=fast)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            if server.running():
                server.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the test run's PostgreSQL server."""
    if not pg_server.running():
        pg_server.start()
    return pg_server.create_database()
