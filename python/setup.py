"""Builds kvrail-vllm with its gRPC stubs generated from the repository's proto/
at build time (kvrail_vllm._build), before the package's modules are gathered;
everything else is in pyproject.toml."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvrail_vllm import _build  # noqa: E402

_build.generate()
setup()
