"""Who is calling: the identity a call presents, by client certificate or bearer token.

Kept apart from the policy checks (``keel_pdp.server.caller_guard``) because the
admin API reads peer names and bearer tokens through the same functions, and
because this is the one place that touches credentials: tokens are compared in
constant time and kept only as SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any

log = logging.getLogger("keel_pdp.identity")

TOKEN_RECHECK_S = 1.0


def _auth(context: Any) -> dict[str, list[bytes]]:
    auth = context.auth_context() if context is not None else None
    return auth or {}


def peer_names(context: Any) -> list[str]:
    """Every name the client certificate carries (CN and SANs); [] without one."""
    auth = _auth(context)
    return [v.decode(errors="replace") for k in ("x509_common_name",
                                                 "x509_subject_alternative_name")
            for v in auth.get(k, [])]


def cert_identity(context: Any) -> str:
    """The client certificate's SPIFFE ID, or its subject CN when it has no
    SPIFFE URI SAN; '' without a certificate or with an ambiguous one (several
    SPIFFE IDs, which gRPC then does not vouch for)."""
    auth = _auth(context)
    spiffe = auth.get("peer_spiffe_id")
    if spiffe:
        return spiffe[0].decode(errors="replace")
    if any(u.startswith(b"spiffe://") for u in auth.get("peer_uri", [])):
        return ""
    cn = auth.get("x509_common_name")
    return cn[0].decode(errors="replace") if cn else ""


def bearer_token(context: Any) -> str:
    """The ``authorization: Bearer <token>`` the call carries ('' if none)."""
    for key, value in (context.invocation_metadata() if context is not None else None) or ():
        if key == "authorization" and isinstance(value, str):
            return value.removeprefix("Bearer ").strip()
    return ""


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    return hmac.compare_digest(presented.encode(), expected.encode())


class CallerTokens:
    """Bearer tokens mapped to identities: a file of ``<identity> <token>``
    lines (``#`` comments), re-read when its content changes (checked at most
    once a second), so a rotated Secret takes effect without a restart.
    Tokens are kept as SHA-256 digests and compared in constant time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._digest = b""
        self._by_hash: dict[bytes, str] = {}
        self._checked = 0.0
        self.load()

    def load(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            if not self._by_hash:
                raise ValueError(f"cannot read caller tokens file {self.path}: {exc}") from exc
            log.error("keeping the caller tokens read before: %s", exc)
            return
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return
        table: dict[bytes, str] = {}
        for n, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[1]) < 16:
                raise ValueError(f"{self.path}:{n}: expected '<identity> <token>' with a token "
                                 "of at least 16 characters")
            table[hashlib.sha256(parts[1].encode()).digest()] = parts[0]
        self._by_hash, self._digest = table, digest
        log.info("caller tokens: %d identities from %s", len(table), self.path)

    def identity(self, token: str) -> str:
        now = time.monotonic()
        if now - self._checked >= TOKEN_RECHECK_S:
            self._checked = now
            try:
                self.load()
            except ValueError as exc:
                log.error("caller tokens file rejected, keeping the previous one: %s", exc)
        if not token:
            return ""
        h = hashlib.sha256(token.encode()).digest()
        found = self._by_hash.get(h, "")
        if found:
            # The look-up keyed on a digest; confirm it in constant time as well.
            for known, who in self._by_hash.items():
                if who == found and hmac.compare_digest(known, h):
                    return who
        return ""
