"""Runtime settings: command-line flags, each with an environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_PORT = 9464


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class ServeSettings:
    policies: str
    redis_url: str
    listen: str
    metrics_port: int
    metrics_host: str
    store_timeout_ms: int
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
    # open | enforce | observe; '' = open on a loopback listener, enforce otherwise
    caller_auth: str = ""
    caller_tokens_file: str = ""
    budget_metrics_interval_s: float = 15.0

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
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(f"--redis-url {redacted_url(self.redis_url)!r}: scheme must be "
                                "redis://, rediss:// or unix://")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise SettingsError(f"--listen {self.listen!r} must be HOST:PORT")
        if not 0 <= self.metrics_port < 65536:
            raise SettingsError(f"--metrics-port {self.metrics_port} is not a port (0 disables)")
        if not 1 <= self.store_timeout_ms <= 5000:
            raise SettingsError("--store-timeout-ms must be between 1 and 5000")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.admin_identities and not self.tls_client_ca:
            raise SettingsError("--admin-identities needs mutual TLS (--tls-client-ca)")
        if not 1 <= self.workers <= 64:
            raise SettingsError("--workers must be between 1 and 64")
        if not 1 <= self.max_concurrent_rpcs <= 1_000_000:
            raise SettingsError("--max-concurrent-rpcs must be between 1 and 1000000")
        if not 0.05 <= self.first_message_timeout_s <= 60:
            raise SettingsError("--first-message-timeout must be between 0.05 and 60 seconds")
        if self.caller_auth not in ("", "open", "enforce", "observe"):
            raise SettingsError(f"--caller-auth {self.caller_auth!r} must be open, enforce or "
                                "observe")
        return self


# Query parameters whose values are secrets (redis-py and our RESP client read
# ``password``; the others are there for URLs written for other clients).
_SECRET_PARAMS = ("pass", "secret", "token", "auth")


def redacted_url(url: str) -> str:
    """``url`` fit for logs and errors: the password of ``user:password@`` and any
    secret query parameter (``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            # A lone userinfo may be a password written without its colon.
            netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
        query = "&".join(
            f"{k}=***" if any(s in k.lower() for s in _SECRET_PARAMS) else f"{k}={v}"
            for k, v in parse_qsl(parts.query, keep_blank_values=True))
        return f"{parts.scheme}://{netloc}{parts.path}{'?' if query else ''}{query}"
    except ValueError:
        return f"{url.partition(':')[0]}://***"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", default=_env("KEEL_POLICIES", "policies"),
                   help="policy bundle directory (env KEEL_POLICIES, default ./policies)")
    p.add_argument("--redis-url", default=_env("KEEL_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="Redis URL: redis://, rediss:// (TLS) or unix:// (env KEEL_REDIS_URL)")
    p.add_argument("--listen", default=_env("KEEL_LISTEN", DEFAULT_LISTEN),
                   help=f"gRPC HOST:PORT (env KEEL_LISTEN, default {DEFAULT_LISTEN})")
    p.add_argument("--metrics-port", type=int,
                   default=int(_env("KEEL_METRICS_PORT", str(DEFAULT_METRICS_PORT))),
                   help="Prometheus /metrics port, 0 disables (env KEEL_METRICS_PORT)")
    p.add_argument("--metrics-host", default=_env("KEEL_METRICS_HOST", "127.0.0.1"),
                   help="address the metrics endpoint binds (env KEEL_METRICS_HOST)")
    p.add_argument("--store-timeout-ms", type=int,
                   default=int(_env("KEEL_STORE_TIMEOUT_MS", "25")),
                   help="budget store call timeout in ms (env KEEL_STORE_TIMEOUT_MS, default 25)")
    p.add_argument("--key-prefix", default=_env("KEEL_KEY_PREFIX", "keel"),
                   help="Redis key prefix (env KEEL_KEY_PREFIX)")
    p.add_argument("--sweep-interval", type=float,
                   default=float(_env("KEEL_SWEEP_INTERVAL", "1.0")),
                   help="seconds between expiry sweeps (env KEEL_SWEEP_INTERVAL)")
    p.add_argument("--reload-interval", type=float,
                   default=float(_env("KEEL_RELOAD_INTERVAL", "2.0")),
                   help="seconds between policy directory checks (env KEEL_RELOAD_INTERVAL)")
    p.add_argument("--log-level", default=_env("KEEL_LOG_LEVEL", "INFO"))
    p.add_argument("--admin-token-file", default=_env("KEEL_ADMIN_TOKEN_FILE", ""),
                   help="file holding the admin API bearer token, re-read on each call "
                        "(env KEEL_ADMIN_TOKEN_FILE; or the token itself in KEEL_ADMIN_TOKEN)")
    p.add_argument("--tls-cert", default=_env("KEEL_TLS_CERT", ""),
                   help="PEM certificate chain for the gRPC port (reloaded when it changes)")
    p.add_argument("--tls-key", default=_env("KEEL_TLS_KEY", ""), help="PEM private key")
    p.add_argument("--tls-client-ca", default=_env("KEEL_TLS_CLIENT_CA", ""),
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--allow-insecure-listen", action="store_true",
                   default=_env("KEEL_ALLOW_INSECURE_LISTEN", "") in ("1", "true", "yes"),
                   help="allow a plaintext listener on a non-loopback address")
    p.add_argument("--max-concurrent-rpcs", type=int,
                   default=int(_env("KEEL_MAX_CONCURRENT_RPCS", "1024")),
                   help="beyond this many RPCs being served (request received), answer "
                        "RESOURCE_EXHAUSTED at once; calls still waiting for their request "
                        "are not counted, health checks are never refused")
    p.add_argument("--first-message-timeout", type=float,
                   default=float(_env("KEEL_FIRST_MESSAGE_TIMEOUT", "2.0")),
                   help="seconds a call may wait between its headers and its request message "
                        "before it is ended (idle or half-sent streams; env "
                        "KEEL_FIRST_MESSAGE_TIMEOUT)")
    p.add_argument("--admin-identities", default=_env("KEEL_ADMIN_IDENTITIES", ""),
                   help="comma-separated client certificate names (CN or SAN) allowed to call "
                        "the admin API without a token (mutual TLS only)")
    p.add_argument("--outbox-dir", default=_env("KEEL_OUTBOX_DIR", ""),
                   help="journal decisions taken while Redis is unreachable in this directory, "
                        "so a restart replays them (env KEEL_OUTBOX_DIR; default: memory only)")
    p.add_argument("--drain-delay", type=float, default=float(_env("KEEL_DRAIN_DELAY", "1.0")),
                   help="seconds to keep serving after SIGTERM while health says NOT_SERVING")
    p.add_argument("--workers", type=int, default=int(_env("KEEL_WORKERS", "1")),
                   help="pre-fork N processes sharing the port (SO_REUSEPORT); worker i serves "
                        "metrics on --metrics-port + i (env KEEL_WORKERS)")
    p.add_argument("--caller-auth", default=_env("KEEL_CALLER_AUTH", ""),
                   choices=("", "open", "enforce", "observe"),
                   help="caller identity checks against the bundle's Callers bindings: open "
                        "(none), enforce (refuse), observe (log and count); default open on a "
                        "loopback listener, enforce otherwise (env KEEL_CALLER_AUTH)")
    p.add_argument("--caller-tokens-file", default=_env("KEEL_CALLER_TOKENS_FILE", ""),
                   help="file of '<identity> <bearer token>' lines: callers without a client "
                        "certificate identify with a token (env KEEL_CALLER_TOKENS_FILE)")
    p.add_argument("--grace", type=float, default=float(_env("KEEL_GRACE", "5.0")),
                   help="seconds in-flight RPCs get to finish on SIGTERM")
    p.add_argument("--budget-metrics-interval", type=float,
                   default=float(_env("KEEL_BUDGET_METRICS_INTERVAL", "15")),
                   help="seconds between refreshes of the per-budget utilisation gauges from "
                        "the store; 0 disables (env KEEL_BUDGET_METRICS_INTERVAL)")


def serve_settings(ns: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        policies=ns.policies, redis_url=ns.redis_url, listen=ns.listen,
        metrics_port=ns.metrics_port, metrics_host=ns.metrics_host,
        store_timeout_ms=ns.store_timeout_ms, key_prefix=ns.key_prefix,
        sweep_interval_s=ns.sweep_interval, reload_interval_s=ns.reload_interval,
        log_level=ns.log_level.upper(), grace_s=ns.grace,
        admin_token_file=ns.admin_token_file, tls_cert=ns.tls_cert, tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca, allow_insecure_listen=ns.allow_insecure_listen,
        max_concurrent_rpcs=ns.max_concurrent_rpcs,
        first_message_timeout_s=ns.first_message_timeout,
        outbox_dir=ns.outbox_dir, drain_delay_s=ns.drain_delay, workers=ns.workers,
        caller_auth=ns.caller_auth, caller_tokens_file=ns.caller_tokens_file,
        budget_metrics_interval_s=ns.budget_metrics_interval,
        admin_identities=tuple(x.strip() for x in ns.admin_identities.split(",") if x.strip()),
    ).validate()
