"""Regenerate keel_pdp/api from proto/ (the one command; CI checks for drift)."""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT = ROOT / "keel_pdp" / "api"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    ]
    bindir = pathlib.Path(sys.executable).parent
    args.insert(1, f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}")
    args.insert(1, f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}")
    if protoc.main(args) != 0:
        return 1
    # protoc writes absolute imports rooted at the proto path; root them in our package.
    for path in OUT.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from keel\.", "from keel_pdp.api.keel.", text, flags=re.M)
        fixed = re.sub(r"^import keel\.", "import keel_pdp.api.keel.", fixed, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    for d in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
