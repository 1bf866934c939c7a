"""Optional dependencies of the benchmark scripts: checked after parsing the arguments (--help works
without them), reported as one line naming the package and the extra that brings it."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def require(module: str, extra: str, script: str) -> ModuleType:
    """The imported `module`; exit status 1 with one line on stderr when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        sys.exit(f"{script}: error: needs the Python package {module!r}: pip install {module} "
                 f'(or the extra: pip install "llama-kernels[{extra}]")')  # fmt: skip
