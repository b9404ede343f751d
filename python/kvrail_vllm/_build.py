"""Generates the gRPC stubs of kvrail's local API from the repository's
``proto/`` (never written by hand): ``kvrail_vllm/_pb/kvrail/v1/*_pb2*.py``.

Run by the package build (``setup.py``'s ``build_py``) and by the tests, so both
always use the protocol of the checkout they come from::

    python -m kvrail_vllm._build            # into python/kvrail_vllm/_pb

protoc writes imports as ``from kvrail.v1 import kvrail_pb2``; they are rewritten
to this package's ``kvrail_vllm._pb.kvrail.v1`` so that nothing is added at the
top level of ``sys.path``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent.parent / "proto" / "proto"
PROTO_FILES = ("kvrail/v1/kvrail.proto", "kvrail/v1/sidecar.proto")
_IMPORT = re.compile(r"^from kvrail\.v1 import ", re.MULTILINE)


def generate(out_dir: Path = PACKAGE_DIR / "_pb", proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Writes the ``_pb2`` and ``_pb2_grpc`` modules of every kvrail proto file
    under ``out_dir`` and returns their paths. Raises ``RuntimeError`` with
    protoc's own message if a file does not compile."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("generating kvrail's gRPC stubs needs grpcio-tools: pip install grpcio-tools") from e
    missing = [f for f in PROTO_FILES if not (proto_root / f).is_file()]
    if missing:
        raise RuntimeError(f"kvrail's proto files are not at {proto_root}: missing {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)} (its message is above)")
    written = []
    for pkg in (out_dir, out_dir / "kvrail", out_dir / "kvrail" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from kvrail\'s proto/ by kvrail_vllm._build; do not edit."""\n')
    for path in sorted((out_dir / "kvrail" / "v1").glob("*_pb2*.py")):
        text = path.read_text()
        path.write_text(_IMPORT.sub("from kvrail_vllm._pb.kvrail.v1 import ", text))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in generate():
        print(p)
    sys.exit(0)
