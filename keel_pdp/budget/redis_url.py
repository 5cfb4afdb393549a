"""Redis URLs (``redis://``, ``rediss://``, ``unix://``) -> the RESP client's settings.

Its own module because the URL grammar (AUTH, SELECT, the TLS query parameters
as redis-py names them) is configuration, not the client's hot path.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class RespConfig:
    """How the RESP client reaches one Redis server (address, AUTH, database, TLS)
    and how it behaves there (connections, connect timeout, back-off, stall limit,
    most calls waiting); ``parse_url`` builds it from a URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)
    server_hostname: str | None = None
    connections: int = 1
    connect_timeout_s: float = 1.0
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    stall_s: float = 2.0
    max_pending: int = 100_000


def _flag(value: str) -> bool:
    return value.lower() not in ("0", "false", "no", "off", "")


def parse_url(url: str, **overrides: Any) -> RespConfig:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``, ``unix:///path``."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"Redis URL scheme must be redis, rediss or unix, not {scheme!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    password = query.get("password", password)
    username = query.get("username", username)
    db_text = query.get("db", "")
    if scheme != "unix" and parts.path.strip("/"):
        db_text = parts.path.strip("/")
    try:
        db = int(db_text or 0)
    except ValueError:
        raise ValueError(f"Redis URL database {db_text!r} is not a number") from None
    ctx: ssl.SSLContext | None = None
    if scheme == "rediss":
        ctx = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
        if "ssl_certfile" in query:
            ctx.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
        reqs = query.get("ssl_cert_reqs", "required").lower()
        if "ssl_check_hostname" in query:
            ctx.check_hostname = _flag(query["ssl_check_hostname"])
        if reqs in ("none", "cert_none"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif reqs in ("optional", "cert_optional"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_OPTIONAL
    host = parts.hostname or "127.0.0.1"
    config = RespConfig(
        host=host, port=parts.port or 6379,
        unix_path=parts.path if scheme == "unix" else None, db=db,
        username=username or None, password=password or None, ssl_context=ctx,
        server_hostname=host if ctx is not None else None)
    return replace(config, **overrides) if overrides else config


