"""A throwaway PKI made with the ``openssl`` command line: CAs, a server
certificate, client certificates carrying a SPIFFE URI SAN or only a CN, and
an already expired client certificate (``openssl ca`` with explicit dates)."""

from __future__ import annotations

import pathlib
import subprocess


def openssl(d: pathlib.Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def make_ca(d: pathlib.Path, name: str = "ca") -> None:
    openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=keel-test-{name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _csr(d: pathlib.Path, name: str, cn: str) -> None:
    openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")


def make_leaf(d: pathlib.Path, name: str, cn: str, *, spiffe: str = "",
              server: bool = False, ca: str = "ca") -> None:
    """``name``.pem/.key signed by ``ca``; a SPIFFE ID goes in as the URI SAN."""
    _csr(d, name, cn)
    sans = ["DNS:localhost", "IP:127.0.0.1"] if server else []
    if spiffe:
        sans.append(f"URI:{spiffe}")
    ext = ["basicConstraints=CA:FALSE",
           f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}"]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


def make_expired_leaf(d: pathlib.Path, name: str, cn: str, *, spiffe: str = "",
                      ca: str = "ca") -> None:
    """A client certificate valid for one day in 2020 (``openssl ca`` sets the dates)."""
    _csr(d, name, cn)
    db = d / f"{name}-db"
    db.mkdir()
    # openssl runs in ``d``: the configuration names files relative to it.
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    san = f"subjectAltName=URI:{spiffe}\n" if spiffe else ""
    (d / f"{name}.cnf").write_text(
        "[ca]\ndefault_ca = test\n"
        f"[test]\ndir = {db.name}\ndatabase = $dir/index.txt\nserial = $dir/serial\n"
        f"new_certs_dir = {db.name}\ncertificate = {ca}.pem\n"
        f"private_key = {ca}.key\ndefault_md = sha256\npolicy = any\n"
        "x509_extensions = leaf\ncopy_extensions = none\n"
        "[any]\ncommonName = supplied\n"
        f"[leaf]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n{san}")
    openssl(d, "ca", "-batch", "-config", f"{name}.cnf", "-in", f"{name}.csr", "-out",
            f"{name}.pem", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
            "-notext")


def make_pki(d: pathlib.Path) -> pathlib.Path:
    """Two workloads of two tenants (SPIFFE IDs), a CN-only client, a mesh
    proxy, an operator, an expired certificate, a second CA for rotation."""
    d.mkdir(parents=True, exist_ok=True)
    make_ca(d)
    make_ca(d, "ca2")
    make_leaf(d, "server", "localhost", server=True)
    make_leaf(d, "server2", "localhost", server=True, ca="ca2")
    make_leaf(d, "support", "support-bot", spiffe="spiffe://corp/ns/support/sa/bot")
    make_leaf(d, "support2", "support-bot", spiffe="spiffe://corp/ns/support/sa/bot",
              ca="ca2")
    make_leaf(d, "triage", "triage", spiffe="spiffe://corp/ns/support/sa/triage")
    make_leaf(d, "billing", "billing-etl", spiffe="spiffe://corp/ns/billing/sa/etl")
    make_leaf(d, "legacy", "legacy-batch")
    make_leaf(d, "envoy", "envoy", spiffe="spiffe://corp/ns/mesh/sa/egress")
    make_leaf(d, "ops", "ops-admin", spiffe="spiffe://corp/ns/ops/sa/admin")
    make_leaf(d, "stranger", "stranger", spiffe="spiffe://corp/ns/other/sa/x")
    make_expired_leaf(d, "expired", "support-bot", spiffe="spiffe://corp/ns/support/sa/bot")
    return d
