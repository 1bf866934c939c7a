"""Real OpenAI-API clients against a live `llama-kernels serve` (issue #19), with one JSON summary.

- lm-evaluation-harness, `--model local-completions`, with tokenized_requests=True (token-id prompts)
  and False (text prompts), one prompt per request, and tokenized with --batch_size 8 (lists of prompts):
  a loglikelihood (multiple-choice) task and a generate_until task on a small local JSONL
  (benchmarks/clients/lm_eval_task); a few items' loglikelihoods are checked against our own
  `LLM.logits`, and every mode must score the same.
- guidellm: streamed synthetic load (prompt_tokens=64, output_tokens=32), synchronous on
  /v1/chat/completions and concurrent on /v1/completions; TTFT and inter-token latency must be reported
  (the streamed path with stream_options.continuous_usage_stats) and no request may fail.

Each client row: client, version, command, result (accuracy / TTFT / ITL), ok. The server is started
with this Python (the default SmolLM2 model unless --model); the clients may live in another
environment (--clients-bin), which keeps lm-eval's and guidellm's pins out of the project's:

    python -m venv clients && clients/bin/pip install torch "lm-eval[api]" transformers guidellm
    python benchmarks/bench_clients.py --clients-bin clients/bin --out clients.json

No network: lm-eval and guidellm get a Hugging Face tokenizer folder built here from the model's own
tokenizer (transformers needed here), the task data is in the repository, guidellm's data is synthetic.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from common import write_json  # noqa: E402
from optional import require  # noqa: E402

TASK_DIR = REPO / "benchmarks" / "clients" / "lm_eval_task"
MC_TASK, GEN_TASK = "lk_capitals", "lk_capitals_gen"
# client name, its executable, its distribution (for the version), how to install it
CLIENTS = {"lm-eval": ("lm_eval", "lm_eval", 'pip install "lm-eval[api]" transformers'),
           "guidellm": ("guidellm", "guidellm", "pip install guidellm")}  # fmt: skip
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the summary as JSON to this file")
    p.add_argument("--clients", default="lm-eval,guidellm", help="which clients to run (comma-separated)")
    p.add_argument("--clients-bin", default=None, help="folder of the clients' executables (default: PATH)")
    p.add_argument("--model", default=None, help="the server's model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval items per task (default: all 30)")
    p.add_argument("--requests", type=int, default=8, help="guidellm requests per benchmark")
    p.add_argument("--check-items", type=int, default=2, help="lm-eval items whose loglikelihoods are "
                   "recomputed with LLM.logits (0: none)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900, help="seconds per client run at most")
    args = p.parse_args(argv)
    unknown = sorted(set(args.clients.split(",")) - set(CLIENTS))
    if unknown:
        p.error(f"--clients={args.clients!r}: unknown {unknown}; expected some of {sorted(CLIENTS)}")
    return args


def find_client(name: str, bin_dir: str | None) -> str | None:
    """The client's executable, or None after one line saying how to install it."""
    exe, _, install = CLIENTS[name]
    found = shutil.which(exe, path=bin_dir) if bin_dir else shutil.which(exe)
    if found is None:
        where = f"in {bin_dir}" if bin_dir else "on PATH"
        print(f"bench_clients.py: {name}: no {exe!r} {where}: {install} (or pass --clients-bin)", file=sys.stderr)
    return found


def client_version(exe: str, dist: str) -> str:
    """The distribution's version in the executable's own environment (its bin/python)."""
    python = Path(exe).parent / "python"
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    done = subprocess.run([str(python) if python.exists() else sys.executable, "-c", code], capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip() or "unknown"


def tokenizer_dir(model: str | None, dest: Path):
    """A Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json) of the model's tokenizer,
    for clients that tokenize locally; returns our Tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from llama_kernels.loader import open_checkpoint

    tok = open_checkpoint(model).tokenizer
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                 chat_template=tok.chat_template, add_bos_token=tok.add_bos)  # fmt: skip
    hf.save_pretrained(str(dest))
    return tok


class Server:
    """`python -m llama_kernels serve --port 0` until its ready line; stop() ends it."""

    def __init__(self, model: str | None, log: Path) -> None:
        self.cmd = [sys.executable, "-m", "llama_kernels", "serve", "--port", "0", *([model] if model else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line, deadline = "", time.monotonic() + 300
        while "serving" not in line:
            line = self.proc.stdout.readline()
            if (not line and self.proc.poll() is not None) or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"bench_clients.py: error: the server did not start: {log.read_text()[-2000:]}")
        self.model, self.url = line.split()[1], line.split(" on ")[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def shown(cmd: list[str], paths: dict[Path, str]) -> str:
    """`cmd` as one line for the summary: the executable by name, this run's folders by placeholders."""
    line = " ".join([Path(cmd[0]).name, *cmd[1:]])
    for path, name in paths.items():
        line = line.replace(str(path), name)
    return line


def run(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    """(exit status, seconds) of `cmd` run from the repository root offline, its output into `log`."""
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE},
                                timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


def lm_eval_rows(exe: str, server: Server, tok_dir: Path, args, work: Path, tok) -> list[dict]:
    version = client_version(exe, CLIENTS["lm-eval"][1])
    rows, scores = [], {}
    # batch_size 8: lists of prompts (token-id lists, or strings) in one request
    for tokenized, batch in ((True, 1), (False, 1), (True, 8)):
        out = work / f"lm_eval_tokenized_{tokenized}_batch_{batch}"
        model_args = (f"model={server.model},base_url={server.url}/v1/completions,tokenizer={tok_dir},"
                      f"tokenizer_backend=huggingface,tokenized_requests={tokenized},max_retries=1")  # fmt: skip
        cmd = [exe, "--model", "local-completions", "--model_args", model_args, "--include_path",
               str(TASK_DIR.relative_to(REPO)), "--tasks", f"{MC_TASK},{GEN_TASK}", "--output_path", str(out),
               "--batch_size", str(batch), "--log_samples", *(["--limit", str(args.limit)] if args.limit else [])]
        rc, seconds = run(cmd, args.timeout, work / f"{out.name}.log")
        row = {"client": "lm-eval", "version": version, "mode": f"tokenized_requests={tokenized} batch_size={batch}",
               "command": shown(cmd, {tok_dir: "<tokenizer dir>", out: "<out dir>"}), "seconds": round(seconds, 1)}
        if rc != 0:
            rows.append({**row, "ok": False, "error": f"exit status {rc}: see {work}/{out.name}.log"})
            continue
        results = json.loads(Path(sorted(glob.glob(f"{out}/**/results_*.json", recursive=True))[-1]).read_text())
        res = results["results"]
        result = {"items": results["n-samples"][MC_TASK]["effective"], "acc": res[MC_TASK]["acc,none"],
                  "acc_norm": res[MC_TASK]["acc_norm,none"], "gen_exact_match": res[GEN_TASK]["exact_match,none"],
                  "chance": 0.25}  # fmt: skip
        samples = glob.glob(f"{out}/**/samples_{MC_TASK}_2*.jsonl", recursive=True)[-1]  # _<date>, not _gen_
        scores[tokenized, batch] = [json.loads(line) for line in open(samples)]
        row["scored"] = (tokenized, batch)
        # above chance on easy items: a server that scored the wrong tokens lands near 0.25
        ok = result["acc"] >= 0.6 and result["gen_exact_match"] >= 0.6
        rows.append({**row, "result": result, "ok": ok})
    first = scores.get((True, 1))
    for row in rows:  # text or token-id prompts, alone or batched: the same scores
        mode = row.pop("scored", None)
        if first is not None and mode is not None:
            diff = max(abs(float(a[0][0]) - float(b[0][0])) for x, y in zip(first, scores[mode], strict=True)
                       for a, b in zip(x["resps"], y["resps"], strict=True))  # fmt: skip
            row["result"]["max_loglik_diff_vs_tokenized_batch_1"] = diff
            row["ok"] = row["ok"] and diff < 1e-3  # float32 logits of differently composed batches
    if args.check_items and first is not None:
        diff = check_against_llm(first[: args.check_items], args.model, tok)
        for row in rows:
            if "result" in row:
                row["result"]["max_loglik_diff_vs_llm_logits"] = diff
                row["ok"] = row["ok"] and diff < 1e-3
    return rows


def check_against_llm(samples: list[dict], model: str | None, tok) -> float:
    """The largest |lm-eval's loglikelihood - ours| over the samples' choices, ours from LLM.logits of
    context + continuation, split into tokens as lm-eval does (the whole string's ids after the context's)."""
    from llama_kernels.llm import LLM

    llm = LLM.from_pretrained(model, max_context=512, progress=False)
    worst = 0.0
    for sample in samples:
        for arg, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = arg["arg_0"], arg["arg_1"]
            ctx, whole = tok.encode(context), tok.encode(context + continuation)
            logp = llm.logits(whole).double().log_softmax(-1)
            ours = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            worst = max(worst, abs(ours - float(resp[0][0])))
    return worst


def guidellm_rows(exe: str, server: Server, tok_dir: Path, args, work: Path) -> list[dict]:
    version = client_version(exe, CLIENTS["guidellm"][1])
    rows = []
    runs = (("kind=synchronous", "/v1/chat/completions"), ("kind=concurrent,streams=4", "/v1/completions"))
    for profile, endpoint in runs:
        out = work / f"guidellm_{len(rows)}.json"
        cmd = [exe, "run", "--backend", f"kind=openai_http,target={server.url},model={server.model},"
               f"request_format={endpoint}", "--profile", profile, "--constraint",
               f"kind=max_requests,count={args.requests}", "--tokenizer", f"kind=huggingface_auto,model={tok_dir}",
               "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=32", "--output",
               f"kind=json,path={out}", "--disable-console-interactive"]  # fmt: skip
        rc, seconds = run(cmd, args.timeout, work / f"guidellm_{len(rows)}.log")
        row = {"client": "guidellm", "version": version, "mode": f"{profile.split('=', 1)[1]} {endpoint}",
               "command": shown(cmd, {tok_dir: "<tokenizer dir>", out: "<out.json>"}),
               "seconds": round(seconds, 1)}  # fmt: skip
        if rc != 0 or not out.exists():
            rows.append({**row, "ok": False, "error": f"exit status {rc}: see {work}/guidellm_{len(rows)}.log"})
            continue
        m = json.loads(out.read_text())["benchmarks"][0]["metrics"]
        done = m["request_totals"]

        def ms(name: str, stat: str = "median") -> float | None:
            s = m[name]["successful"]
            return round(s[stat], 1) if s.get("count") else None

        result = {"requests_ok": done["successful"], "requests_errored": done["errored"],
                  "ttft_ms_p50": ms("time_to_first_token_ms"),
                  "ttft_ms_p95": round(m["time_to_first_token_ms"]["successful"]["percentiles"]["p95"], 1),
                  "itl_ms_p50": ms("inter_token_latency_ms"), "tpot_ms_p50": ms("time_per_output_token_ms"),
                  "output_tokens_per_s": round(m["output_tokens_per_second"]["successful"]["mean"], 1),
                  "output_tokens_per_request": ms("output_token_count")}  # fmt: skip
        ok = (done["successful"] == args.requests and done["errored"] == 0 and result["ttft_ms_p50"]
              and result["itl_ms_p50"] and result["output_tokens_per_request"] == 32)  # fmt: skip
        rows.append({**row, "result": result, "ok": bool(ok)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = args.clients.split(",")
    exes = {name: find_client(name, args.clients_bin) for name in wanted}
    if not any(exes.values()):
        return 1  # nothing to run: each missing client has had its line
    require("transformers", "test", "bench_clients.py")  # the tokenizer folder for the clients
    rows = [{"client": n, "ok": None, "skipped": f"not installed: {CLIENTS[n][2]}"} for n, e in exes.items() if not e]
    load = os.getloadavg()[0]  # the machine's load at the start (timings are noisy on a shared machine)
    work = Path(tempfile.mkdtemp(prefix="bench_clients_"))
    tok = tokenizer_dir(args.model, work / "tokenizer")
    server = Server(args.model, work / "server.log")
    try:
        if exes.get("lm-eval"):
            rows += lm_eval_rows(exes["lm-eval"], server, work / "tokenizer", args, work, tok)
        if exes.get("guidellm"):
            rows += guidellm_rows(exes["guidellm"], server, work / "tokenizer", args, work)
    finally:
        server.stop()
    for r in rows:
        print(json.dumps(r))
    print(f"# logs in {work}")
    if args.out:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        write_json(args.out, {"benchmark": "bench_clients", "date": datetime.date.today().isoformat(),
                              "machine": machine, "load_average_at_start": round(load, 2),
                              "server": " ".join(["python", *server.cmd[1:]]), "model": server.model,
                              "rows": rows})  # fmt: skip
        print(f"# wrote {args.out}")
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
