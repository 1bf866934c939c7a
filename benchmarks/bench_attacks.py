"""A victim stream's inter-token gap and /health's latency while one client attacks a live `llama-kernels serve`.

Starts the server from a source tree (--root: this checkout, or another one such as the code before a change, via
PYTHONPATH), then for each phase runs one victim (a streamed completion of --victim-tokens tokens, given at
most --phase-seconds) and polls /health 10 times a second (5 s timeout each) while the attack runs in a
separate process:

- none: no attack (the baseline of the same server, machine and moment);
- oversized_prompts: 4 clients POST completions whose prompts (random words) cannot fit the context, in a
  loop: two of 1 MB, two just under the byte bound a server may tokenize (context x the longest token's bytes);
- many_stop_strings: 4 clients stream requests with 60,000 stop strings each (OpenAI allows 4), in a loop;
- slowloris: 1100 connections that send part of their headers and then one byte every 2 s.

The server runs under `ulimit -Sn 1024` (the common default soft limit; the hard one stays) so the slowloris phase reaches the open-file limit
unless the server raises it. Writes a JSON with the machine, the conditions and per phase the gaps' and
/health latencies' median / p99 / max, /health failures and the attack's responses.

    python benchmarks/bench_attacks.py --root . --out after.json
    python benchmarks/bench_attacks.py --root /path/to/old/checkout --out before.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import socket
import statistics
import string
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

MODEL = "SmolLM2-135M-Instruct"
PHASES = ("none", "oversized_prompts", "many_stop_strings", "slowloris")
MAX_TOKEN_BYTES = 162  # SmolLM2's longest token string (Tokenizer.max_token_bytes)


def start_server(root: Path, max_context: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = f"ulimit -Sn 1024 && exec {sys.executable} -m llama_kernels serve --port 0 --max-context {max_context}"
    env = {**os.environ, "PYTHONPATH": str(root.resolve()), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,
                            cwd=root)  # python -m puts the working directory first on sys.path: run in root
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "serving" in line:
            return proc, line.split(" on ")[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")


# --- attacks (each in its own process) -------------------------------------------------------------


def _post_loop(url: str, body: bytes, stream: bool, stop, counts) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                if stream:
                    with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as r:
                        for _ in r.iter_bytes():
                            if stop.is_set():
                                break
                        status = r.status_code
                else:
                    status = client.post(url, content=body, headers={"content-type": "application/json"}).status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            counts.append(str(status))


def words(nbytes: int) -> str:
    """nbytes of seeded random lowercase words: every word new to the tokenizer's cache, so each costs a BPE."""
    rng = random.Random(0)
    out, n = [], 0
    while n < nbytes:
        w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:nbytes]


def attack(kind: str, url: str, max_context: int, stop, counts) -> None:
    """Run one attack until `stop` is set (in a child process)."""
    path = url + "/v1/completions"
    if kind == "oversized_prompts":
        big = json.dumps({"model": MODEL, "prompt": words(1_000_000), "max_tokens": 1}).encode()
        under = json.dumps({"model": MODEL, "prompt": words(MAX_TOKEN_BYTES * max_context - 100),
                            "max_tokens": 1}).encode()  # fmt: skip
        jobs = [(big, False), (big, False), (under, False), (under, False)]
    elif kind == "many_stop_strings":
        body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 64, "ignore_eos": True, "stream": True,
                           "stop": [f"zq{i}" for i in range(60_000)]}).encode()  # fmt: skip
        jobs = [(body, True)] * 4
    else:
        slowloris(url, stop, counts)
        return
    threads = [threading.Thread(target=_post_loop, args=(path, body, stream, stop, counts)) for body, stream in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def slowloris(url: str, stop, counts, n: int = 1100) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    host, port = url.split("//")[1].split(":")
    socks = []
    while not stop.is_set():
        while len(socks) < n and not stop.is_set():  # (re)open the ones the server closed
            try:
                sock = socket.create_connection((host, int(port)), timeout=2)
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                socks.append(sock)
            except OSError as err:
                counts.append(type(err).__name__)
                break
        alive = []
        for sock in socks:
            try:
                sock.sendall(b"X")
                alive.append(sock)
            except OSError:
                counts.append("closed by server")
                sock.close()
        socks = alive
        stop.wait(2)
    for sock in socks:
        sock.close()


# --- measurement ---------------------------------------------------------------------------------


async def victim(url: str, tokens: int, seconds: float) -> list[float]:
    body = {"model": MODEL, "prompt": "Count from one to one hundred:", "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    times = []

    async def run():
        async with httpx.AsyncClient(timeout=seconds) as client:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        times.append(time.perf_counter())

    try:
        await asyncio.wait_for(run(), seconds)
    except (TimeoutError, httpx.HTTPError):
        pass
    return [b - a for a, b in zip(times, times[1:])]


def poll_health(url: str, stop: threading.Event, out: list, failures: list) -> None:
    """GET /health every 0.1 s on one kept-alive connection (a new one when the server closed it)."""
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = client.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            (out if ok else failures).append(time.perf_counter() - t0)
            time.sleep(0.1)


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "median": statistics.median(v), "p99": v[min(len(v) - 1, int(0.99 * len(v)))], "max": v[-1]}


def phase(kind: str, url: str, args) -> dict:
    ctx = mp.get_context("spawn")
    stop, counts = ctx.Event(), ctx.Manager().list()
    proc = None
    if kind != "none":
        proc = ctx.Process(target=attack, args=(kind, url, args.max_context, stop, counts))
        proc.start()
        time.sleep(3)  # under way (slowloris: its connections opened)
    hstop, health, failures = threading.Event(), [], []
    poller = threading.Thread(target=poll_health, args=(url, hstop, health, failures))
    poller.start()
    normal_t0 = time.perf_counter()
    try:  # one ordinary request first (slowloris: does it get through?)
        normal = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                            timeout=30).status_code  # fmt: skip
    except httpx.HTTPError as err:
        normal = type(err).__name__
    normal_s = time.perf_counter() - normal_t0
    gaps = asyncio.run(victim(url, args.victim_tokens, args.phase_seconds))
    hstop.set()
    poller.join()
    stop.set()
    if proc is not None:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    attack_counts = {}
    for c in list(counts):
        attack_counts[c] = attack_counts.get(c, 0) + 1
    return {"victim_gap_s": summary(gaps), "victim_tokens": len(gaps) + 1 if gaps else 0,
            "health_s": summary(health), "health_failures": len(failures),
            "normal_request": {"status": normal, "seconds": normal_s}, "attack_responses": attack_counts}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the source tree whose llama_kernels serves (default: this checkout)")  # fmt: skip
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--victim-tokens", type=int, default=40)
    parser.add_argument("--phase-seconds", type=float, default=40.0, help="the victim's time limit per phase")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--label", default=None, help="what the run measures (e.g. before / after)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--json", dest="out", type=Path, help=argparse.SUPPRESS)  # the old name of --out
    args = parser.parse_args()
    log = Path(f"/tmp/bench_attacks_server_{os.getpid()}.log")
    load_before = os.getloadavg()
    proc, url = start_server(args.root, args.max_context, log)
    try:
        git = subprocess.run(["git", "-C", str(args.root), "rev-parse", "HEAD"], capture_output=True, text=True)
        result = {
            "label": args.label, "root": str(args.root.resolve()), "commit": git.stdout.strip() or None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "loadavg_before": load_before,
                        "note": "shared with other agents' jobs: noisy; compare phases of one run, not runs"},
            "conditions": {"model": MODEL, "dtype": "float32", "device": "cpu", "server_threads": 2,
                           "max_context": args.max_context, "victim_tokens": args.victim_tokens,
                           "victim_time_limit_s": args.phase_seconds, "server_open_file_limit": 1024,
                           "health_poll_interval_s": 0.1, "client": "same machine, loopback"},
            "phases": {},
        }  # fmt: skip
        for kind in args.phases:
            result["phases"][kind] = r = phase(kind, url, args)
            g, h = r["victim_gap_s"], r["health_s"]
            print(f"{kind:18s} victim gap median {g.get('median', float('nan')) * 1e3:8.0f} ms p99 "
                  f"{g.get('p99', float('nan')) * 1e3:8.0f} ms ({r['victim_tokens']} tokens) | /health median "
                  f"{h.get('median', float('nan')) * 1e3:7.1f} ms p99 {h.get('p99', float('nan')) * 1e3:7.1f} ms, "
                  f"{r['health_failures']} failed | normal request {r['normal_request']['status']} in "
                  f"{r['normal_request']['seconds']:.2f} s", flush=True)  # fmt: skip
        result["machine"]["loadavg_after"] = os.getloadavg()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
