"""`llama-kernels serve` end to end: a live server process (the embedded SmolLM2, fp32 CPU) on
127.0.0.1 and a free port, driven by the real `openai` client. Greedy outputs of concurrent requests
(with and without preemption) equal the same requests run alone in-process; streaming equals not;
a disconnect frees its blocks; bad input never stops the server; a load run leaks nothing."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import socket
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_smollm2

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import llama_kernels  # noqa: E402
from llama_kernels.server.metrics import parse as parse_metrics  # noqa: E402

pytestmark = needs_smollm2  # the server and the tokenizer are the default model's

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_PARENT = str(Path(llama_kernels.__file__).resolve().parent.parent)  # servers run the llama_kernels under test
MODEL = "SmolLM2-135M-Instruct"
MAX_CONTEXT = 512
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
# 32 prompts of different lengths, each with its own max_tokens
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
PROMPTS = [(" ".join(WORDS[: 1 + i % len(WORDS)]) + f" {i}", 2 + (i * 5) % 9) for i in range(32)]


class ServerProcess:
    """`python -m llama_kernels serve --port 0 ...` until the ready line gives its address."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None, max_context: int = MAX_CONTEXT,
                 launcher: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.log = tmp / f"server{os.getpid()}_{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", *launcher, "llama_kernels", "serve", "--port", "0", "--max-context",
               str(max_context), *args]  # fmt: skip
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PACKAGE_PARENT, **(env or {})}
        self.killed = False  # whether stop() had to SIGKILL it
        self.log_file = open(self.log, "w")  # the server's stderr, shown if it fails to start
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=full_env)
        deadline = time.monotonic() + 180
        line = ""
        while "serving" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start: {self.log.read_text()[-3000:]}")
        self.url = line.split(" on ")[1].strip()
        assert line.startswith(f"serving {MODEL} on http://127.0.0.1:"), line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=120, **kw)  # fmt: skip

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                                  timeout=300, **kw)  # fmt: skip

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def assert_no_blocks_held(self, within: float = 1.0) -> None:
        deadline = time.monotonic() + within
        while (used := self.metrics()["llama_kernels_kv_blocks_used"]) != 0:
            assert time.monotonic() < deadline, f"{used} KV blocks still held {within} s later"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "--max-num-seqs", "16", "--header-timeout", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(one_thread):
    from llama_kernels.llm import LLM

    return LLM.from_pretrained(max_context=MAX_CONTEXT, progress=False)


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    """Each of PROMPTS run alone (batch of one) through LLM.generate_ids, greedy: its new token ids."""
    return [llm.generate_ids([llm.tokenizer.encode(p)], max_new_tokens=n, temperature=0.0)[0] for p, n in PROMPTS]


def _run_concurrently(s: ServerProcess, prompts=PROMPTS, **kw) -> list:
    async def go():
        async with s.async_client(**kw) as client:
            return await asyncio.gather(*(client.completions.create(model=MODEL, prompt=p, max_tokens=n,
                                                                    temperature=0) for p, n in prompts))  # fmt: skip

    return asyncio.run(go())


def _assert_same_as_alone(results, alone, tokenizer, prompts=PROMPTS) -> None:
    for (prompt, n), res, ref in zip(prompts, results, alone, strict=True):
        choice = res.choices[0]
        assert choice.text == tokenizer.decode(ref), f"prompt {prompt!r}: served {choice.text!r}"
        assert res.usage.completion_tokens == len(ref) + (choice.finish_reason == "stop"), prompt  # eos counts
        assert res.usage.prompt_tokens == len(tokenizer.encode(prompt)), prompt
        assert choice.finish_reason == ("length" if len(ref) == n else "stop"), prompt


def test_paris(server):
    res = server.client().chat.completions.create(model=MODEL, messages=PARIS, max_tokens=16, temperature=0)
    assert "Paris" in res.choices[0].message.content
    assert res.choices[0].finish_reason in ("stop", "length")


def test_fp8_kv_cache(tmp_path, monkeypatch, capsys):
    """--kv-cache-dtype fp8 reaches the LLM; the GGUF carries no KV scales, so one calibration pass fixes them."""
    from llama_kernels.cli import main
    from llama_kernels.llm import LLM

    def refuse(path, **kw):
        raise ValueError(f"kv_cache_dtype={kw['kv_cache_dtype']!r}")

    monkeypatch.setattr(LLM, "from_pretrained", refuse)
    assert main(["serve", "--port", "0", "--kv-cache-dtype", "fp8"]) == 1
    assert main(["serve", "--port", "0"]) == 1
    assert capsys.readouterr().err.splitlines() == ["llama-kernels serve: error: kv_cache_dtype='fp8'",
                                                    "llama-kernels serve: error: kv_cache_dtype=None"]  # fmt: skip
    s = ServerProcess(tmp_path, "--kv-cache-dtype", "fp8")
    try:
        test_paris(s)
    finally:
        s.stop()
    assert "FP8 scales from the checkpoint" not in s.log.read_text()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_stream_joins_to_non_stream_and_usage_is_the_tokenizers(server, llm, chat):
    client, tok = server.client(), llm.tokenizer
    if chat:
        prompt_ids = tok.apply_chat_template(PARIS)
        args = dict(model=MODEL, messages=PARIS, max_tokens=24, temperature=0)
        full = client.chat.completions.create(**args)
        text = full.choices[0].message.content
        chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        prompt = "The three primary colors are"
        prompt_ids = tok.encode(prompt)
        args = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        full = client.completions.create(**args)
        text = full.choices[0].text
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    ref = llm.generate_ids([prompt_ids], max_new_tokens=24, temperature=0.0)[0]
    assert tok.decode(ref) == text
    eos = full.choices[0].finish_reason == "stop"  # the eos token counts (as vLLM)
    assert full.usage.prompt_tokens == len(prompt_ids) and full.usage.completion_tokens == len(ref) + eos
    assert full.usage.total_tokens == len(prompt_ids) + len(ref) + eos
    assert chunks[-1].choices == []
    streamed = chunks[-1].usage
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (full.usage.prompt_tokens,
                                                                    full.usage.completion_tokens)
    # the streamed request came second: its prompt's whole blocks were cached by the first
    cached = (len(prompt_ids) - 1) // 16 * 16
    assert streamed.prompt_tokens_details.cached_tokens == cached
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]


def test_prefix_cache_hits_usage_salts_and_metrics(server, llm):
    """A repeated prompt reports its cached whole blocks in usage.prompt_tokens_details.cached_tokens
    and in /metrics; another cache_salt never hits them; the text is the same either way."""
    client, tok = server.client(), llm.tokenizer
    prompt = " ".join(WORDS * 6) + " and so"
    n = len(tok.encode(prompt))
    before = server.metrics()
    answers = []
    for salt in ("tenant-1", "tenant-1", "tenant-2"):
        res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body={"cache_salt": salt})  # fmt: skip
        answers.append((res.choices[0].text, res.usage.prompt_tokens_details.cached_tokens))
    hit = (n - 1) // 16 * 16
    assert [c for _, c in answers] == [0, hit, 0] and hit > 0
    assert len({t for t, _ in answers}) == 1
    after = server.metrics()
    p = "llama_kernels_prefix_cache_"
    assert after[p + "queries_total"] - before[p + "queries_total"] == 3 * n
    assert after[p + "hits_total"] - before[p + "hits_total"] == hit
    assert after["llama_kernels_kv_blocks_cached_free"] >= 2 * (n // 16)  # both salts' blocks stay cached
    server.assert_no_blocks_held()


def test_logprobs(server):
    client = server.client()
    res = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=3)  # fmt: skip
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens
    assert "".join(c.token for c in content) == res.choices[0].message.content
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token and c.logprob <= 0
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
    res = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, logprobs=2)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == res.choices[0].text


def test_concurrent_greedy_equals_alone(server, alone, llm):
    _assert_same_as_alone(_run_concurrently(server), alone, llm.tokenizer)
    server.assert_no_blocks_held()


def test_preemption_keeps_outputs_and_api_key(tmp_path, alone, llm):
    # up to 16 running requests of 1-2 blocks each (16 tokens a block) over a pool of one 48-token sequence (3 blocks)
    s = ServerProcess(tmp_path, "--max-num-seqs", "16", "--kv-cache-seqs", "1", env={"LLAMA_KERNELS_API_KEY": "k3y"},
                      max_context=48)  # fmt: skip
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model=MODEL, prompt="hi", max_tokens=1)
        _assert_same_as_alone(_run_concurrently(s, api_key="k3y"), alone, llm.tokenizer)
        m = s.metrics()
        assert m["llama_kernels_num_preemptions_total"] > 0, "the pool was large enough: no preemption tested"
        s.assert_no_blocks_held()
    finally:
        s.stop()


def test_disconnect_mid_stream_frees_blocks_within_a_second(server):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                assert server.metrics()["llama_kernels_kv_blocks_used"] > 0
                break
    server.assert_no_blocks_held(within=1.0)
    assert server.metrics()['llama_kernels_request_success_total{finished_reason="abort"}'] >= 1


# (endpoint, body, status, param): every kind of bad input the brief lists, on the real server
BAD = [
    ("chat/completions", b"{'messages': oops", 400, None),
    ("chat/completions", {"model": MODEL, "messages": PARIS, "temperature": "warm"}, 400, "temperature"),
    ("chat/completions", {"model": MODEL}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": PARIS, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"model": MODEL, "messages": PARIS, "max_tokens": MAX_CONTEXT}, 400, "max_tokens"),
    ("chat/completions", {"model": MODEL, "messages": PARIS, "n": 99}, 400, "n"),
    ("chat/completions", {"model": "llama-9000", "messages": PARIS}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": "x" * (2 << 20)}, 413, None),
]


def test_bad_inputs_then_a_good_request(server):
    for path, body, status, param in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body)
        r = httpx.post(f"{server.url}/v1/{path}", content=content, headers={"content-type": "application/json"},
                       timeout=30)  # fmt: skip
        assert r.status_code == status, (body if len(content) < 200 else path, r.text)
        assert r.json()["error"]["param"] == param
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": PARIS, "max_tokens": MAX_CONTEXT})  # fmt: skip
    assert "max_tokens=512" in r.json()["error"]["message"] and "512" in r.json()["error"]["message"]
    test_paris(server)
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert server.client().models.list().data[0].id == MODEL


def test_load_run_no_errors_no_leaks(server):
    before = server.metrics()
    ok = 'llama_kernels_request_success_total{finished_reason="length"}'
    stop = 'llama_kernels_request_success_total{finished_reason="stop"}'

    async def go():
        gate = asyncio.Semaphore(32)
        async with server.async_client() as client:

            async def one(i: int):
                async with gate:
                    return await client.completions.create(model=MODEL, prompt=f"Item {i}: a", max_tokens=1 + i % 3,
                                                           temperature=0.7, seed=i,
                                                           extra_body={"ignore_eos": True})  # fmt: skip

            return await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)

    results = asyncio.run(go())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"
    assert [r.usage.completion_tokens for r in results] == [1 + i % 3 for i in range(200)]
    server.assert_no_blocks_held()
    after = server.metrics()
    assert after.get(ok, 0) + after.get(stop, 0) - before.get(ok, 0) - before.get(stop, 0) == 200


@pytest.mark.parametrize("load", [["--concurrency", "1", "3"], ["--request-rate", "20"]], ids=["concurrency", "rate"])
def test_bench_serve_smoke(server, tmp_path, load):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--url", server.url, "--model", MODEL,
           "--num-requests", "6", *load, "--input-len", "16", "--output-len", "4", "--endpoint", "chat",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(r["concurrency"], r["request_rate"]) for r in runs] == ([(1, None), (3, None)] if len(load) == 3
                                                                     else [(None, 20.0)])  # fmt: skip
    for r in runs:
        assert r["completed"] == 6 and r["errors"] == 0 and r["output_tokens"] == 24
        assert r["output_tokens_per_s"] > 0 and r["ttft_s"]["p50"] > 0 and r["itl_s"]["p99"] >= r["itl_s"]["p50"]
    assert "output tok/s" in proc.stdout
    server.assert_no_blocks_held()


@pytest.mark.parametrize("workload", [["shared-prefix", "--prefix-len", "40"], ["multi-turn", "--turns", "3"]],
                         ids=["shared-prefix", "multi-turn"])  # fmt: skip
def test_bench_serve_prefix_workloads(server, tmp_path, workload):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--url", server.url, "--label", "on",
           "--num-requests", "3", "--concurrency", "3", "--input-len", "8", "--output-len", "4", "--endpoint",
           "chat", "--workload", *workload, "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["label"] == "on" and run["errors"] == 0 and 0 < run["cached_tokens"] < run["input_tokens"]
    if workload[0] == "multi-turn":
        assert run["completed"] == 9 and run["new_prompt_tokens"] > run["unseen_prompt_tokens"] > 0
        assert run["computed_prompt_tokens"] == run["input_tokens"] - run["cached_tokens"]
        assert "prompt tokens computed" in proc.stdout
    server.assert_no_blocks_held()


def test_tensor_parallel_serves_the_same_greedy_answers(tmp_path, alone, llm):
    """torchrun with gloo, 3 ranks (SmolLM2's 9 query and 3 KV heads split 3 ways): rank 0 serves."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = ("torch.distributed.run", "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
                "--master-port", str(port), "-m")  # fmt: skip
    s = ServerProcess(tmp_path, "--tp", "3", "--max-num-seqs", "8", launcher=launcher)
    try:
        test_paris(s)
        _assert_same_as_alone(_run_concurrently(s, PROMPTS[:8]), alone[:8], llm.tokenizer, PROMPTS[:8])
        s.assert_no_blocks_held()
        os.kill(_ranks(s.proc.pid)[0], signal.SIGTERM)  # a planned stop of rank 0: it stops the other ranks
        assert s.proc.wait(30) == 0, "torchrun saw a failure: " + s.log.read_text()[-2000:]
    finally:
        s.stop()
    assert not s.killed, "the ranks did not stop within 15 s of SIGTERM"


def _ranks(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of a torchrun job's worker processes."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        ranks[int(env["RANK"])] = pid
    return ranks


def test_tensor_parallel_hung_rank_turns_health_503_and_fails_requests(tmp_path):
    """A stopped follower (SIGSTOP): past the step watchdog's bound (6 s: steps of 3 ranks on a shared 2-core
    machine can take seconds) /health answers 503 and the request in flight ends with a 503; once
    the 15 s collective timeout passes, /health names the rank and the failure without the collective
    library's source paths."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = ("torch.distributed.run", "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
                "--master-port", str(port), "-m")  # fmt: skip
    s = ServerProcess(tmp_path, "--tp", "3", "--step-timeout", "6", "--tp-timeout", "15", launcher=launcher)
    ranks = _ranks(s.proc.pid)
    try:
        test_paris(s)
        os.kill(ranks[2], signal.SIGSTOP)
        t0 = time.monotonic()
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line]
        # no token came before the bound: the error is the response itself (else the stream's last event)
        assert r.status_code == 503 and "bound" in json.loads(lines[0])["error"]["message"], lines
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 503 and time.monotonic() - t0 < 15, (r.text, time.monotonic() - t0)
        deadline = time.monotonic() + 30
        while "collective" not in (message := httpx.get(s.url + "/health", timeout=10).json()["error"]["message"]):
            assert time.monotonic() < deadline, message
            time.sleep(0.5)
        assert message.startswith("tensor parallel: rank 0 of 3: ") and not re.search(r"\.(cc|cpp|h):\d", message), message
        # the follower whose collective failed says so in one line and waits, rather than exiting with an
        # error, which made torchrun stop every rank and rank 0's /health with them
        deadline = time.monotonic() + 30
        while "rank 1 of 3" not in s.log.read_text():
            assert time.monotonic() < deadline, s.log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 503 and "collective" in r.json()["error"]["message"], r.text
        assert "this rank waits for the launcher to stop it" in s.log.read_text() and "[rank1]: Traceback" not in s.log.read_text()
    finally:
        os.kill(ranks[2], signal.SIGCONT)
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        s.stop()


# odd but well-formed values: each gets an answer or a 400, never a 5xx, and the server carries on
EDGE = [
    {"temperature": 1e-45}, {"temperature": 2, "top_p": 1e-45, "seed": 1}, {"temperature": 1, "top_k": 10**9},
    {"seed": 2**64}, {"seed": -1, "temperature": 1}, {"max_tokens": 2**70}, {"stop": ["\n"] * 50},
    {"stop": "\u00e9\U0001f600"}, {"logprobs": True, "top_logprobs": 20}, {"temperature": 1e308},
    {"messages": [{"role": "user", "content": "\ud800 lone surrogate"}]},
    {"messages": [{"role": "user", "content": ""}]}, {"messages": [{"role": "assistant", "content": "hi"}] * 3},
    {"messages": [{"role": "user", "content": "\u0000" * 10}]},
]


def test_edge_values_never_fail_the_server(server):
    for extra in EDGE:
        body = json.dumps({"model": MODEL, "messages": PARIS, "max_tokens": 3, **extra})
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code in (200, 400), (extra, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json()["error"]["param"] is not None or "JSON" in r.json()["error"]["message"], (extra, r.text)
    test_paris(server)
    server.assert_no_blocks_held()


# --- one client cannot break the server (issue 18) ----------------------------------------------------


async def _stream_gaps(s: ServerProcess, max_tokens: int, **extra) -> tuple[list[float], str | None]:
    """A streamed completion: (the gaps in seconds between its token-bearing events, its finish reason)."""
    body = {"model": MODEL, "prompt": "Count from one to one hundred:", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0, **extra}
    times, finish = [], None
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", s.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    finish = choice["finish_reason"] or finish
                    if choice["text"]:
                        times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])], finish


def test_a_request_whose_sampling_fails_fails_alone(server):
    """top_p=5e-324 (0 in float32) masked every token and its sampling raised inside the step, failing every
    request in flight: now it fails alone (500) or succeeds, and four victims batched with it finish."""

    async def go():
        async with server.async_client() as client:
            poison = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0,
                                               top_p=5e-324, seed=1)  # fmt: skip
            victims = [_stream_gaps(server, 12) for _ in range(4)]
            return await asyncio.gather(poison, *victims, return_exceptions=True)

    poison, *victims = asyncio.run(go())
    assert not isinstance(poison, BaseException) or isinstance(poison, openai.InternalServerError), repr(poison)
    for v in victims:
        assert not isinstance(v, BaseException) and v[1] == "length" and len(v[0]) == 11, v
    server.assert_no_blocks_held()


def _attack(url: str, body: bytes, stop: threading.Event, statuses: list[int]) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                statuses.append(client.post(url, content=body, headers={"content-type": "application/json"}).status_code)
            except httpx.TransportError:  # an oversized body: the server answered 413 and closed before the end
                statuses.append(413)


def measure_under_attack(s: ServerProcess, attacks: list[tuple[str, bytes]], victim_tokens: int = 12):
    """(victim gaps, /health latencies in s, attack response statuses) while each attack body is POSTed in a loop
    by its own client thread (four at most) and a victim streams; /health is polled 20 times a second."""
    stop, statuses, health = threading.Event(), [], []
    threads = [threading.Thread(target=_attack, args=(s.url + path, body, stop, statuses)) for path, body in attacks]
    for t in threads:
        t.start()
    time.sleep(0.5 if attacks else 0)  # the attack is under way

    def poll():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert client.get(s.url + "/health").status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        gaps, finish = asyncio.run(_stream_gaps(s, victim_tokens))
    finally:
        stop.set()
        for t in (*threads, poller):
            t.join(120)
    assert finish == "length" and len(gaps) == victim_tokens - 1
    return gaps, health, statuses


def _bench_attacks():
    spec = importlib.util.spec_from_file_location("bench_attacks", ROOT / "benchmarks" / "bench_attacks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# prompts of seeded random words (each new to the tokenizer's cache): 1 MB (2 s to tokenize), and 80 KB, under
# the byte bound of MAX_CONTEXT x the longest token (so the server tokenizes it, then refuses it)
_words = _bench_attacks().words
OVERSIZED = json.dumps({"model": MODEL, "prompt": _words(1_000_000), "max_tokens": 1}).encode()
LONG = json.dumps({"model": MODEL, "prompt": _words(80_000), "max_tokens": 1}).encode()
STOPS = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 64, "ignore_eos": True,
                    "stop": [f"zq{i}" for i in range(60_000)]}).encode()  # fmt: skip


@pytest.mark.parametrize("attack", ["oversized_prompts", "many_stop_strings"])
def test_health_and_a_victim_stream_stay_responsive_under_attack(server, attack):
    """Four clients POST maximal bad prompts (each refused: 413 at once or 400 after tokenizing on a worker
    thread), or requests with 60,000 stop strings (400: at most 4). Against the same victim stream without
    the attack (the machine is shared, so the bounds are relative): its median inter-token gap at most 20x
    (+0.5 s) under oversized prompts, 8x (+0.3 s) under stop strings, /health's median at most 0.25 s above (before: 293 ms -> 12.3 s gaps and 2.9 s /health under
    1 MB prompts; 159 ms -> 1984 ms gaps under 60,000 stop strings)."""
    path = "/v1/completions"
    attacks = [(path, OVERSIZED), (path, OVERSIZED), (path, LONG), (path, LONG)] if attack == "oversized_prompts" \
        else [(path, STOPS)] * 4
    calm_gaps, calm_health, _ = measure_under_attack(server, [])
    gaps, health, statuses = measure_under_attack(server, attacks)
    med = statistics.median
    print(f"{attack}: victim gap median {med(calm_gaps):.3f} -> {med(gaps):.3f} s, /health median "
          f"{med(calm_health) * 1e3:.1f} -> {med(health) * 1e3:.1f} ms, max {max(health) * 1e3:.0f} ms")
    assert statuses and set(statuses) <= {400, 413}, sorted(set(statuses))
    # 1 MB bodies are received and JSON-parsed in this process before the byte bound refuses them: on 2 cores that
    # measured 0.5-0.8 s gaps (calm: 57 ms) with the fix, no token in 40 s without it; 60,000 stop strings cost less
    factor, slack = (20, 0.5) if attack == "oversized_prompts" else (8, 0.3)
    assert med(gaps) < factor * med(calm_gaps) + slack, f"victim gaps {sorted(gaps)} (without the attack {sorted(calm_gaps)})"
    assert med(health) < med(calm_health) + 0.25, f"/health {sorted(health)}"


def test_slowloris_connections_are_closed_and_a_normal_request_succeeds(server):
    """150 connections that never finish their headers (some send nothing, some trickle a byte a second) are
    closed by the server once --header-timeout (2 s here) passes; a normal request succeeds meanwhile; the
    server raised its open-file limit to the hard limit."""
    pid = server.proc.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    assert soft == hard, limits
    host, port = server.url.split("//")[1].split(":")
    socks = []
    for i in range(150):
        sock = socket.create_connection((host, int(port)))
        if i % 2:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    t0 = time.monotonic()
    res = server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert res.usage.completion_tokens >= 1
    trickle = socks[1]
    closed = set()
    while len(closed) < len(socks) and time.monotonic() - t0 < 8:
        for i, sock in enumerate(socks):
            if i in closed:
                continue
            sock.settimeout(0.01)
            try:
                if sock is trickle:
                    sock.sendall(b"X")
                if sock.recv(1024) == b"":
                    closed.add(i)
            except (ConnectionResetError, BrokenPipeError):
                closed.add(i)
            except (TimeoutError, BlockingIOError):
                pass
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    for sock in socks:
        sock.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow connections still open after {elapsed:.1f} s"
    assert elapsed > 1.5, "closed before the header deadline"
    test_paris(server)


def test_a_client_leaving_mid_upload_is_one_log_line(server):
    before = server.log.read_text()
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"prompt\": \"")
        time.sleep(0.3)
    time.sleep(0.5)
    new = server.log.read_text()[len(before) :].splitlines()
    assert len(new) == 1 and "left during the upload" in new[0], new
    test_paris(server)


def test_sigterm_ends_every_stream_with_an_error_event_and_exits_0(tmp_path):
    """SIGTERM during six streams: new requests get 503 while they have --shutdown-timeout (1 s) to finish;
    then each ends with an error event and [DONE]; the process exits 0 (it died by the signal: 143)."""
    s = ServerProcess(tmp_path, "--max-num-seqs", "8", "--shutdown-timeout", "1")
    started = threading.Barrier(7)
    results: list = [None] * 6

    def stream(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 400, "ignore_eos": True, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 2:  # streaming: wait for the others, then for SIGTERM's effects
                            started.wait(60)
        finally:
            results[i] = lines

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        started.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        for t in threads:
            t.join(30)
        assert s.proc.wait(30) == 0, s.log.read_text()[-2000:]
    finally:
        s.stop()
    for lines in results:
        assert lines[-1] == "data: [DONE]" and "shutting down" in json.loads(lines[-2][6:])["error"]["message"], lines[-3:]
    assert "Traceback" not in s.log.read_text()
