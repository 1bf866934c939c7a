"""The CLI: `info` (versions, the CUDA extension's state, the backend of every op), --version, --help with
defaults, and every expected failure of generate / chat / quantize as one line on stderr with a non-zero exit."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_kernels
from llama_kernels import backends
from llama_kernels.cli import main
from llama_kernels.loader import CheckpointError, default_model_path


def default_model_available() -> bool:
    try:
        default_model_path()
    except CheckpointError:
        return False
    return True


def _run(*args: str, env: dict | None = None) -> str:
    # `python -m` puts the working directory first on sys.path: run it beside the llama_kernels this
    # process imported, so the subprocess reports on the same package (installed or source tree).
    done = subprocess.run([sys.executable, "-m", "llama_kernels", *args], capture_output=True, text=True,
                          timeout=120, cwd=Path(llama_kernels.__file__).parents[1], env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_info_table_names_versions_extension_and_backends():
    out = _run("info")
    assert f"torch {torch.__version__}" in out
    assert "CUDA extension: " in out
    ext, reason = backends.cuda_extension()
    if ext is None:
        assert reason in out
    for op in ("add_rms_norm", "fp8_gemm", "decode_attention", "rope_and_cache", "int4_gemm"):
        assert op in out


def test_info_json():
    data = json.loads(_run("info", "--json"))
    assert data["torch"] == torch.__version__
    assert data["devices"][0]["device"] == "cpu"
    assert data["devices"][0]["ops"]["add_rms_norm"] == "torch"
    assert data["cuda_extension"]["built"] == (backends.cuda_extension()[0] is not None)


@pytest.mark.parametrize("checked", [True, False])
def test_info_shows_a_checked_build(monkeypatch, capsys, checked):
    """_build_info.CHECKED (LLAMA_KERNELS_CHECKED=1 at build time) reaches `info` and its --json."""
    import types

    from llama_kernels import cli

    fake = types.ModuleType("llama_kernels._build_info")
    fake.CUDA_ARCHS, fake.CUDA_COMPILER_VERSION, fake.CHECKED = ["90a"], "13.0.88", checked
    monkeypatch.setitem(sys.modules, "llama_kernels._build_info", fake)
    monkeypatch.setattr(llama_kernels, "_build_info", fake, raising=False)
    info = cli.collect_info()
    assert info["cuda_extension"]["checked"] is checked
    info["cuda_extension"].update(built=True, archs=["90a"], cuda_runtime=13000)  # as with a built _C
    cli._print_info(info)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("CUDA extension: "))
    assert ("checked build: spin waits trap instead of hanging" in line) is checked, line
    assert ("not a checked build" in line) is not checked, line


def test_info_reports_a_forced_backend():
    out = _run("info", env={**os.environ, "LLAMA_KERNELS_BACKEND": "torch"})
    assert "backend forced by LLAMA_KERNELS_BACKEND=torch" in out


# --- expected failures: one line on stderr, a non-zero exit, before any weights load -------------------------

needs_default_model = pytest.mark.skipif(not default_model_available(), reason="the default model is unavailable")
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}  # fmt: skip


def one_error_line(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI in-process on argv; assert a non-zero exit, one stderr line naming each needle, no stdout."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code != 0 and out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith(f"llama-kernels {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("flags,needles", [
    (["--temperature", "-1"], ["temperature=-1.0", "expected >= 0"]),
    (["--top-p", "0"], ["top_p=0.0", "0 < top_p <= 1"]),
    (["--top-k", "0"], ["top_k=0", "int >= 1"]),
    (["--max-new-tokens", "0"], ["max_new_tokens=0", "int >= 1"]),
    (["--max-context", "0"], ["--max-context 0", ">= 1"]),
    (["--device", "tpu"], ["device='tpu'", "'cpu', 'cuda' or 'cuda:N'"]),
    (["--raw", "--system", "Be brief."], ["--system needs the chat template", "--raw"]),
], ids=["temperature", "top-p", "top-k", "max-new-tokens", "max-context", "device", "system-raw"])  # fmt: skip
def test_generate_bad_values(capsys, flags, needles, monkeypatch):
    # a model path that does not exist proves the values are checked before the checkpoint is even opened
    # (--system/--raw is the exception: it is known after the tokenizer, still before any weights)
    model = [] if "--system" in flags else ["--model", "/nonexistent/model"]
    if "--system" in flags and not default_model_available():
        pytest.skip("the default model is unavailable")
    one_error_line(capsys, ["generate", "Hello", *model, *flags], *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_generate_on_cuda_without_a_gpu(capsys):
    one_error_line(capsys, ["generate", "Hello", "--device", "cuda", "--model", "/nonexistent"],
                   "device='cuda'", "has no CUDA", "device='cpu'")  # fmt: skip


def test_tp_needs_torchrun(capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    one_error_line(capsys, ["generate", "Hello", "--tp", "2", "--model", "/nonexistent"],
                   "--tp 2", "torchrun --nproc-per-node 2 -m llama_kernels generate")  # fmt: skip


def test_prompts(capsys, tmp_path, monkeypatch):
    one_error_line(capsys, ["generate", "   "], "the prompt is empty")
    one_error_line(capsys, ["generate"], "no prompt", "-f FILE")
    one_error_line(capsys, ["generate", "Hi", "-f", "x.txt"], "not both")
    one_error_line(capsys, ["generate", "caf\udce9"], "not UTF-8", "-f FILE")  # argv bytes that are not UTF-8
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    one_error_line(capsys, ["generate", "-f", str(latin1)], "latin1.txt is not UTF-8", "0xe9", "offset 3")
    one_error_line(capsys, ["generate", "-f", str(tmp_path / "missing.txt")], "missing.txt", "No such file")


def test_checkpoint_errors(capsys, tmp_path):
    one_error_line(capsys, ["generate", "Hi", "--model", str(tmp_path / "nope")], "does not exist")
    one_error_line(capsys, ["generate", "Hi", "--model", str(tmp_path)], "no config.json")
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    one_error_line(capsys, ["chat", "--model", str(tmp_path)], "model.safetensors is truncated", "download it again")
    one_error_line(capsys, ["quantize", str(tmp_path), str(tmp_path / "out"), "--quant", "fp8"], "truncated")


def test_quantize_errors(capsys, tmp_path):
    one_error_line(capsys, ["quantize", str(tmp_path / "nope"), str(tmp_path / "out"), "--quant", "fp8"],
                   "does not exist")  # fmt: skip
    one_error_line(capsys, ["quantize", "default", str(tmp_path), "--quant", "int4", "--policy", "meta"],
                   "policy='meta' for int4")  # fmt: skip


@needs_default_model
def test_context_too_small_before_loading(capsys):
    line = one_error_line(capsys, ["generate", "What is the capital of France?", "--max-context", "40",
                                   "--max-new-tokens", "8"], "need 45 tokens but the context is 40",
                          "--max-context")  # fmt: skip
    assert "loading" not in line


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(ValueError, match="temperature=-1.0"):
        main(["generate", "Hi", "--temperature", "-1", "--debug"])
    monkeypatch.setenv("LLAMA_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="the prompt is empty"):
        main(["generate", ""])


def test_an_error_as_a_user_sees_it():
    """A real process: exit status 1, one line on stderr, no traceback."""
    done = subprocess.run([sys.executable, "-m", "llama_kernels", "generate", "Hi", "--top-p", "2"],
                          capture_output=True, text=True, timeout=120, cwd=Path(llama_kernels.__file__).parents[1],
                          env={k: v for k, v in os.environ.items() if k != "LLAMA_KERNELS_DEBUG"})  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == ["llama-kernels generate: error: generate: top_p=2.0; expected 0 < top_p <= "
                                        "1 or None"]  # fmt: skip


def test_version_and_help_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"llama-kernels {llama_kernels.__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "most tokens to generate (default: 256)" in help_text and "(default: all)" in help_text
    assert "activations clamped to 1200" in help_text


def test_cli_and_api_agree_on_max_new_tokens():
    from llama_kernels.cli import DEFAULT_MAX_NEW_TOKENS
    from llama_kernels.llm import LLM

    for method in (LLM.generate, LLM.generate_ids):
        assert inspect.signature(method).parameters["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS


@needs_default_model
def test_quantize_writes_a_readable_checkpoint_with_its_generation_config(tmp_path, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", "default", str(out), "--quant", "fp8"]) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # 0644 under the usual umask
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    err = capsys.readouterr().err
    assert "quantize fbgemm: " in err and "\r" not in err  # not a terminal: one line, no redraws


# --- one convention for every command (issue 23) -------------------------------------------------


def test_version_and_help_do_not_import_torch():
    """--version and --help answer without importing torch (2.8 s on a quiet machine when they did)."""
    code = ("import sys\nfrom llama_kernels.cli import main\n"
            "for argv in (['--version'], ['--help'], ['generate', '--help'], ['chat', '--help'], ['plan', '--help'],"
            " ['quantize', '--help'], ['info', '--help'], ['selftest', '--help'], ['serve', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(llama_kernels.__file__).parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", ["generate", "chat", "quantize", "plan", "info", "selftest", "serve"])
def test_every_option_shows_its_default(command):
    from llama_kernels.cli import build_parser

    parser = build_parser(command)[1][command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.nargs == 0 or action.required:
            continue  # positionals, flags (off unless given), required options, hidden ones
        assert "default" in formatter._expand_help(action), (command, action.option_strings)


def test_unknown_flag_shows_the_command_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "Hi", "--temprature", "0.5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: llama-kernels generate ") and "unrecognized arguments: --temprature 0.5" in err


def test_selftest_bad_value_is_an_error_line(capsys):
    one_error_line(capsys, ["selftest", "--backends", "cuda,tpu"], "'tpu' is not a backend")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the selftest checks the cuda backend too")
def test_selftest_without_triton_names_the_extra():
    """Nothing checked is a failure that names its cause (it said 'nothing to check' and exited 0)."""
    code = "import sys\nsys.modules['triton'] = None\nfrom llama_kernels.cli import main\nsys.exit(main(['selftest']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(llama_kernels.__file__).parents[1], env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == ('llama-kernels selftest: error: nothing was checked: Triton is not '
                                            'installed: pip install "llama-kernels[triton]" (or pip install triton)')


def test_max_context_above_the_trained_length_is_refused():
    from llama_kernels.llm import LLM
    from llama_kernels.model import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=32, max_position_embeddings=256)  # fmt: skip
    with pytest.raises(ValueError, match=r"max_context \(--max-context\) 257 is above the model's trained context "
                                         r"of 256 tokens \(max_position_embeddings\); expected at most 256"):
        LLM.from_config(config, device="cpu", max_context=257)
    assert LLM.from_config(config, device="cpu", max_context=256).max_context == 256


@needs_default_model
def test_cli_max_context_above_the_trained_length_is_refused_before_loading(capsys):
    line = one_error_line(capsys, ["generate", "Hi", "--max-context", "100000"], "--max-context) 100000",
                          "trained context of 8192 tokens")  # fmt: skip
    assert "loading" not in line
