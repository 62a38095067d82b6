"""`portllm serve` under load: batched across patches vs a naive one-request-at-a-time server, in one run.

Both servers are real processes behind the same OpenAI-compatible app and are driven over HTTP by the
same closed-loop clients (each sends a request, waits for the answer, sends the next): by default 16
clients over 4 patches (client i asks for patch i mod 4), greedy, `max_tokens` generated tokens per
request (`ignore_eos`, so both servers do the same work). The naive server takes one request at a time,
swaps the active adapter (PEFT's `set_adapter`) and runs transformers' `generate`; portllm's batches
every waiting request into shared forward passes, each row with its own patch. Reported: generated
tokens/s, p50/p95 latency, and the ratio (goal: portllm >= 3x naive). The servers run one after the
other, never together.

portllm's server runs as it would on a network: an API key (`--api-key`, a fresh one per run), the default
body limit (1 MiB) and runtime loading off; before measuring, the script checks that it answers 401 without
the key, 413 for an oversized body and 403 to a runtime load. Every client sends `Authorization: Bearer`
(the naive server has no keys and ignores it), so the two servers see the same requests.

A second case, long prompts: `--long-clients` clients send `--long-prompt-tokens`-token prompts (token ids,
so the length is exact) for `--long-max-tokens` tokens, streamed, to time the first token (TTFT p50/p95)
beside tokens/s. The naive server sends its whole answer at the end (transformers' `generate`), so its TTFT
is its latency.

With --soak-minutes M, portllm's server then runs M minutes at steady load, with a client that also
sends bad requests (unknown model, malformed JSON, bad parameter: 4xx; a wrong API key: 401): failed
requests are counted and the server's resident memory (RSS) is sampled to show it stays flat.

--quick: a smoke size that proves the script works end to end in a minute or two (2 clients, 8 tokens,
64-token long prompts; writes under .cache/serve_load/ unless --out is given).

The GPU serving check: `--device cuda --skip-naive --against docs/benchmarks/serve_load.json` with the CPU run's
sizes measures portllm's server on the GPU and prints it beside the CPU run (tokens/s, p95 latency, TTFT p95, and
the speed-up of each); a run whose work differs from the CPU run's is refused.

    python benchmarks/serve_load.py --base smollm2-135m --patches DIR1,DIR2,DIR3,DIR4 [--soak-minutes 10]
    python benchmarks/serve_load.py --base smollm2-135m        # makes 4 random rank-8 patches (cached)
    python benchmarks/serve_load.py --quick
    python benchmarks/serve_load.py --device cuda --skip-naive --against docs/benchmarks/serve_load.json \
        --long-clients 8 --long-requests-per-client 1 --out docs/benchmarks/serve_load_gpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import secrets
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short review of a film you liked.",
    "Question: Is the sky blue on a clear day? Answer:",
    "The three most important things to know about photosynthesis are",
    "Translate to French: The cat sleeps on the warm windowsill.",
    "Here is a recipe for a quick tomato soup:",
    "Summarize: The meeting was moved to Thursday because the room was booked.",
    "def fibonacci(n):",
    "Once upon a time, in a village by the sea,",
]
QUICK = {  # --quick: the smoke size (explicit options still win)
    "clients": 2,
    "requests_per_client": 1,
    "max_tokens": 8,
    "long_clients": 2,
    "long_requests_per_client": 1,
    "long_prompt_tokens": 64,
    "long_max_tokens": 8,
    "out": ROOT / ".cache" / "serve_load" / "quick",
}


def long_prompts(base: str, n_tokens: int, count: int) -> list[list[int]]:
    """`count` different prompts of exactly `n_tokens` token ids (PROMPTS, rotated, repeated), so both servers
    prefill the same lengths whatever the tokenizer does with text."""
    from transformers import AutoTokenizer

    from portllm.models import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base(base))
    out = []
    for j in range(count):
        sentences = PROMPTS[j % len(PROMPTS) :] + PROMPTS[: j % len(PROMPTS)]
        ids: list[int] = []
        while len(ids) < n_tokens:
            ids += tok(" ".join(sentences) + "\n", add_special_tokens=False)["input_ids"]
        out.append(ids[:n_tokens])
    return out


# ---------------------------------------------------------------- patches


def make_patches(base: str, n: int, out: Path) -> list[Path]:
    """n random rank-8 LoRA patches on every linear projection (non-zero B, so each changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from portllm import import_adapter, load_base

    paths = [out / f"p{i}" for i in range(n)]
    if all((p / "portllm.json").is_file() for p in paths):
        return paths
    for i, p in enumerate(paths):
        if (p / "portllm.json").is_file():
            continue
        model, _ = load_base(base)
        torch.manual_seed(i)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        pm = get_peft_model(model, cfg)
        pm.save_pretrained(out / f"adapter{i}")
        import_adapter(out / f"adapter{i}", base, p, task=f"random{i}", overwrite=True)
    return paths


# ---------------------------------------------------------------- the naive server


def naive_engine_class():
    """Engine's queue and HTTP app, but one request at a time: set_adapter, then transformers' generate."""
    import torch

    from portllm.serve import BASE, Engine, Event, Scheduler

    class NaiveScheduler(Scheduler):
        def work(self) -> None:
            with torch.inference_mode():
                while not self.stopping:
                    try:
                        s = self.queue.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    with self.registry.model_lock:
                        try:
                            self._one(s)
                        except Exception as e:
                            self.finish(s, Event(finish_reason="error", error=f"{e.__class__.__name__}: {e}"))

        def _one(self, s: Any) -> None:
            model = self.registry.model
            if s.cancelled:
                self.finish(s, Event(finish_reason="cancelled"))
                return
            p = s.request.params
            ids = torch.tensor([s.request.prompt_ids])
            if s.adapter == BASE:
                ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
            else:
                model.set_adapter(s.adapter)
                ctx = nullcontext()
            sampling = {"do_sample": False}
            if p.temperature > 0:
                sampling = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p}
            with ctx:
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=p.max_tokens,
                    min_new_tokens=p.max_tokens if p.ignore_eos else 0,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            new = out[0, ids.shape[1] :].tolist()
            kept = [t for t in new if t not in self.eos]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            reason = "length" if len(new) >= p.max_tokens and len(kept) == len(new) else "stop"
            self.stats["completion_tokens"] += len(new)
            self.finish(s, Event(text, tuple(new), reason, len(s.request.prompt_ids), len(new)))

    class NaiveEngine(Engine):
        scheduler_class = NaiveScheduler

    return NaiveEngine


def run_naive_server(args: argparse.Namespace) -> None:
    """The naive server process (this script with --naive-server)."""
    import uvicorn

    from portllm.cli.serving import listen_socket
    from portllm.serve import EngineConfig, create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    patches = {f"p{i}": p for i, p in enumerate(args.patches.split(","))}
    eng = naive_engine_class()(args.base, patches, EngineConfig(max_batch=1, max_queue=args.max_queue), name=args.base)
    sock = listen_socket("127.0.0.1", 0)
    print(f"serving {args.base} on http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(eng), log_level="warning", access_log=False)).run(sockets=[sock])


# ---------------------------------------------------------------- driving a server


class Server:
    """A server process: started, its URL read from its first line, stopped at the end."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = open(log, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)
        self.url = ""
        self.line = ""  # the start-up line (portllm's says how many API keys and whether runtime loading is on)
        for line in self.proc.stdout:
            if "serving" in line and " on " in line:
                self.url = line.split(" on ", 1)[1].split()[0]
                self.line = line.strip()
                break
        if not self.url:
            raise SystemExit(f"server did not start: {' '.join(cmd)}; see {log}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass(frozen=True)
class Workload:
    """What the clients of one case send: prompts (texts or token ids) taken in turn, and how much to generate."""

    prompts: list[Any]
    max_tokens: int
    stream: bool = False  # streamed: the first token's arrival is timed


@dataclass(frozen=True)
class Reply:
    status: int
    latency_s: float
    ttft_s: float | None = None  # streamed requests only
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def one_request(http: Any, url: str, body: dict[str, Any]) -> Reply:
    """One completion; streamed ones are timed to their first text chunk and counted by their usage chunk."""
    t = time.perf_counter()
    if not body.get("stream"):
        r = await http.post(url + "/completions", json=body)
        dt = time.perf_counter() - t
        if r.status_code != 200:
            return Reply(r.status_code, dt)
        usage = r.json()["usage"]
        return Reply(200, dt, None, usage["prompt_tokens"], usage["completion_tokens"])
    first = None
    usage = None
    async with http.stream("POST", url + "/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Reply(r.status_code, time.perf_counter() - t)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error'].get('message')}")
            if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                first = time.perf_counter() - t
            usage = chunk.get("usage") or usage
    dt = time.perf_counter() - t
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk (stream_options.include_usage)")
    return Reply(200, dt, first, usage["prompt_tokens"], usage["completion_tokens"])


async def load(
    url: str, models: list[str], clients: int, per_client: int | None, seconds: float | None, work: Workload, args
) -> dict:
    """Closed-loop clients; stops after per_client requests each, or after `seconds`."""
    import httpx

    replies: list[Reply] = []
    failed = 0
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds if seconds else None
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=args.auth) as http:

        async def client(i: int) -> None:
            nonlocal failed
            k = 0
            while (per_client is None or k < per_client) and (stop_at is None or time.perf_counter() < stop_at):
                body = {
                    "model": models[i % len(models)],
                    "prompt": work.prompts[(i + k) % len(work.prompts)],
                    "max_tokens": work.max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                if work.stream:
                    body.update(stream=True, stream_options={"include_usage": True})
                try:
                    reply = await one_request(http, url, body)
                except Exception as e:  # a dropped connection, a timeout or an error mid-stream is a failed request
                    failed += 1
                    errors.append(f"{e.__class__.__name__}: {e}"[:200])
                else:
                    if reply.status == 200:
                        replies.append(reply)
                    else:
                        failed += 1
                        errors.append(f"HTTP {reply.status}")
                k += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in replies)
    lat = [r.latency_s for r in replies]
    res = {
        "requests": len(replies),
        "failed": failed,
        "errors": errors[:10],
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "p50_latency_s": round(percentile(lat, 50), 3),
        "p95_latency_s": round(percentile(lat, 95), 3),
    }
    if work.stream:
        ttft = [r.ttft_s for r in replies if r.ttft_s is not None]
        res["prompt_tokens"] = sorted({r.prompt_tokens for r in replies})  # as the server counted them
        res["p50_ttft_s"] = round(percentile(ttft, 50), 3)
        res["p95_ttft_s"] = round(percentile(ttft, 95), 3)
    return res


async def check_security(url: str, auth: dict[str, str]) -> dict:
    """portllm's server must refuse a client without the key or with a wrong one (401), a body over the default
    limit (413) and a runtime load (403), and answer the key (200): else the run measures the wrong server."""
    import httpx

    from portllm.serve.security import DEFAULT_MAX_BODY_BYTES

    async with httpx.AsyncClient(timeout=60) as http:
        got = {
            "no_key": (await http.get(url + "/models")).status_code,
            "wrong_key": (await http.get(url + "/models", headers={"Authorization": "Bearer wrong"})).status_code,
            "with_key": (await http.get(url + "/models", headers=auth)).status_code,
        }
        got["oversized_body"] = await oversized_status(url, auth, DEFAULT_MAX_BODY_BYTES + 1)
        lora = {"lora_name": "x", "lora_path": str(ROOT)}
        got["runtime_load"] = (await http.post(url + "/load_lora_adapter", json=lora, headers=auth)).status_code
    want = {"no_key": 401, "wrong_key": 401, "with_key": 200, "oversized_body": 413, "runtime_load": 403}
    if got != want:
        raise SystemExit(f"portllm's server is not running with authentication and limits on: {got} (want {want})")
    return {"api_key": True, "max_body_bytes": DEFAULT_MAX_BODY_BYTES, "runtime_loading": False, "checked": got}


async def oversized_status(url: str, auth: dict[str, str], length: int) -> int:
    """The status a completion announcing a `length`-byte body gets before any of it is sent (the limit is
    applied from Content-Length; a client like httpx, still writing the body, would see the connection close)."""
    import httpx

    u = httpx.URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    head = (
        f"POST {u.path}/completions HTTP/1.1\r\nHost: {u.host}\r\nAuthorization: {auth['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    try:
        writer.write(head.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 60)
    finally:
        writer.close()
    return int(status_line.split()[1])


async def bad_requests(url: str, stop_at: float, auth: dict[str, str]) -> dict:
    """Every second: an unknown model, malformed JSON, a bad parameter (each must be answered 4xx), and a wrong
    API key (401)."""
    import httpx

    sent = wrong = 0
    async with httpx.AsyncClient(timeout=60, headers=auth) as http:
        while time.perf_counter() < stop_at:
            for kind in ("unknown", "json", "param", "key"):
                try:
                    if kind == "json":
                        r = await http.post(url + "/completions", content=b"{no", headers={"content-type": "x"})
                    else:
                        body = {"model": "nosuch" if kind == "unknown" else "p0", "prompt": "x", "max_tokens": 2}
                        if kind == "param":
                            body["temperature"] = 9
                        headers = {"Authorization": "Bearer not-the-key"} if kind == "key" else None
                        r = await http.post(url + "/completions", json=body, headers=headers)
                    expected = (401,) if kind == "key" else (400, 404)
                    ok = r.status_code in expected and "error" in r.json()
                except Exception:
                    ok = False
                sent += 1
                wrong += not ok
            await asyncio.sleep(1)
    return {"bad_requests_sent": sent, "bad_requests_mishandled": wrong}


async def soak(server: Server, models: list[str], work: Workload, args) -> dict:
    seconds = args.soak_minutes * 60
    stop_at = time.perf_counter() + seconds
    rss: list[tuple[float, float]] = []

    async def sample() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() < stop_at:
            rss.append((round(time.perf_counter() - t0, 1), round(server.rss_mb(), 1)))
            await asyncio.sleep(args.rss_every)

    res, bad, _ = await asyncio.gather(
        load(server.url, models, args.soak_clients, None, seconds, work, args),
        bad_requests(server.url, stop_at, args.auth),
        sample(),
    )
    values = [m for _, m in rss]
    tenth = max(1, len(values) // 10)
    after_warmup, last = values[tenth : 2 * tenth] or values[:1], values[-tenth:]
    res.update(bad)
    res.update(
        {
            "minutes": args.soak_minutes,
            "clients": args.soak_clients,
            "rss_mb_first": values[0] if values else None,
            "rss_mb_max": max(values) if values else None,
            "rss_mb_last": values[-1] if values else None,
            # flat: the last tenth of the run against the second tenth (after warm-up), medians
            "rss_mb_growth_after_warmup": round(percentile(last, 50) - percentile(after_warmup, 50), 1)
            if values
            else None,
            "rss_samples": rss,
        }
    )
    return res


# ---------------------------------------------------------------- report


def ratio(case: dict) -> float | None:
    """portllm's tokens/s over the naive server's (None without a naive run)."""
    if "naive" not in case:
        return None
    return round(case["portllm"]["tokens_per_s"] / max(case["naive"]["tokens_per_s"], 1e-9), 2)


def table(res: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140, record=True)
    t = Table(title=f"serve load: {res['clients']} clients over {res['n_patches']} patches, {res['base']}")
    for c in ("server", "requests", "failed", "tokens/s", "p50 latency (s)", "p95 latency (s)", "wall (s)"):
        t.add_column(c, justify="right" if c != "server" else "left")
    for name in ("naive", "portllm"):
        r = res[name]
        t.add_row(
            name,
            str(r["requests"]),
            str(r["failed"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['p50_latency_s']:.2f}",
            f"{r['p95_latency_s']:.2f}",
            f"{r['wall_s']:.1f}",
        )
    console.print(t)
    met = "met" if res["goal_3x_met"] else "NOT met"
    console.print(f"throughput ratio portllm / naive: {res['throughput_ratio']:.2f}x (goal >= 3x: {met})")
    sec = res["security"]
    console.print(
        f"portllm's server: API key on, body limit {sec['max_body_bytes']} bytes, runtime loading off "
        f"(checked: {', '.join(f'{k} {v}' for k, v in sec['checked'].items())})"
    )
    lp = res["long_prompt"]
    t = Table(
        title=f"long prompts: {lp['clients']} clients x {lp['requests_per_client']} requests, "
        f"{lp['prompt_tokens']}-token prompts, {lp['max_tokens']} tokens generated, streamed"
    )
    cols = ("server", "requests", "failed", "tokens/s", "TTFT p50 (s)", "TTFT p95 (s)", "p50 latency (s)")
    for c in (*cols, "p95 latency (s)", "wall (s)"):
        t.add_column(c, justify="right" if c != "server" else "left")
    for name in ("naive", "portllm"):
        r = lp[name]
        t.add_row(
            name,
            str(r["requests"]),
            str(r["failed"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['p50_ttft_s']:.2f}",
            f"{r['p95_ttft_s']:.2f}",
            f"{r['p50_latency_s']:.2f}",
            f"{r['p95_latency_s']:.2f}",
            f"{r['wall_s']:.1f}",
        )
    console.print(t)
    console.print(
        f"long prompts: throughput ratio portllm / naive {lp['throughput_ratio']:.2f}x "
        "(the naive server answers at the end: its TTFT is its latency)"
    )
    if res.get("soak"):
        s = res["soak"]
        console.print(
            f"soak {s['minutes']} min, {s['clients']} clients: {s['requests']} requests, {s['failed']} failed, "
            f"{s['tokens_per_s']:.1f} tokens/s; bad requests {s['bad_requests_sent']} sent, "
            f"{s['bad_requests_mishandled']} mishandled; RSS {s['rss_mb_first']} -> {s['rss_mb_last']} MB "
            f"(max {s['rss_mb_max']}, growth after warm-up {s['rss_mb_growth_after_warmup']} MB)"
        )
    return console.export_text()


def device_table(res: dict, against: dict, against_path: Path) -> str:
    """The GPU serving check (issue 20): this run's portllm server beside a CPU run's (tokens/s, p95 latency and, for
    the long prompts, p95 time to first token), both cases. The two runs must have sent the same work."""
    from rich.console import Console
    from rich.table import Table

    for key in ("clients", "requests_per_client", "max_tokens", "n_patches"):
        if res[key] != against[key]:
            raise SystemExit(f"--against {against_path}: {key} {against[key]} there, {res[key]} here: same work only")
    lp, cp = res["long_prompt"], against["long_prompt"]
    for key in ("clients", "requests_per_client", "prompt_tokens", "max_tokens"):
        if lp[key] != cp[key]:
            raise SystemExit(f"--against {against_path}: long-prompt {key} {cp[key]} there, {lp[key]} here")
    here, there = f"{res['device']} {res['dtype']}", f"{against.get('device', 'cpu')} {against.get('dtype', 'auto')}"
    console = Console(width=140, record=True)
    t = Table(title=f"portllm serve on {here} against {there} ({against_path.name}, {against['date']})")
    for c in ("case", "run", "tokens/s", "p95 latency (s)", "TTFT p95 (s)"):
        t.add_column(c, justify="left" if c in ("case", "run") else "right")
    cases = (("main", res["portllm"], against["portllm"]), ("long prompts", lp["portllm"], cp["portllm"]))
    for case, mine, theirs in cases:
        for run, r in ((there, theirs), (here, mine)):
            ttft = "" if r.get("p95_ttft_s") is None else f"{r['p95_ttft_s']:.2f}"
            t.add_row(case, run, f"{r['tokens_per_s']:.1f}", f"{r['p95_latency_s']:.2f}", ttft)
        speed = mine["tokens_per_s"] / max(theirs["tokens_per_s"], 1e-9)
        p95 = theirs["p95_latency_s"] / max(mine["p95_latency_s"], 1e-9)
        t.add_row(case, "speed-up (>1: faster here)", f"{speed:.2f}x", f"{p95:.2f}x", "")
    console.print(t)
    return console.export_text()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--patches", default=None, help="comma-separated patch directories (default: 4 random ones)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--long-clients", type=int, default=8, help="the long-prompt case's clients")
    ap.add_argument("--long-requests-per-client", type=int, default=1)
    ap.add_argument("--long-prompt-tokens", type=int, default=512)
    ap.add_argument("--long-max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each server")
    ap.add_argument(
        "--device", default="cpu", help="portllm's server: --device (the GPU serving check: cuda, against a cpu run)"
    )
    ap.add_argument("--dtype", default=None, help="portllm's server: --dtype (default: auto for --device)")
    ap.add_argument(
        "--against",
        type=Path,
        default=None,
        help="a CPU run's JSON (docs/benchmarks/serve_load.json): the GPU check's table of tokens/s and p95 against it",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="client timeout per request (s)")
    ap.add_argument("--skip-naive", action="store_true", help="measure portllm's server only")
    ap.add_argument("--soak-minutes", type=float, default=0)
    ap.add_argument("--soak-clients", type=int, default=16)
    ap.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples in the soak")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/serve_load", help="writes OUT.json, OUT.txt")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "serve_load")
    ap.add_argument("--quick", action="store_true", help="smoke size: 2 clients, 8 tokens, 64-token long prompts")
    ap.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    if ap.parse_known_args()[0].quick:
        ap.set_defaults(**QUICK)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.naive_server:
        run_naive_server(args)
        return
    against = json.loads(args.against.read_text()) if args.against else None  # unreadable: fail before measuring

    args.work.mkdir(parents=True, exist_ok=True)
    if args.patches:
        patches = [Path(p) for p in args.patches.split(",")]
    else:
        print("making 4 random rank-8 patches ...", flush=True)
        patches = make_patches(args.base, 4, args.work / "random-patches")
    names = [f"p{i}" for i in range(len(patches))]
    key = secrets.token_urlsafe(24)  # this run's API key: never written to the outputs
    args.auth = {"Authorization": f"Bearer {key}"}
    main_work = Workload(PROMPTS, args.max_tokens)
    long_work = Workload(long_prompts(args.base, args.long_prompt_tokens, len(PROMPTS)), args.long_max_tokens, True)
    common = ["--base", args.base, "--max-queue", str(args.max_queue)] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    res: dict[str, Any] = {
        "base": args.base,
        "patches": [str(p) for p in patches],
        "n_patches": len(patches),
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "device": args.device,
        "dtype": args.dtype or "auto",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    long_res: dict[str, Any] = {
        "clients": args.long_clients,
        "requests_per_client": args.long_requests_per_client,
        "prompt_tokens": args.long_prompt_tokens,
        "max_tokens": args.long_max_tokens,
    }

    def measure(label: str, cmd: list[str]) -> Server:
        print(f"starting the {label} server ...", flush=True)
        server = Server(cmd, args.work / f"{label}.log")
        try:
            if label == "portllm":
                res["security"] = asyncio.run(check_security(server.url, args.auth))
                res["security"]["server_line"] = server.line
            res[label], long_res[label] = measure_cases(server, label)
        except BaseException:  # a failed check or an interrupt: the server process must not outlive the script
            server.stop()
            raise
        return server

    def measure_cases(server: Server, label: str) -> tuple[dict, dict]:
        asyncio.run(load(server.url, names, len(names), 1, None, main_work, args))  # warm-up: one request per patch
        print(f"measuring {label}: {args.clients} clients x {args.requests_per_client} requests ...", flush=True)
        r = asyncio.run(load(server.url, names, args.clients, args.requests_per_client, None, main_work, args))
        r["server_rss_mb"] = round(server.rss_mb(), 1)
        print(f"  {label}: {r['tokens_per_s']} tokens/s, p50 {r['p50_latency_s']} s, p95 {r['p95_latency_s']} s")
        warm = Workload(long_work.prompts[-1:], 2, True)  # the long shapes once, outside the measurement
        asyncio.run(load(server.url, names, 1, 1, None, warm, args))
        per = args.long_requests_per_client
        print(f"measuring {label}, long prompts: {args.long_clients} clients x {per} requests ...", flush=True)
        lr = asyncio.run(load(server.url, names, args.long_clients, per, None, long_work, args))
        lr["server_rss_mb"] = round(server.rss_mb(), 1)
        print(f"  {label}: {lr['tokens_per_s']} tokens/s, TTFT p50 {lr['p50_ttft_s']} s, p95 {lr['p95_ttft_s']} s")
        return r, lr

    if not args.skip_naive:
        naive_cmd = [sys.executable, str(Path(__file__).resolve()), "--naive-server", "--patches"]
        naive_cmd += [",".join(map(str, patches)), *common]
        measure("naive", naive_cmd).stop()
    serve_cmd = [sys.executable, "-m", "portllm.cli", "serve", "--port", "0", "--max-batch", str(args.max_batch)]
    serve_cmd += [*common, "--api-key", key, *(f"--patch={n}={p}" for n, p in zip(names, patches))]
    serve_cmd += ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    server = measure("portllm", serve_cmd)
    try:
        if args.soak_minutes > 0:
            print(f"soak: {args.soak_minutes} min at {args.soak_clients} clients ...", flush=True)
            res["soak"] = asyncio.run(soak(server, names, main_work, args))
    finally:
        server.stop()
    res["throughput_ratio"] = ratio(res)
    res["goal_3x_met"] = None if res["throughput_ratio"] is None else res["throughput_ratio"] >= 3
    long_res["throughput_ratio"] = ratio(long_res)
    res["long_prompt"] = long_res
    text = table(res) if "naive" in res else json.dumps({"portllm": res["portllm"], "long_prompt": long_res}, indent=2)
    if against is not None:
        text += "\n" + device_table(res, against, args.against)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".txt").write_text(text)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
