"""The container image, built and run: Containerfile + scripts/build-image.sh.

The image is built with ``buildah bud --isolation chroot`` on a Debian base made
by ``debootstrap --variant=minbase`` (no registry needed), and the sidecar is
started from it with ``buildah run --isolation chroot --network host`` against
the test run's Redis on loopback: health SERVING, then one Authorize and one
Closeout, whose settled cost is worked out here from the bundle's price table.

Building the base downloads and unpacks Debian (minutes), so these tests are
marked ``container`` and run by ``make test-container`` (which sets
KEEL_CONTAINER_TESTS=1), not by ``make test``. They skip, saying why, where that
is not set, where buildah or debootstrap is missing, or without root.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
import yaml

from keel_pdp.client import KeelClient, TokenUsage
from tests.conftest import POLICIES, ROOT, free_port
from tests.helpers import wait_ready
from tests.integration.envoy_fixture import events

pytestmark = pytest.mark.container

BUILDAH = shutil.which("buildah")
TAG = "localhost/keel-pdp:test"


def _skip_reason() -> str | None:
    if os.environ.get("KEEL_CONTAINER_TESTS") != "1":
        return ("building the image takes minutes (debootstrap of the base): run "
                "`make test-container` (KEEL_CONTAINER_TESTS=1)")
    if BUILDAH is None:
        return "buildah is not installed (Debian package buildah): the image cannot be built"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (Debian package debootstrap): no base image"
    if os.geteuid() != 0:
        return "building the debootstrap base needs root"
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    assert BUILDAH is not None
    build = subprocess.run(["bash", str(ROOT / "scripts" / "build-image.sh"),
                            "--debootstrap-base", "--tag", TAG], cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        yield TAG
    finally:
        subprocess.run([BUILDAH, "rmi", TAG], capture_output=True, timeout=120)


def inspect(image: str) -> dict[str, Any]:
    assert BUILDAH is not None
    out = subprocess.run([BUILDAH, "inspect", "--type", "image", image], capture_output=True,
                         text=True, timeout=60, check=True)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_image_runs_keel_pdp_as_an_unprivileged_user(image: str) -> None:
    config = inspect(image)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["keel-pdp"]
    assert config["Cmd"] == ["serve"]
    assert config["User"] == "10001:10001"
    assert "KEEL_POLICIES=/etc/keel/policies" in config["Env"]
    # deploy/k8s runs the image this script builds, as the user the image declares
    repo = "localhost/keel-pdp"
    k8s = ROOT / "deploy" / "k8s"
    for name in ("app-deployment.yaml", "ledger-writer.yaml"):
        pods = [d["spec"]["template"]["spec"] for d in yaml.safe_load_all((k8s / name).read_text())
                if d and d["kind"] in ("Deployment", "StatefulSet")]
        keel = [c for spec in pods for c in spec.get("initContainers", []) + spec["containers"]
                if c["image"].startswith(repo + ":")]
        assert keel, f"{name} does not run {repo}"
        for c in keel:
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx.get("runAsUser", 10001) == 10001


def expected_cost(model: str, u: TokenUsage) -> int:
    """From policies/' price table, with this test's own arithmetic."""
    for path in sorted(POLICIES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") == "PriceTable":
            p = doc["providers"]["openai"][model]
            fresh = u.input_tokens - u.cached_input_tokens
            total = (fresh * Decimal(p["input"]) + u.cached_input_tokens
                     * Decimal(p["cached_input"]) + u.output_tokens * Decimal(p["output"]))
            return int(total.to_integral_value(rounding=ROUND_CEILING))
    raise AssertionError("policies/ has no PriceTable")


# Paths the runtime itself provides (buildah run writes these for the process).
RUNTIME_PATHS = ("tmp", "var/tmp", "run", "proc", "sys", "dev", "etc/hosts", "etc/resolv.conf",
                 "etc/hostname")


def written_since(root: pathlib.Path, since: float) -> list[str]:
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(RUNTIME_PATHS):
            continue
        try:
            if path.lstat().st_mtime > since and not path.is_dir():
                out.append(rel)
        except OSError:
            continue
    return sorted(out)


def test_sidecar_from_the_image_serves_authorize_and_closeout(
        image: str, redis_url: str, tmp_path: pathlib.Path) -> None:
    assert BUILDAH is not None
    ctr = subprocess.run([BUILDAH, "from", "--quiet", image], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    root = pathlib.Path(subprocess.run([BUILDAH, "mount", ctr], capture_output=True, text=True,
                                       timeout=60, check=True).stdout.strip())
    started = time.time() - 1
    port = free_port()
    log = (tmp_path / "sidecar.log").open("wb")
    proc = subprocess.Popen(
        [BUILDAH, "run", "--isolation", "chroot", "--network", "host", ctr, "--",
         "keel-pdp", "serve", f"--listen=127.0.0.1:{port}", f"--redis-url={redis_url}",
         "--metrics-port=0", "--store-timeout=1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_ready(port)
        except AssertionError:
            raise AssertionError((tmp_path / "sidecar.log").read_text()) from None
        whoami = subprocess.run([BUILDAH, "run", "--isolation", "chroot", ctr, "--", "id", "-u"],
                                capture_output=True, text=True, timeout=60)
        assert whoami.stdout.strip() == "10001", whoami.stderr
        usage = TokenUsage(input_tokens=1_300, cached_input_tokens=1_000, output_tokens=300)
        with KeelClient(f"127.0.0.1:{port}", tenant="acme", workload="support-bot",
                        timeout=5) as keel, \
                keel.permit("gpt-4o-mini", provider="openai", estimated_input_tokens=1_200,
                            max_output_tokens=500) as p:
            assert p.decision == "ALLOW"
            p.record_usage(usage)
        assert p.settlement is not None
        want = expected_cost("gpt-4o-mini", usage)
        assert (p.settlement.status, p.settlement.actual_cost_micros) == ("SETTLED", want)
        import redis

        r = redis.Redis.from_url(redis_url, decode_responses=True)
        (ev,) = events(r, p.permit_id, "settlement")
        assert ev["res"]["act"] == want
        r.close()
        # Read-only root filesystem friendly: serving wrote nothing into the image's
        # filesystem (byte code was compiled at build time; /tmp is a volume in k8s).
        assert written_since(root, started) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
        subprocess.run([BUILDAH, "umount", ctr], capture_output=True, timeout=60)
        subprocess.run([BUILDAH, "rm", ctr], capture_output=True, timeout=120)
