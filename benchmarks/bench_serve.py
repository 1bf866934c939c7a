"""Load generator for any OpenAI-compatible server (ours, vLLM, SGLang, llama-server, trtllm-serve).

Sends N streamed /v1/completions (or chat) requests at a fixed concurrency or a Poisson request rate,
with synthetic prompts of about --input-len tokens and --output-len new tokens each (ignore_eos, so
every request generates exactly that many where the server supports it), and reports requests/s,
output tokens/s, time to first token (TTFT), time per output token after the first (TPOT) and
inter-token latency (ITL) at p50/p90/p99, and the prefix-cache hit rate (usage.prompt_tokens_details
.cached_tokens / prompt tokens, where the server reports it), as a table and optionally JSON.

Workloads (--workload): random (independent prompts), shared-prefix (one --prefix-len-word system
prompt shared by every request, then a --input-len-word user turn of its own), multi-turn
(--num-requests conversations of --turns turns, chat only, each turn resending the whole history:
--concurrency conversations at a time; reports the prompt tokens computed, i.e. not cached, against
the tokens new in each turn's prompt), quote (each prompt asks to repeat its --input-len words: the
answer quotes the prompt, what speculative prompt lookup is for). Several --url (e.g. one server with
prefix caching or speculation, one without) run the same load one after the other, into one table and
one JSON. Where a server's /metrics has speculative-decoding counters, each run reports the draft
tokens proposed and accepted during it, the acceptance rate and the tokens per verification.

    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --num-requests 64 --concurrency 1 4 16

Needs only httpx (no torch; in the `serve` extra), so it runs from any client machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from optional import require  # noqa: E402

httpx = None  # imported by main() after the arguments are parsed: --help needs no httpx

# Common English words: with a leading space most are one token in a byte-level BPE vocabulary.
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community "
         "name").split()  # fmt: skip


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server read from its prefix cache (usage.prompt_tokens_details)
    output_tokens: int = 0
    text: str = ""  # the generated text (a multi-turn conversation resends it)
    ttft: float = 0.0  # seconds from sending to the first text
    latency: float = 0.0  # seconds from sending to the end of the stream
    itl: list[float] = field(default_factory=list)  # seconds between successive text chunks


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_request(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> Result:
    res = Result()
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"])[:200]
                    return res
                if data.get("usage"):
                    res.prompt_tokens = data["usage"]["prompt_tokens"]
                    res.output_tokens = data["usage"]["completion_tokens"]
                    res.cached_tokens = (data["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for choice in data.get("choices") or ():
                    text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if text:
                        res.text += text
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        res.error = f"{type(err).__name__}: {err}"
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks  # a server without usage in streams: one token per chunk
    res.ok = last is not None
    if not res.ok:
        res.error = "no text in the stream"
    return res


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def pct(q: float) -> float:  # nearest-rank
        return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": sum(v) / len(v)}


def request_body(args: argparse.Namespace, model: str, prompt, chat: bool) -> dict:
    """A streamed request: prompt is a string, or (chat) a list of messages."""
    body = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if chat:
        body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    if args.json_schema is not None:  # structured output: every token decoded under the schema's grammar
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": args.json_schema}}
    return body


def make_prompts(args: argparse.Namespace, rng: random.Random, chat: bool) -> list:
    """The prompts of the random and shared-prefix workloads (strings, or chat message lists)."""
    prefix = make_prompt(random.Random(args.seed + 1), args.prefix_len) if args.workload == "shared-prefix" else None
    if args.workload == "quote":
        return [f"Repeat the following text exactly, word for word:\n\n{make_prompt(rng, args.input_len)}"
                for _ in range(args.num_requests)]
    prompts = []
    for _ in range(args.num_requests):
        user = make_prompt(rng, args.input_len)
        if prefix is None:
            prompts.append(user)
        else:
            prompts.append([{"role": "system", "content": prefix}, {"role": "user", "content": user}] if chat
                           else prefix + "\n\n" + user)  # fmt: skip
    return prompts


async def conversation(client: httpx.AsyncClient, url: str, args: argparse.Namespace, model: str,
                       rng: random.Random) -> list[Result]:  # fmt: skip
    """One multi-turn chat: each turn resends the history (the earlier user turns and answers)."""
    messages, results = [], []
    for _ in range(args.turns):
        messages.append({"role": "user", "content": make_prompt(rng, args.input_len)})
        res = await one_request(client, url, request_body(args, model, list(messages), True), True)
        results.append(res)
        if not res.ok:
            break
        messages.append({"role": "assistant", "content": res.text})
    return results


def turn_accounting(conversations: list[list[Result]]) -> dict:
    """Prompt tokens computed (not cached) against the tokens new in each turn's prompt: its growth over
    the previous turn's prompt (turn 1: all of it), and that growth less the previous answer (the
    tokens the server has never seen: the new user turn and the template's tokens around it)."""
    computed = new = unseen = 0
    for turns in conversations:
        previous = None
        for r in turns:
            if not r.ok:
                break
            computed += r.prompt_tokens - r.cached_tokens
            grown = r.prompt_tokens - (previous.prompt_tokens if previous else 0)
            new += grown
            unseen += grown - (previous.output_tokens if previous else 0)
            previous = r
    return {"computed_prompt_tokens": computed, "new_prompt_tokens": new, "unseen_prompt_tokens": unseen,
            "computed_per_new": computed / new if new else None,
            "computed_per_unseen": computed / unseen if unseen else None}  # fmt: skip


async def run_load(args: argparse.Namespace, url: str, model: str, concurrency: int | None,
                   rate: float | None) -> dict:  # fmt: skip
    chat = args.endpoint == "chat"
    url = url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    gate = asyncio.Semaphore(concurrency or args.num_requests)
    limits = httpx.Limits(max_connections=concurrency or args.num_requests, max_keepalive_connections=None)
    multi_turn = args.workload == "multi-turn"
    async with httpx.AsyncClient(timeout=args.timeout, headers=headers, limits=limits) as client:

        async def limited(job) -> list[Result]:
            async with gate:
                if multi_turn:
                    return await conversation(client, url, args, model, job)
                return [await one_request(client, url, request_body(args, model, job, chat), chat)]

        jobs = ([random.Random(rng.random()) for _ in range(args.num_requests)] if multi_turn
                else make_prompts(args, rng, chat))  # fmt: skip
        start = time.perf_counter()
        tasks = []
        for job in jobs:
            tasks.append(asyncio.create_task(limited(job)))
            if rate is not None:  # Poisson arrivals: exponential gaps
                await asyncio.sleep(rng.expovariate(rate))
        grouped = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    results = [r for group in grouped for r in group]
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = [r.error for r in results if not r.ok]
    prompt_tokens, cached = sum(r.prompt_tokens for r in ok), sum(r.cached_tokens for r in ok)
    run = {
        "concurrency": concurrency, "request_rate": rate, "num_requests": len(results), "completed": len(ok),
        "errors": len(errors), "first_errors": errors[:3], "duration_s": duration,
        "requests_per_s": len(ok) / duration, "input_tokens": prompt_tokens, "cached_tokens": cached,
        "prefix_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration,
        "ttft_s": percentiles([r.ttft for r in ok]), "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
    }  # fmt: skip
    if multi_turn:
        run |= turn_accounting(grouped)
    return run


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "httpx": httpx.__version__}  # fmt: skip


SPEC_METRICS = {"proposed": "llama_kernels_spec_decode_num_draft_tokens_total",
                "accepted": "llama_kernels_spec_decode_num_accepted_tokens_total",
                "verifications": "llama_kernels_spec_decode_num_verifications_total"}  # this server's names


def spec_counters(url: str, headers: dict) -> dict | None:
    """The server's speculative-decoding counters from its /metrics (None where it has none)."""
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=30).text
    except httpx.HTTPError:
        return None
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    if not all(name in values for name in SPEC_METRICS.values()):
        return None
    return {key: float(values[name]) for key, name in SPEC_METRICS.items()}


def spec_delta(before: dict | None, after: dict | None) -> dict | None:
    """Draft tokens proposed / accepted and verifications during a run, the acceptance rate and the tokens
    per verification (accepted drafts + the target's own); None without counters or without drafts."""
    if before is None or after is None:
        return None
    d = {key: int(after[key] - before[key]) for key in SPEC_METRICS}
    if not d["verifications"]:
        return None
    return {**d, "acceptance_rate": d["accepted"] / d["proposed"],
            "tokens_per_verification": (d["accepted"] + d["verifications"]) / d["verifications"]}


def table(runs: list[dict], width: int = 6) -> str:
    """The runs as text; width: of the server label column."""

    def ms(d: dict, k: str) -> str:
        return "-" if d[k] is None else f"{d[k] * 1000:.3g}"  # 3 digits: a sub-millisecond ITL is not 0

    width = max([width] + [len(r.get("label") or "") for r in runs])
    head = (f"{'server':>{width}} {'conc':>5} {'rate':>6} {'ok/err':>8} {'req/s':>7} {'output tok/s':>12} "
            f"{'hit %':>6} | {'TTFT ms p50/p90/p99':>20} | {'TPOT ms p50/p90/p99':>20} | {'ITL ms p50/p90/p99':>20}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in runs:
        t, p, i = r["ttft_s"], r["tpot_s"], r["itl_s"]
        rate = "inf" if r["request_rate"] is None else f"{r['request_rate']:g}"
        lines.append(
            f"{r.get('label') or '-':>{width}} {r['concurrency'] or '-':>5} {rate:>6} "
            f"{str(r['completed']) + '/' + str(r['errors']):>8} {r['requests_per_s']:>7.3g} "
            f"{r['output_tokens_per_s']:>12.1f} {100 * r['prefix_hit_rate']:>6.1f} | "
            f"{'/'.join(ms(t, k) for k in ('p50', 'p90', 'p99')):>20} | "
            f"{'/'.join(ms(p, k) for k in ('p50', 'p90', 'p99')):>20} | "
            f"{'/'.join(ms(i, k) for k in ('p50', 'p90', 'p99')):>20}"
        )
        if r.get("speculative"):
            sp = r["speculative"]
            lines.append(f"{'':>{width}} speculative: {sp['accepted']}/{sp['proposed']} draft tokens accepted "
                         f"({100 * sp['acceptance_rate']:.0f}%), {sp['tokens_per_verification']:.2f} tokens per "
                         "verification")  # fmt: skip
        if r.get("computed_per_new") is not None:
            lines.append(f"{'':>{width}} prompt tokens computed {r['computed_prompt_tokens']}: "
                         f"{r['computed_per_new']:.2f}x the {r['new_prompt_tokens']} new in the turns' prompts, "
                         f"{r['computed_per_unseen']:.2f}x the {r['unseen_prompt_tokens']} never seen "
                         "(new less the previous answers)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", nargs="+", default=["http://127.0.0.1:8000"],
                        help="server base URL (without /v1); several run the same load one after the other")
    parser.add_argument("--label", nargs="+", default=None, help="a name for each --url in the table and JSON")
    parser.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--workload", choices=("random", "shared-prefix", "multi-turn", "quote"),
                        default="random",
                        help="random prompts; one shared system prompt (--prefix-len) + a user turn each; "
                        "multi-turn chats (--turns) resending their history; or prompts asking to repeat "
                        "their text (speculative prompt lookup)")  # fmt: skip
    parser.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix: system prompt words (~tokens)")
    parser.add_argument("--turns", type=int, default=8, help="multi-turn: turns per conversation")
    parser.add_argument("--num-requests", type=int, default=64, help="requests (multi-turn: conversations)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="requests (multi-turn: conversations) in flight at most; several values run one "
                        "after another (default 1)")  # fmt: skip
    parser.add_argument("--request-rate", type=float, nargs="+", default=None,
                        help="Poisson arrivals per second instead of a fixed concurrency (one run per value)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt (user turn) length in words (~tokens)")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers without it)")
    parser.add_argument("--json-schema", default=None, metavar="JSON|PATH",
                        help="send response_format json_schema with this schema (inline JSON or a file)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="prompt and arrival randomness")
    parser.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) before the runs, "
                        "with prompts of their own (so they prime no prefix cache)")  # fmt: skip
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. how the server was started)")
    parser.add_argument("--server-info", nargs="*", default=[], metavar="KEY=VALUE",
                        help="facts about the server stored in the JSON (versions, flags, threads)")
    parser.add_argument("--out", default=None, metavar="PATH", help="also write the results here, as JSON")
    parser.add_argument("--json", dest="out", help=argparse.SUPPRESS)  # the old name of --out
    args = parser.parse_args(argv)
    global httpx
    httpx = require("httpx", "serve", "bench_serve.py")
    for name in ("num_requests", "input_len", "output_len", "prefix_len", "turns"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; expected an integer >= 1")
    if args.json_schema is not None:
        try:
            text = args.json_schema if args.json_schema.lstrip().startswith("{") else open(args.json_schema).read()
            args.json_schema = json.loads(text)
        except (OSError, ValueError) as err:
            parser.error(f"--json-schema {args.json_schema[:60]!r}: expected a JSON schema or a file holding one ({err})")
    if any("=" not in kv for kv in args.server_info):
        parser.error(f"--server-info {args.server_info}: expected KEY=VALUE pairs")
    if args.concurrency and args.request_rate:
        parser.error("give --concurrency or --request-rate, not both")
    if args.workload == "multi-turn" and args.endpoint != "chat":
        parser.error("--workload multi-turn needs --endpoint chat")
    labels = args.label or args.url
    if len(labels) != len(args.url):
        parser.error(f"--label: {len(labels)} labels for {len(args.url)} URLs; expected one per URL")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.request_rate:
        plans = [(None, r) for r in args.request_rate]
    else:
        plans = [(c, None) for c in args.concurrency or [1]]
    runs, servers = [], []
    for url, label in zip(args.url, labels):
        try:
            models = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()
            model = args.model or models["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            print(f"bench_serve: cannot list the models of {url}: {err}", file=sys.stderr)
            return 1
        servers.append({"label": label, "url": url, "model": model})
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "num_requests": args.warmup, "workload": "random",
                                         "seed": args.seed + 1000})  # fmt: skip
            asyncio.run(run_load(warm, url, model, 1, None))
        for concurrency, rate in plans:
            before = spec_counters(url, headers)
            runs.append({"label": label, **asyncio.run(run_load(args, url, model, concurrency, rate))})
            runs[-1]["speculative"] = spec_delta(before, spec_counters(url, headers))
            lines = table(runs[-1:], max(len(label) for label in labels)).splitlines()
            print("\n".join(lines if len(runs) == 1 else lines[2:]), flush=True)  # the header once
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "servers": servers,
        "endpoint": args.endpoint, "workload": args.workload, "input_len_words": args.input_len,
        "prefix_len_words": args.prefix_len if args.workload == "shared-prefix" else None,
        "turns": args.turns if args.workload == "multi-turn" else None, "output_len": args.output_len,
        "temperature": args.temperature, "ignore_eos": not args.no_ignore_eos, "json_schema": args.json_schema,
        "client_machine": machine(),
        "server": dict(kv.split("=", 1) for kv in args.server_info), "note": args.note, "runs": runs,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
