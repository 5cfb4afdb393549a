"""`keel-pdp` as a process: bad settings end it with exit 2 and one line naming the flag and
the variable (no traceback), a broken serve variable leaves the other commands alone, mesh
settings are serve flags, and the old spellings (millisecond flags, top-level ledger tools,
`policy replay`) keep working with a note.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
import redis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.cli import main
from tests.conftest import ROOT, free_port
from tests.helpers import budget, wait_serving, write_bundle

# Variables that a shell or a manifest could leave behind, all broken.
BROKEN_SERVE_ENV = {"KEEL_METRICS_PORT": "abc", "KEEL_STORE_TIMEOUT_MS": "soon",
                    "KEEL_SWEEP_INTERVAL": "0", "KEEL_WORKERS": "many",
                    "KEEL_MESH_MAX_REQUEST_BYTES": "big", "KEEL_LEDGER_BLOCK": "-1"}


def keel(*argv: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    return subprocess.run([sys.executable, "-m", "keel_pdp.cli", *argv],
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def bundle(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_bundle(tmp_path / "policies", [budget("acme-daily", "100",
                                                       scope={"tenant": "acme"})])


def test_policy_check_works_with_a_garbage_metrics_port(bundle: pathlib.Path) -> None:
    res = keel("policy", "check", str(bundle), env=BROKEN_SERVE_ENV)
    assert res.returncode == 0, res.stderr
    assert f"{bundle}: ok" in res.stdout
    assert "Traceback" not in res.stderr


# (argv, env, what the one error line must name)
BAD: list[tuple[list[str], dict[str, str], tuple[str, ...]]] = [
    (["serve"], {"KEEL_METRICS_PORT": "abc"}, ("KEEL_METRICS_PORT", "--metrics-port", "abc")),
    (["serve", "--metrics-port", "abc"], {}, ("--metrics-port", "KEEL_METRICS_PORT")),
    (["serve", "--sweep-interval", "0"], {}, ("--sweep-interval", "KEEL_SWEEP_INTERVAL")),
    (["serve"], {"KEEL_RELOAD_INTERVAL": "0"}, ("KEEL_RELOAD_INTERVAL", "--reload-interval")),
    (["serve", "--budget-metrics-interval", "-1"], {},
     ("--budget-metrics-interval", "KEEL_BUDGET_METRICS_INTERVAL")),
    (["serve", "--first-message-timeout", "0"], {},
     ("--first-message-timeout must be between", "KEEL_FIRST_MESSAGE_TIMEOUT")),
    (["serve", "--store-timeout-ms", "0"], {}, ("--store-timeout-ms", "--store-timeout")),
    (["serve"], {"KEEL_STORE_TIMEOUT": "25ms"}, ("KEEL_STORE_TIMEOUT", "--store-timeout")),
    (["serve", "--log-level", "chatty"], {}, ("--log-level", "KEEL_LOG_LEVEL")),
    (["serve", "--mesh-max-request-bytes", "5"], {},
     ("--mesh-max-request-bytes", "KEEL_MESH_MAX_REQUEST_BYTES")),
    (["serve"], {"KEEL_MESH_STREAM_USAGE": "drop"},
     ("--mesh-stream-usage", "KEEL_MESH_STREAM_USAGE")),
    (["ledger", "--store", "sqlite:///x.db", "--claim-interval", "0"], {},
     ("--claim-interval", "KEEL_LEDGER_CLAIM_INTERVAL")),
    (["ledger", "--store", "sqlite:///x.db"], {"KEEL_LEDGER_BLOCK": "0"},
     ("KEEL_LEDGER_BLOCK", "--block")),
    (["ledger", "--store", "sqlite:///x.db", "--block-ms", "0"], {}, ("--block-ms", "--block")),
    (["ledger"], {"KEEL_LEDGER_METRICS_PORT": "x", "KEEL_LEDGER_STORE": "sqlite:///x.db"},
     ("KEEL_LEDGER_METRICS_PORT", "--metrics-port")),
]


@pytest.mark.parametrize(("argv", "env", "named"), BAD,
                         ids=[" ".join(a[1:]) + " " + " ".join(f"{k}={v}" for k, v in e.items())
                              for a, e, _ in BAD])
def test_a_bad_setting_ends_the_command_with_exit_2_naming_it(
        argv: list[str], env: dict[str, str], named: Sequence[str],
        tmp_path: pathlib.Path) -> None:
    res = keel(*argv, env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, res.stderr
    for word in named:
        assert word in lines[0], lines[0]


def test_serve_help_lists_every_mesh_setting_as_a_flag_with_its_variable() -> None:
    res = keel("serve", "--help")
    assert res.returncode == 0
    flat = " ".join(res.stdout.split())
    read = set(re.findall(r'"(KEEL_MESH_[A-Z_]+)"',
                          (ROOT / "keel_pdp" / "mesh" / "config.py").read_text()))
    assert read
    for name in sorted(read):
        # the flag, then its help up to the next mesh flag, naming the variable
        m = re.search(rf"--mesh-[a-z-]+ (?:(?!--mesh-).)*?\(env {name}\)", flat)
        assert m, f"{name}: no serve flag names it"
    # Durations are seconds everywhere; the usage offers no millisecond flag.
    usage = flat.split("Run the gRPC sidecar")[0]
    assert "--store-timeout S" in usage and "-ms" not in usage


# ------------------------------------------------------------------ old spellings
@contextlib.contextmanager
def _sidecar(bundle: pathlib.Path, redis_url: str, *args: str,
             env: dict[str, str] | None = None) -> Iterator[tuple[grpc.Channel, list[str]]]:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel_pdp.cli", "serve", "--policies", str(bundle),
         "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
         *args], env={**clean, **(env or {})}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_serving(channel)
        yield channel, out
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        out.append(err)
        assert proc.returncode == 0, err


def _authorize(channel: grpc.Channel, rid: str) -> int:
    r = pb_grpc.PolicyDecisionPointStub(channel).Authorize(pb.AuthorizeRequest(
        request_id=rid, tenant="acme", workload="w", model="gpt-4o-mini",
        estimated_input_tokens=100, max_output_tokens=50), timeout=5)
    return int(r.decision)


@pytest.mark.parametrize(("args", "env", "note"), [
    (("--store-timeout", "0.5", "--sweep-interval", "0.2", "--drain-delay", "0",
      "--mesh-stream-usage", "off"), {}, ""),
    (("--store-timeout-ms", "500", "--drain-delay", "0"), {}, "--store-timeout-ms is deprecated"),
    (("--drain-delay", "0",), {"KEEL_STORE_TIMEOUT_MS": "500"},
     "KEEL_STORE_TIMEOUT_MS is deprecated: use KEEL_STORE_TIMEOUT=0.5"),
], ids=["seconds", "old-flag", "old-variable"])
def test_serve_answers_with_the_new_and_the_old_spellings(
        bundle: pathlib.Path, redis_url: str, args: tuple[str, ...], env: dict[str, str],
        note: str) -> None:
    with _sidecar(bundle, redis_url, *args, env=env) as (channel, out):
        assert _authorize(channel, f"spell-{note[:8]}") == pb.ALLOW
    if note:
        assert note in out[0]
    else:
        assert "deprecated" not in out[0]


@pytest.mark.parametrize(("args", "env", "inline"), [
    ((), {}, False),
    (("--inline-decision-events",), {}, True),
    ((), {"KEEL_INLINE_DECISION_EVENTS": "1"}, True),
], ids=["stored", "inline-flag", "inline-variable"])
def test_serve_writes_decision_events_by_reference_unless_told_to_write_them_whole(
        bundle: pathlib.Path, redis_url: str, args: tuple[str, ...], env: dict[str, str],
        inline: bool) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = "keel:{pdp}:events"
    before = client.xlen(stream)
    with _sidecar(bundle, redis_url, "--drain-delay", "0", *args, env=env) as (channel, _):
        assert _authorize(channel, f"events-{len(args)}-{len(env)}") == pb.ALLOW
    raw: Any = client.xrange(stream)
    assert len(raw) == before + 1
    data = json.loads(raw[-1][1][b"data"])
    assert ("tenant" in data) is inline and ("shape" in data) is not inline
    if not inline:
        assert client.exists(f"keel:{{pdp}}:shape:{data['shape']}")


def test_the_ledger_writer_runs_with_seconds_and_with_old_milliseconds(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    for i, args in enumerate((["--block", "0.05", "--claim-idle", "0.1", "--claim-interval",
                               "0.1", "--trim-interval", "0.5"],
                              ["--block-ms", "50", "--claim-idle-ms", "100",
                               "--claim-interval-s", "0.1", "--trim-interval-s", "0.5"])):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "keel_pdp.cli", "ledger", "--redis-url", redis_url,
             "--store", f"sqlite:///{tmp_path / f'l{i}.db'}", *args], env=clean,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert "keel-pdp ledger writer:" in first, err
        assert proc.returncode == 0, err
        assert ("deprecated" in err) is (i == 1), err


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_top_level_ledger_tools_and_policy_replay_still_work_with_a_note(
        capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path,
        bundle: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("KEEL_ACTOR", "tester")
    rc, _, _ = _run(capsys, "ledger", "period", "adjust", "--store", store, "--period",
                    "2026-10", "--amount-usd", "-1.25", "--tenant", "acme", "--reason",
                    "test", "--key", "k1")
    assert rc == 0
    pairs = [
        (["period", "status", "--period", "2026-10"],
         ["ledger", "period", "status", "--period", "2026-10"], "keel-pdp ledger period"),
        (["report", "--period", "2026-10", "--format", "csv"],
         ["ledger", "report", "--period", "2026-10", "--format", "csv"],
         "keel-pdp ledger report"),
        (["export", "--period", "2026-10", "--out", "-"],
         ["ledger", "export", "--period", "2026-10", "--out", "-"], "keel-pdp ledger export"),
        (["replay", "--period", "2026-10", "--candidate", str(bundle), "--format", "json"],
         ["ledger", "replay", "--period", "2026-10", "--candidate", str(bundle), "--format",
          "json"], "keel-pdp ledger replay"),
        (["policy", "replay", "--period", "2026-10", "--candidate", str(bundle), "--format",
          "json"], ["ledger", "replay", "--period", "2026-10", "--candidate", str(bundle),
                    "--format", "json"], "keel-pdp ledger replay"),
    ]
    for old, new, named in pairs:
        rc_old, out_old, err_old = _run(capsys, *old, "--store", store)
        rc_new, out_new, err_new = _run(capsys, *new, "--store", store)
        assert rc_old == rc_new == 0, (old, err_old, err_new)
        assert out_old == out_new and out_new, old
        assert named in err_old and "deprecated" in err_old, err_old
        assert "deprecated" not in err_new, err_new
    assert "-1.25" in _run(capsys, "ledger", "period", "status", "--store", store)[1]


def test_serve_writes_the_records_format_its_deployment_declares(
        bundle: pathlib.Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)

    def record_type(rid: str) -> bytes:
        with _sidecar(bundle, redis_url, "--drain-delay", "0") as (channel, _):
            assert _authorize(channel, rid) == pb.ALLOW
        kind = client.type(f"keel:{{pdp}}:req:acme:{rid}")
        assert isinstance(kind, bytes)
        return kind

    # A store an earlier release wrote (its layout and stream, no records key).
    client.set("keel:{pdp}:layout", "1")
    client.xadd("keel:{pdp}:events", {"type": "decision"})
    assert record_type("old-1") == b"hash"
    upgraded = subprocess.run(
        [sys.executable, "-m", "keel_pdp.cli", "records", "--redis-url", redis_url,
         "--upgrade"], capture_output=True, text=True, timeout=60)
    assert upgraded.returncode == 0 and "format 1 -> 2" in upgraded.stdout, upgraded
    assert record_type("old-2") == b"string"
    # A new deployment writes format 2 from its first start.
    client.flushall()
    assert record_type("new-1") == b"string"
    assert client.get("keel:{pdp}:records") == b"2"
