"""Settings of `serve` and of the ledger writer: every bad value refused naming its flag
and its variable, busy-loop intervals refused, one unit for durations (seconds) with the
old millisecond spellings still accepted, mesh settings as flags, parsers that read no
environment while they are built.

The expectations here (which values are bad, what the documented defaults are, which
variables the mesh reads) are written out in this module, not taken from the tables
under test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import re
from typing import Any

import pytest
import yaml

from keel_pdp import cli
from keel_pdp.errors import SettingsError
from keel_pdp.ledger.commands import writer_settings
from keel_pdp.settings import serve_settings
from tests.conftest import ROOT

# (flag, variable, bad value, words the message must contain)
SERVE_BAD = [
    ("--redis-url", "KEEL_REDIS_URL", "http://cache:6379", "scheme must be"),
    ("--redis-url", "KEEL_REDIS_URL", "redis://h1:1,h2:2", "redis+cluster://"),
    ("--redis-url", "KEEL_REDIS_URL", "redis+cluster://h1:1,,h2:2/", "empty seed node"),
    ("--wait-replicas", "KEEL_WAIT_REPLICAS", "-1", "between 0 and 16"),
    ("--wait-replicas", "KEEL_WAIT_REPLICAS", "one", "not an integer"),
    ("--key-shards", "KEEL_KEY_SHARDS", "1025", "between 0 and 1024"),
    ("--key-shards", "KEEL_KEY_SHARDS", "-2", "between 0 and 1024"),
    ("--listen", "KEEL_LISTEN", "localhost", "HOST:PORT"),
    ("--listen", "KEEL_LISTEN", "127.0.0.1:70000", "HOST:PORT"),
    ("--metrics-port", "KEEL_METRICS_PORT", "abc", "not an integer"),
    ("--metrics-port", "KEEL_METRICS_PORT", "65536", "not a port"),
    ("--metrics-port", "KEEL_METRICS_PORT", "-1", "not a port"),
    ("--store-timeout", "KEEL_STORE_TIMEOUT", "0", "between 0.001 and 5 seconds"),
    ("--store-timeout", "KEEL_STORE_TIMEOUT", "25", "between 0.001 and 5 seconds"),
    ("--store-timeout", "KEEL_STORE_TIMEOUT", "25ms", "not a number of seconds"),
    ("--store-timeout", "KEEL_STORE_TIMEOUT", "nan", "not a number of seconds"),
    ("--sweep-interval", "KEEL_SWEEP_INTERVAL", "0", "would spin"),
    ("--sweep-interval", "KEEL_SWEEP_INTERVAL", "-1", "would spin"),
    ("--sweep-interval", "KEEL_SWEEP_INTERVAL", "inf", "not a number of seconds"),
    ("--reload-interval", "KEEL_RELOAD_INTERVAL", "0", "would spin"),
    ("--reload-interval", "KEEL_RELOAD_INTERVAL", "0.0001", "would spin"),
    ("--budget-metrics-interval", "KEEL_BUDGET_METRICS_INTERVAL", "-5", "0 disables"),
    ("--budget-metrics-interval", "KEEL_BUDGET_METRICS_INTERVAL", "0.001", "0 disables"),
    ("--first-message-timeout", "KEEL_FIRST_MESSAGE_TIMEOUT", "0", "must be between"),
    ("--first-message-timeout", "KEEL_FIRST_MESSAGE_TIMEOUT", "1e999", "must be between"),
    ("--log-level", "KEEL_LOG_LEVEL", "verbose", "must be DEBUG"),
    ("--allow-insecure-listen", "KEEL_ALLOW_INSECURE_LISTEN", "maybe", "not a boolean"),
    ("--worker-ports", "KEEL_WORKER_PORTS", "sometimes", "not a boolean"),
    ("--inline-decision-events", "KEEL_INLINE_DECISION_EVENTS", "perhaps", "not a boolean"),
    ("--max-concurrent-rpcs", "KEEL_MAX_CONCURRENT_RPCS", "0", "between 1 and 1000000"),
    ("--max-concurrent-rpcs", "KEEL_MAX_CONCURRENT_RPCS", "1.5", "not an integer"),
    ("--drain-delay", "KEEL_DRAIN_DELAY", "-1", "between 0 and 3600 seconds"),
    ("--grace", "KEEL_GRACE", "soon", "not a number of seconds"),
    ("--grace", "KEEL_GRACE", "-0.5", "between 0 and 3600 seconds"),
    ("--workers", "KEEL_WORKERS", "0", "between 1 and 64"),
    ("--workers", "KEEL_WORKERS", "65", "between 1 and 64"),
    ("--caller-auth", "KEEL_CALLER_AUTH", "strict", "must be open, enforce or observe"),
    ("--mesh-max-request-bytes", "KEEL_MESH_MAX_REQUEST_BYTES", "5", "between 1024"),
    ("--mesh-max-response-bytes", "KEEL_MESH_MAX_RESPONSE_BYTES", "lots", "not an integer"),
    ("--mesh-closeout-attempts", "KEEL_MESH_CLOSEOUT_ATTEMPTS", "0", "between 1 and 20"),
    ("--mesh-unseen-permit", "KEEL_MESH_UNSEEN_PERMIT_S", "-1", "between 0 and 3600"),
    ("--mesh-pass-unmetered", "KEEL_MESH_PASS_UNMETERED", "perhaps", "not a boolean"),
    ("--mesh-resign-signed", "KEEL_MESH_RESIGN_SIGNED", "2", "not a boolean"),
    ("--mesh-stream-usage", "KEEL_MESH_STREAM_USAGE", "drop", "must be one of"),
    ("--mesh-provider-hosts", "KEEL_MESH_PROVIDER_HOSTS", "openai", "HOST_SUBSTRING=PROVIDER"),
    ("--mesh-azure-deployments", "KEEL_MESH_AZURE_DEPLOYMENTS", "prod", "DEPLOYMENT=MODEL"),
    ("--mesh-unmetered-routes", "KEEL_MESH_UNMETERED_ROUTES", "a b/c", "HOST[/PATH_PREFIX]"),
]
# serve flags that take any text (paths, names): nothing to refuse on its own.
SERVE_FREE = {"--policies", "--metrics-host", "--key-prefix", "--admin-token-file",
              "--tls-cert", "--tls-key", "--tls-client-ca", "--admin-identities",
              "--outbox-dir", "--caller-tokens-file", "--mesh-tenant-header",
              "--mesh-workload-header", "--mesh-provider-header", "--mesh-request-id-header"}

WRITER_BAD = [
    ("--redis-url", "KEEL_REDIS_URL", "tcp://x", "scheme must be"),
    ("--key-shards", "KEEL_KEY_SHARDS", "many", "not an integer"),
    ("--metrics-port", "KEEL_LEDGER_METRICS_PORT", "ninety", "not an integer"),
    ("--batch-size", "KEEL_LEDGER_BATCH_SIZE", "0", "between 1 and"),
    ("--block", "KEEL_LEDGER_BLOCK", "0", "between 0.001 and 60 seconds"),
    ("--block", "KEEL_LEDGER_BLOCK", "1000", "between 0.001 and 60 seconds"),
    ("--claim-idle", "KEEL_LEDGER_CLAIM_IDLE", "0", "seconds"),
    ("--claim-interval", "KEEL_LEDGER_CLAIM_INTERVAL", "0", "would spin"),
    ("--trim-interval", "KEEL_LEDGER_TRIM_INTERVAL", "-3", "would spin"),
    ("--no-trim", "KEEL_LEDGER_NO_TRIM", "sometimes", "not a boolean"),
    ("--log-level", "KEEL_LOG_LEVEL", "loud", "must be DEBUG"),
]
WRITER_FREE = {"--store", "--key-prefix", "--metrics-host", "--group", "--consumer"}
# Flags that take no value: only their variable can be bad.
SWITCHES = {"--allow-insecure-listen", "--worker-ports", "--no-trim", "--inline-decision-events"}
STORE = {"KEEL_LEDGER_STORE": "sqlite:///unused.db"}


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def serve(*argv: str, env: dict[str, str] | None = None) -> Any:
    return serve_settings(parse("serve", *argv), env or {})


def writer(*argv: str, env: dict[str, str] | None = None) -> Any:
    return writer_settings(parse("ledger", *argv), {**STORE, **(env or {})})


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions if a.help != argparse.SUPPRESS
            for o in a.option_strings if o.startswith("--") and o != "--help"}


def sub_parser(*path: str) -> argparse.ArgumentParser:
    p = cli.build_parser()
    for name in path:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = action.choices[name]
    return p


# ------------------------------------------------------------ each bad value
@pytest.mark.parametrize(("flag", "env", "bad", "words"), SERVE_BAD,
                         ids=[f"{f}={b}" for f, _, b, _ in SERVE_BAD])
def test_a_bad_serve_flag_is_refused_naming_flag_and_variable(
        flag: str, env: str, bad: str, words: str) -> None:
    if flag in SWITCHES:
        assert getattr(serve(flag), flag[2:].replace("-", "_")) is True
        return
    with pytest.raises(SettingsError) as err:
        serve(f"{flag}={bad}")
    text = str(err.value)
    assert flag in text and env in text and words in text, text


@pytest.mark.parametrize(("flag", "env", "bad", "words"), SERVE_BAD,
                         ids=[f"{e}={b}" for _, e, b, _ in SERVE_BAD])
def test_a_bad_serve_variable_is_refused_naming_variable_and_flag(
        flag: str, env: str, bad: str, words: str) -> None:
    with pytest.raises(SettingsError) as err:
        serve(env={env: bad})
    text = str(err.value)
    assert flag in text and env in text and words in text, text


@pytest.mark.parametrize(("flag", "env", "bad", "words"), WRITER_BAD,
                         ids=[f"{f}={b}" for f, _, b, _ in WRITER_BAD])
def test_a_bad_ledger_writer_setting_is_refused_by_flag_and_by_variable(
        flag: str, env: str, bad: str, words: str) -> None:
    for argv, env_vars in (([f"{flag}={bad}"] if flag not in SWITCHES else [], {}),
                           ([], {env: bad})):
        if not argv and not env_vars:
            continue
        with pytest.raises(SettingsError) as err:
            writer(*argv, env=env_vars)
        text = str(err.value)
        assert flag in text and env in text and words in text, text


def test_every_flag_is_covered_by_a_bad_value_or_is_free_text() -> None:
    """A new setting without a bad-value case here fails this test."""
    assert flags_of(sub_parser("serve")) == {f for f, *_ in SERVE_BAD} | SERVE_FREE
    writer_flags = flags_of(sub_parser("ledger"))
    assert writer_flags == {f for f, *_ in WRITER_BAD} | WRITER_FREE


def test_the_writer_without_a_store_is_refused() -> None:
    with pytest.raises(SettingsError, match="--store is required"):
        writer_settings(parse("ledger"), {})


def test_a_password_in_a_refused_redis_url_is_not_shown() -> None:
    for argv, env in ((["--redis-url", "http://app:hunter2@cache:6379"], {}),
                      ([], {"KEEL_REDIS_URL": "http://app:hunter2@cache:6379"})):
        with pytest.raises(SettingsError) as err:
            serve(*argv, env=env)
        assert "hunter2" not in str(err.value) and "app:***@cache" in str(err.value)


# ------------------------------------------------------------ defaults, precedence
def test_documented_defaults_with_an_empty_environment() -> None:
    s = serve()
    assert (s.policies, s.redis_url, s.listen, s.metrics_port, s.metrics_host) == (
        "policies", "redis://127.0.0.1:6379/0", "127.0.0.1:50051", 9464, "127.0.0.1")
    assert (s.store_timeout_s, s.sweep_interval_s, s.reload_interval_s, s.grace_s,
            s.drain_delay_s, s.first_message_timeout_s, s.budget_metrics_interval_s) == (
        0.025, 1.0, 2.0, 5.0, 1.0, 2.0, 15.0)
    assert (s.workers, s.max_concurrent_rpcs, s.log_level, s.caller_auth_mode) == (
        1, 1024, "INFO", "open")
    assert s.notes == ()
    w = writer()
    assert (w.metrics_port, w.group, w.batch_size, w.no_trim) == (0, "keel-ledger", 500, False)
    c = w.config()
    assert (c.block_ms, c.claim_idle_ms, c.claim_interval_s, c.trim_interval_s, c.trim) == (
        1000, 60_000, 10.0, 30.0, True)


def test_a_flag_wins_over_its_variable_and_empty_variables_mean_unset() -> None:
    s = serve("--metrics-port", "9999", "--grace", "2.5",
              env={"KEEL_METRICS_PORT": "1234", "KEEL_GRACE": "9", "KEEL_WORKERS": "3",
                   "KEEL_LISTEN": "", "KEEL_ALLOW_INSECURE_LISTEN": "true"})
    assert (s.metrics_port, s.grace_s, s.workers, s.listen) == (9999, 2.5, 3,
                                                                "127.0.0.1:50051")
    assert s.allow_insecure_listen is True
    assert serve("--log-level", "debug").log_level == "DEBUG"


def test_decision_events_refer_to_stored_shapes_unless_told_to_write_them_inline() -> None:
    assert serve().inline_decision_events is False
    assert serve("--inline-decision-events").inline_decision_events is True
    assert serve(env={"KEEL_INLINE_DECISION_EVENTS": "true"}).inline_decision_events is True


def test_zero_means_off_for_the_budget_gauges_only() -> None:
    assert serve("--budget-metrics-interval", "0").budget_metrics_interval_s == 0
    for flag in ("--sweep-interval", "--reload-interval"):
        with pytest.raises(SettingsError, match="would spin"):
            serve(flag, "0")
    for flag in ("--claim-interval", "--trim-interval", "--block", "--claim-idle"):
        with pytest.raises(SettingsError, match=flag):
            writer(flag, "0")


# ------------------------------------------------------------ one unit, old spellings
@pytest.mark.parametrize(("argv", "env"), [
    (["--store-timeout", "0.025"], {}),
    (["--store-timeout-ms", "25"], {}),
    ([], {"KEEL_STORE_TIMEOUT": "0.025"}),
    ([], {"KEEL_STORE_TIMEOUT_MS": "25"}),
    ([], {"KEEL_STORE_TIMEOUT": "0.025", "KEEL_STORE_TIMEOUT_MS": "999"}),
    (["--store-timeout", "0.025"], {"KEEL_STORE_TIMEOUT_MS": "999"}),
])
def test_the_store_timeout_in_seconds_and_in_its_old_milliseconds(
        argv: list[str], env: dict[str, str]) -> None:
    s = serve(*argv, env=env)
    assert s.store_timeout_s == pytest.approx(0.025)
    old = "--store-timeout-ms" in argv or ("KEEL_STORE_TIMEOUT_MS" in env and not argv
                                           and "KEEL_STORE_TIMEOUT" not in env)
    assert bool(s.notes) is old
    if old:
        assert "deprecated" in s.notes[0] and "0.025" in s.notes[0]


def test_old_and_new_spelling_together_is_refused() -> None:
    with pytest.raises(SettingsError, match="--store-timeout-ms are both given"):
        serve("--store-timeout", "0.5", "--store-timeout-ms", "500")


def test_old_millisecond_values_keep_their_range() -> None:
    with pytest.raises(SettingsError, match=r"--store-timeout-ms must be between 1 and 5000"):
        serve("--store-timeout-ms", "0")
    with pytest.raises(SettingsError, match=r"KEEL_STORE_TIMEOUT_MS 'x' is not an integer"):
        serve(env={"KEEL_STORE_TIMEOUT_MS": "x"})
    with pytest.raises(SettingsError, match=r"--block-ms must be between 1 and 60000"):
        writer("--block-ms", "0")
    with pytest.raises(SettingsError, match="--claim-interval must be between"):
        writer("--claim-interval-s", "0")


def test_the_ledger_writers_old_spellings_mean_the_same_config() -> None:
    old = writer("--block-ms", "50", "--claim-idle-ms", "100", "--claim-interval-s", "0.1",
                 "--trim-interval-s", "7")
    new = writer("--block", "0.05", "--claim-idle", "0.1", "--claim-interval", "0.1",
                 "--trim-interval", "7")
    assert old.config() == new.config()
    assert (new.config().block_ms, new.config().claim_idle_ms) == (50, 100)
    assert len(old.notes) == 4 and not new.notes
    env = writer(env={"KEEL_LEDGER_BLOCK_MS": "250", "KEEL_LEDGER_CLAIM_IDLE_MS": "5000"})
    assert (env.config().block_ms, env.config().claim_idle_ms) == (250, 5000)


# ------------------------------------------------------------ mesh
MESH_SOURCE = ROOT / "keel_pdp" / "mesh" / "config.py"


def test_every_mesh_variable_is_a_serve_flag_with_its_name_in_the_help() -> None:
    read = set(re.findall(r'"(KEEL_MESH_[A-Z_]+)"', MESH_SOURCE.read_text()))
    assert len(read) >= 14
    text = sub_parser("serve").format_help()
    flat = " ".join(text.split())
    for name in read:
        assert name in flat, f"{name} has no serve flag"


def test_mesh_flags_reach_the_mesh_config_over_the_environment() -> None:
    s = serve("--mesh-tenant-header", "X-Team", "--mesh-stream-usage", "off",
              "--mesh-unmetered-routes", "*/healthz,api.openai.com/v1/files",
              env={"KEEL_MESH_TENANT_HEADER": "x-other", "KEEL_MESH_CLOSEOUT_ATTEMPTS": "7"})
    assert s.mesh is not None
    assert s.mesh.tenant_header == "x-team"
    assert s.mesh.stream_usage == "off"
    assert s.mesh.closeout_attempts == 7
    assert s.mesh.listed_unmetered("api.openai.com", "/v1/files/abc")
    assert not s.mesh.listed_unmetered("api.openai.com", "/v1/chat/completions")


# ------------------------------------------------------------ parsers read no environment
GARBAGE = {env: "garbage" for _, env, _, _ in SERVE_BAD + WRITER_BAD}


def test_building_the_parsers_reads_no_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    for name, value in {**GARBAGE, "KEEL_STORE_TIMEOUT_MS": "x"}.items():
        monkeypatch.setenv(name, value)
    ns = parse("policy", "check", str(tmp_path))
    assert ns.command == "policy"
    with pytest.raises(SettingsError, match="KEEL_"):
        serve_settings(parse("serve"))  # serve itself still refuses them


def test_a_broken_serve_variable_does_not_stop_other_commands(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    for name, value in GARBAGE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KEEL_LEDGER_STORE", f"sqlite:///{tmp_path / 'l.db'}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["ledger", "period", "status"]) == 0
    assert "no periods yet" in out.getvalue()


# ------------------------------------------------------------ command layout
def test_ledger_tools_are_listed_under_ledger_and_hidden_at_top_level() -> None:
    top = cli.build_parser().format_help()
    for name in ("period", "report", "export", "replay"):
        assert not re.search(rf"^\s+{name}\s", top, re.M), f"{name} listed at top level"
    assert re.search(r"^\s+ledger\s", top, re.M)
    ledger = sub_parser("ledger").format_help()
    for name in ("import", "period", "report", "export", "replay"):
        assert re.search(rf"^\s+{name}\s", ledger, re.M), f"{name} missing under ledger"
    assert not re.search(r"^\s+replay\s", sub_parser("policy").format_help(), re.M)


@pytest.mark.parametrize("old", [["period", "status"], ["report"], ["export"], ["replay"],
                                 ["policy", "replay"]])
def test_old_spellings_parse_to_the_same_command_with_a_note(old: list[str]) -> None:
    new = ["ledger", old[-1]] if old[0] == "policy" else ["ledger", *old]
    rest = {"report": ["--period", "2026-11"],
            "export": ["--period", "2026-11", "--out", "-"],
            "replay": ["--period", "2026-11", "--candidate", "p"],
            "status": []}[old[-1]]
    a, b = parse(*old, *rest), parse(*new, *rest)
    assert a.func is b.func
    assert "keel-pdp ledger " + old[-1 if old[0] != "period" else 0] in a.deprecated_spelling
    assert getattr(b, "deprecated_spelling", None) is None


def test_parsers_built_twice_in_one_process_register_replay_once_each() -> None:
    for _ in range(3):
        cli.build_parser()  # a conflicting `replay` would raise here


def test_the_kubernetes_manifests_use_no_deprecated_spelling() -> None:
    seen = set()
    for path in sorted((ROOT / "deploy" / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                args = c.get("args", [])
                if args[:1] == ["serve"]:
                    assert serve_settings(parse(*args), {}).notes == (), path
                    seen.add("serve")
                elif args[:1] == ["ledger"]:
                    assert writer_settings(parse(*args), {}).notes == (), path
                    seen.add("ledger")
    assert seen == {"serve", "ledger"}
