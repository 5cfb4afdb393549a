"""TLS and mutual TLS for the gRPC port, with certificates reloaded on rotation.

gRPC asks the fetcher for the current certificate configuration on each new
handshake; the fetcher re-reads the files only when their content changed
(cert-manager and Kubernetes secrets rotate files in place or by symlink swap),
so a rotated certificate is served without a restart and existing connections
are left alone.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from dataclasses import dataclass
from typing import Any

import grpc

from keel_pdp.errors import TlsError as TlsError

log = logging.getLogger("keel_pdp.tls")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})




@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str = ""  # set: clients must present a certificate signed by it (mTLS)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        try:
            cert = pathlib.Path(self.cert).read_bytes()
            key = pathlib.Path(self.key).read_bytes()
            ca = pathlib.Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as exc:
            raise TlsError(f"cannot read TLS file: {exc}") from exc
        if b"-----BEGIN" not in cert or b"-----BEGIN" not in key:
            raise TlsError(f"{self.cert} / {self.key}: not PEM certificate and key")
        return cert, key, ca


class ReloadingCredentials:
    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._digest = ""
        self.reloads = 0

    def _config(self) -> tuple[Any, str]:
        cert, key, ca = self.files.read()
        digest = hashlib.sha256(cert + b"\0" + key + b"\0" + (ca or b"")).hexdigest()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca), \
            digest

    def credentials(self) -> grpc.ServerCredentials:
        initial, self._digest = self._config()
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=bool(self.files.client_ca))

    def _fetch(self) -> Any:
        try:
            config, digest = self._config()
        except TlsError as exc:
            log.error("keeping the current certificate: %s", exc)
            return None
        if digest == self._digest:
            return None  # unchanged: gRPC keeps the current configuration
        self._digest = digest
        self.reloads += 1
        log.info("TLS certificate files changed: serving the new certificate")
        return config


def check_listen(listen: str, tls: TlsFiles | None, allow_insecure: bool) -> None:
    """Refuse a plaintext listener beyond loopback unless explicitly allowed."""
    host = listen.rpartition(":")[0]
    if tls is None and host not in LOOPBACK_HOSTS and not allow_insecure:
        raise TlsError(
            f"--listen {listen} is not a loopback address and no TLS certificate is configured; "
            "set --tls-cert/--tls-key, or --allow-insecure-listen if the network is trusted")
