"""``keel-pdp serve``'s settings: flags, each with an environment variable, validated.

Each long-running command has one settings model (``ServeSettings`` here, the
ledger writer's in ``keel_pdp.ledger.commands``) described by a table of
``Setting`` rows (keel_pdp.flags): flag, environment variable, built-in default,
kind (integer, seconds, choice, ...) and help. Building a parser reads nothing
from the environment; the command that runs resolves its own table after
parsing: the flag if given, else the variable, else the default. So a bad
``KEEL_METRICS_PORT`` concerns ``serve`` only, never ``policy check``.

A bad value is a ``SettingsError`` whose message names the flag and the
variable; the CLI prints it and exits 2.

Durations are seconds, decimals allowed (``--store-timeout 0.025`` is 25 ms):
most durations were already seconds (grace, drain delay, intervals), Python's
and gRPC's timeouts are seconds, and Prometheus reports seconds. The old
millisecond spellings (``--store-timeout-ms``, the ledger writer's
``--block-ms``, ...) stay accepted as deprecated aliases that print a note.
Intervals of loops have a floor (0 would spin a core).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keel_pdp.errors import SettingsError
from keel_pdp.flags import (
    LOG_LEVELS,
    Alias,
    Bad,
    Choice,
    HostPort,
    Integer,
    Loop,
    Port,
    RedisUrl,
    Seconds,
    Setting,
    Switch,
    add_settings,
    ms_to_seconds,
    redacted_url,
    resolve,
)

if TYPE_CHECKING:
    from keel_pdp.mesh.config import MeshConfig

__all__ = ["MESH", "SERVE", "ServeSettings", "SettingsError", "add_serve_arguments",
           "mesh_config", "redacted_url", "serve_settings"]

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_PORT = 9464


SERVE: tuple[Setting, ...] = (
    Setting("policies", "--policies", "KEEL_POLICIES", "policies", metavar="DIR",
            help="policy bundle directory"),
    Setting("redis_url", "--redis-url", "KEEL_REDIS_URL", "redis://127.0.0.1:6379/0",
            RedisUrl(), "Redis URL: redis://, rediss:// (TLS), unix://, or "
            "redis+cluster://h1:p1,h2:p2/ for Redis Cluster seed nodes", "URL"),
    Setting("listen", "--listen", "KEEL_LISTEN", DEFAULT_LISTEN, HostPort(), "gRPC address",
            "HOST:PORT"),
    Setting("metrics_port", "--metrics-port", "KEEL_METRICS_PORT", str(DEFAULT_METRICS_PORT),
            Port(), "Prometheus /metrics port, 0 disables", "PORT"),
    Setting("metrics_host", "--metrics-host", "KEEL_METRICS_HOST", "127.0.0.1",
            help="address the metrics endpoint binds", metavar="HOST"),
    Setting("store_timeout_s", "--store-timeout", "KEEL_STORE_TIMEOUT", "0.025",
            Seconds(0.001, 5), "seconds each budget store call may take", "S",
            Alias("--store-timeout-ms", "KEEL_STORE_TIMEOUT_MS", Integer(1, 5000, " ms"),
                  ms_to_seconds)),
    Setting("key_prefix", "--key-prefix", "KEEL_KEY_PREFIX", "keel", help="Redis key prefix",
            metavar="P"),
    Setting("key_shards", "--key-shards", "KEEL_KEY_SHARDS", "0", Integer(0, 1024),
            "key shards (hash tags; tenants spread over them): 0 = 1 on a standalone "
            "Redis, 64 on Redis Cluster; every sidecar and the ledger writer of a "
            "deployment must use the same value", "N"),
    Setting("wait_replicas", "--wait-replicas", "KEEL_WAIT_REPLICAS", "0", Integer(0, 16),
            "after each hold/settle script, WAIT until N replicas have it (same round trip, "
            "at most half the store timeout; a short count is counted and answered as "
            "usual); 0 off", "N"),
    Setting("inline_decision_events", "--inline-decision-events",
            "KEEL_INLINE_DECISION_EVENTS", "false", Switch(),
            "write each decision event whole, as releases before stored shape copies did "
            "(for a rolling upgrade while ledger writers of such a release still run; "
            "docs/ledger.md, 'Stored shape copies')"),
    Setting("sweep_interval_s", "--sweep-interval", "KEEL_SWEEP_INTERVAL", "1",
            Loop(0.01, 3600), "seconds between expiry sweeps", "S"),
    Setting("reload_interval_s", "--reload-interval", "KEEL_RELOAD_INTERVAL", "2",
            Loop(0.01, 3600), "seconds between policy directory checks", "S"),
    Setting("log_level", "--log-level", "KEEL_LOG_LEVEL", "INFO", Choice(LOG_LEVELS, True),
            "DEBUG, INFO, WARNING, ERROR or CRITICAL", "LEVEL"),
    Setting("admin_token_file", "--admin-token-file", "KEEL_ADMIN_TOKEN_FILE", "",
            help="file holding the admin API bearer token, re-read on each call (or the "
                 "token itself in KEEL_ADMIN_TOKEN)", metavar="FILE"),
    Setting("tls_cert", "--tls-cert", "KEEL_TLS_CERT", "", metavar="FILE",
            help="PEM certificate chain for the gRPC port (reloaded when it changes)"),
    Setting("tls_key", "--tls-key", "KEEL_TLS_KEY", "", help="PEM private key",
            metavar="FILE"),
    Setting("tls_client_ca", "--tls-client-ca", "KEEL_TLS_CLIENT_CA", "", metavar="FILE",
            help="PEM CA bundle: require client certificates signed by it (mutual TLS)"),
    Setting("allow_insecure_listen", "--allow-insecure-listen", "KEEL_ALLOW_INSECURE_LISTEN",
            "false", Switch(), "allow a plaintext listener on a non-loopback address",
            show_default=False),
    Setting("max_concurrent_rpcs", "--max-concurrent-rpcs", "KEEL_MAX_CONCURRENT_RPCS", "1024",
            Integer(1, 1_000_000), "beyond this many RPCs being served (request received), "
            "answer RESOURCE_EXHAUSTED at once; calls still waiting for their request are not "
            "counted, health checks are never refused", "N"),
    Setting("first_message_timeout_s", "--first-message-timeout", "KEEL_FIRST_MESSAGE_TIMEOUT",
            "2", Seconds(0.05, 60), "seconds a call may wait between its headers and its "
            "request message before it is ended (idle or half-sent streams)", "S"),
    Setting("admin_identities", "--admin-identities", "KEEL_ADMIN_IDENTITIES", "",
            help="comma-separated client certificate names (CN or SAN) allowed to call the "
                 "admin API without a token (mutual TLS only)", metavar="A,B"),
    Setting("outbox_dir", "--outbox-dir", "KEEL_OUTBOX_DIR", "", metavar="DIR",
            help="journal decisions taken while Redis is unreachable in this directory, so a "
                 "restart replays them (default: memory only)"),
    Setting("drain_delay_s", "--drain-delay", "KEEL_DRAIN_DELAY", "1", Seconds(0, 3600),
            "seconds to keep serving after SIGTERM while health says NOT_SERVING", "S"),
    Setting("workers", "--workers", "KEEL_WORKERS", "1", Integer(1, 64),
            "pre-fork N processes sharing the port (SO_REUSEPORT); worker i serves metrics on "
            "--metrics-port + i", "N"),
    Setting("worker_ports", "--worker-ports", "KEEL_WORKER_PORTS", "false", Switch(),
            "each worker also serves alone on the --listen port + 1 + i (i = 0..N-1), so a "
            "proxy can balance calls over the workers: Envoy lists those ports as the Keel "
            "cluster's endpoints (docs/mesh.md, 'Bursts')"),
    Setting("caller_auth", "--caller-auth", "KEEL_CALLER_AUTH", "",
            Choice(("", "open", "enforce", "observe")),
            "caller identity checks against the bundle's Callers bindings: open (none), "
            "enforce (refuse), observe (log and count); default open on a loopback listener, "
            "enforce otherwise", "MODE"),
    Setting("caller_tokens_file", "--caller-tokens-file", "KEEL_CALLER_TOKENS_FILE", "",
            help="file of '<identity> <bearer token>' lines: callers without a client "
                 "certificate identify with a token", metavar="FILE"),
    Setting("grace_s", "--grace", "KEEL_GRACE", "5", Seconds(0, 3600),
            "seconds in-flight RPCs get to finish on SIGTERM", "S"),
    Setting("budget_metrics_interval_s", "--budget-metrics-interval",
            "KEEL_BUDGET_METRICS_INTERVAL", "15", Loop(0.05, 3600, zero_off=True),
            "seconds between refreshes of the per-budget utilisation gauges from the store; "
            "0 disables", "S"),
)
_SERVE = {s.name: s for s in SERVE}

# The mesh adapters' settings (keel_pdp.mesh.config reads and checks them):
# flag, variable, metavar, help.
MESH: tuple[tuple[str, str, str, str], ...] = (
    ("--mesh-tenant-header", "KEEL_MESH_TENANT_HEADER", "NAME",
     "header naming the tenant (default x-keel-tenant)"),
    ("--mesh-workload-header", "KEEL_MESH_WORKLOAD_HEADER", "NAME",
     "header naming the workload (default x-keel-workload)"),
    ("--mesh-provider-header", "KEEL_MESH_PROVIDER_HEADER", "NAME",
     "header naming the provider (default x-keel-provider)"),
    ("--mesh-request-id-header", "KEEL_MESH_REQUEST_ID_HEADER", "NAME",
     "header carrying the idempotency key (default x-request-id)"),
    ("--mesh-pass-unmetered", "KEEL_MESH_PASS_UNMETERED", "BOOL",
     "true: pass calls Keel cannot meter to hosts that are not LLM providers (counted, "
     "logged); default false"),
    ("--mesh-unmetered-routes", "KEEL_MESH_UNMETERED_ROUTES", "HOST[/PATH],...",
     "routes explicitly not LLM traffic: passed, counted, logged"),
    ("--mesh-azure-deployments", "KEEL_MESH_AZURE_DEPLOYMENTS", "DEPLOYMENT=MODEL,...",
     "fallback Azure OpenAI deployment -> price-table model, for deployments the bundle's "
     "kind: Deployments does not map (the bundle wins)"),
    ("--mesh-resign-signed", "KEEL_MESH_RESIGN_SIGNED", "BOOL",
     "true: Envoy re-signs SigV4 requests after Keel's filters, so Keel may rewrite Bedrock "
     "bodies; default false"),
    ("--mesh-stream-usage", "KEEL_MESH_STREAM_USAGE", "strip|pass|off",
     "chat streams that do not ask for usage: ask and strip the extra chunk, ask and pass "
     "it, or settle on the estimate; default strip"),
    ("--mesh-provider-hosts", "KEEL_MESH_PROVIDER_HOSTS", "SUBSTRING=PROVIDER,...",
     "host substring -> provider, replacing the built-in list"),
    ("--mesh-max-request-bytes", "KEEL_MESH_MAX_REQUEST_BYTES", "N",
     "Envoy's with_request_body.max_request_bytes; default 1048576"),
    ("--mesh-max-response-bytes", "KEEL_MESH_MAX_RESPONSE_BYTES", "N",
     "largest JSON response kept in memory to read its usage; default 33554432"),
    ("--mesh-closeout-attempts", "KEEL_MESH_CLOSEOUT_ATTEMPTS", "N",
     "closeout/void attempts while Redis is unreachable; default 5"),
    ("--mesh-unseen-permit", "KEEL_MESH_UNSEEN_PERMIT_S", "S",
     "seconds after which a permit whose call never reached ext_proc is voided, whole "
     "seconds, 0 never; default 30"),
)


def _mesh_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_settings(p, SERVE)
    g = p.add_argument_group("service mesh (Envoy ext_authz / ext_proc on the same port)")
    for flag, env, metavar, text in MESH:
        g.add_argument(flag, dest=_mesh_dest(flag), default=None, metavar=metavar,
                       help=f"{text} (env {env})")


@dataclass(frozen=True)
class ServeSettings:
    """What ``keel-pdp serve`` runs with; ``validate`` checks values given in code too."""

    policies: str
    redis_url: str
    listen: str
    metrics_port: int
    metrics_host: str
    store_timeout_s: float
    key_prefix: str
    sweep_interval_s: float
    reload_interval_s: float
    log_level: str
    grace_s: float
    admin_token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    allow_insecure_listen: bool = False
    max_concurrent_rpcs: int = 1024
    first_message_timeout_s: float = 2.0
    admin_identities: tuple[str, ...] = ()
    outbox_dir: str = ""
    drain_delay_s: float = 1.0
    workers: int = 1
    worker_ports: bool = False
    # open | enforce | observe; '' = open on a loopback listener, enforce otherwise
    caller_auth: str = ""
    caller_tokens_file: str = ""
    budget_metrics_interval_s: float = 15.0
    wait_replicas: int = 0
    inline_decision_events: bool = False
    key_shards: int = 0
    # The mesh adapters' settings; None: read KEEL_MESH_* when the server is built.
    mesh: MeshConfig | None = None
    # Deprecated spellings that were used (printed once at start).
    notes: tuple[str, ...] = ()

    @property
    def caller_auth_mode(self) -> str:
        """The caller identity mode in effect (see keel_pdp.server.identity)."""
        if self.caller_auth:
            return self.caller_auth
        host = self.listen.rpartition(":")[0]
        return "open" if host in ("127.0.0.1", "localhost", "::1", "[::1]") else "enforce"

    def admin_token(self) -> str | None:
        """Read on every call, so a rotated token file takes effect at once."""
        if self.admin_token_file:
            try:
                with open(self.admin_token_file, encoding="utf-8") as fh:
                    return fh.read().strip() or None
            except OSError:
                return None
        return os.environ.get("KEEL_ADMIN_TOKEN") or None

    def validate(self) -> ServeSettings:
        for name, s in _SERVE.items():
            value = getattr(self, name)
            if name == "admin_identities":
                continue
            try:
                s.kind.check(value)
            except Bad as bad:
                raise SettingsError(s.message(bad, value)) from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together (env KEEL_TLS_CERT, "
                                "KEEL_TLS_KEY)")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.worker_ports:
            port = int(self.listen.rpartition(":")[2])
            if port == 0 or port + self.workers > 65535:
                raise SettingsError(f"--worker-ports (env KEEL_WORKER_PORTS) needs a fixed "
                                    f"--listen port with room for {self.workers} more above "
                                    f"it, not {port}")
        if self.admin_identities and not self.tls_client_ca:
            raise SettingsError("--admin-identities (env KEEL_ADMIN_IDENTITIES) needs mutual "
                                "TLS (--tls-client-ca)")
        return self


def mesh_config(ns: argparse.Namespace, env: Mapping[str, str]) -> MeshConfig | None:
    """The mesh adapters' settings: flags over ``KEEL_MESH_*``; None without the mesh."""
    try:
        from keel_pdp.mesh.config import MeshConfig
    except ImportError:  # pragma: no cover - a build without the mesh package
        return None
    merged = {k: v for k, v in env.items() if k.startswith("KEEL_MESH_")}
    for flag, name, _, _ in MESH:
        given = getattr(ns, _mesh_dest(flag), None)
        if given is not None:
            merged[name] = given
    try:
        return MeshConfig.from_env(merged)
    except ValueError as exc:
        text = str(exc)
        for flag, name, _, _ in MESH:
            if name in text:
                source = "given as " + flag if getattr(ns, _mesh_dest(flag), None) is not None \
                    else "from env " + name
                raise SettingsError(f"{flag} (env {name}): {text} ({source})") from None
        raise SettingsError(f"mesh settings: {text}") from None


def serve_settings(ns: argparse.Namespace, env: Mapping[str, str] | None = None
                   ) -> ServeSettings:
    """``serve``'s settings from its parsed flags and the environment, validated."""
    e = os.environ if env is None else env
    r = resolve(ns, SERVE, e)
    v = dict(r.values)
    v["admin_identities"] = tuple(x.strip() for x in v["admin_identities"].split(",")
                                  if x.strip())
    return ServeSettings(**v, mesh=mesh_config(ns, e), notes=r.notes).validate()
