"""Regenerate keel_pdp/api from proto/ (the one command; CI checks for drift)."""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT = ROOT / "keel_pdp" / "api"


def main(out: pathlib.Path = OUT) -> int:
    """Generate into ``out`` (keel_pdp/api by default; proto-check passes a scratch
    copy so the check never writes into the working tree)."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    bindir = pathlib.Path(sys.executable).parent
    args.insert(1, f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}")
    args.insert(1, f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}")
    if protoc.main(args) != 0:
        return 1
    # protoc writes absolute imports rooted at the proto path; root them in our package.
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from keel\.", "from keel_pdp.api.keel.", text, flags=re.M)
        fixed = re.sub(r"^import keel\.", "import keel_pdp.api.keel.", fixed, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else OUT))
