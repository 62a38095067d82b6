"""`portllm serve` on a tiny random model: a real server process driven by the official `openai` client,
the batching engine in process (mixed batches equal requests run alone), and the vLLM export."""

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import tiny
from conftest import require_module
from portllm import import_adapter
from portllm.serve import GenRequest, SamplingParams

openai = require_module("openai")
httpx = require_module("httpx")
require_module("fastapi")

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
PROMPTS = [
    "The movie was great and the actors",
    "Question: Is this sentence positive or negative?\nAnswer:",
    "Sarah was a much better surgeon than Maria so",
    "Janet has 16 eggs",
]
GREEDY = {"temperature": 0, "max_tokens": 8}


def _with_template(d, template=TEMPLATE):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = template
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sw(tmp_path_factory):
    """A tiny base with a chat template, two patches on it, one made on the same weights under another chat
    template (loads with a warning), one made on a wider base (incompatible)."""
    import shutil

    root = tmp_path_factory.mktemp("serve")
    base = _with_template(tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=48, layers=2))
    other = root / "other-template"
    shutil.copytree(base, other)
    _with_template(other, TEMPLATE.replace("assistant", "bot"))
    wide = tiny.make_base(root / "wide", bpe=True, vocab_size=320, hidden=64, layers=2)
    out = {"root": root, "base": base}
    for name, on, seed in (("a", base, 1), ("b", base, 2), ("c", base, 3), ("warn", other, 4), ("bad", wide, 5)):
        import_adapter(tiny.make_adapter(on, root / f"adapter-{name}", seed=seed), on, root / name, task=name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def reference(sw):
    """The library's own greedy generation (`evaluate.generate`) with each patch: what the server must say."""
    from portllm.eval import generate, open_lm

    cache = {}

    def ref(patch, prompts, max_new_tokens=8):
        key = (patch, tuple(prompts), max_new_tokens)
        if key not in cache:
            lm = open_lm(sw["base"], sw[patch] if patch else None)
            cache[key] = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=1)[0]
        return cache[key]

    return ref


def cli(*args, env=None, timeout=300):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "portllm.cli", *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout
    )


def one_line_error(r):
    assert r.returncode == 3, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def start_server(args, log_path, timeout=300):
    """`portllm serve ARGS --port 0` in its own process; returns it and its /v1 URL once /health answers."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "portllm.cli", "serve", *map(str, args), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    url = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "serving" in line:
            url = line.split(" on ", 1)[1].split()[0]
            break
    if url is None:
        proc.kill()
        raise AssertionError(f"server did not start: {open(log_path).read()[-2000:]}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its stdout drained
    for _ in range(100):
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(sw, tmp_path_factory):
    """The tiny base as `tiny`, patches a and b; yields the /v1 URL."""
    args = ["--base", sw["base"], "--served-name", "tiny", "--patch", f"a={sw['a']}", "--patch", f"b={sw['b']}"]
    loading = ["--allow-runtime-loading", "--patch-root", sw["root"]]  # opt-in (tests/test_serve_security.py)
    proc, url = start_server([*args, *loading, "--max-batch", "8"], tmp_path_factory.mktemp("log") / "serve.log")
    yield url
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


# ---------------------------------------------------------------- the server, as a client meets it


def test_health_and_model_listing(server, client):
    r = httpx.get(server.removesuffix("/v1") + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "a", "b"}  # no `auto`: no router configured
    assert models["a"].parent == "tiny" and models["a"].owned_by == "portllm"
    assert client.models.retrieve("b").id == "b"


def test_completions_equal_the_librarys_generation_per_patch(client, reference):
    for model, patch in (("tiny", None), ("a", "a"), ("b", "b")):
        want = reference(patch, PROMPTS)
        for prompt, expected in zip(PROMPTS, want):
            r = client.completions.create(model=model, prompt=prompt, **GREEDY)
            assert r.choices[0].text == expected, (model, prompt)
            assert r.object == "text_completion" and r.model == model
            assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    outs = {m: client.completions.create(model=m, prompt=PROMPTS[0], **GREEDY).choices[0].text for m in ("tiny", "a")}
    assert outs["tiny"] != outs["a"]  # the patch is really there


def test_chat_completion_uses_the_chat_template(sw, client, reference):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the movie good?"}]
    text = AutoTokenizer.from_pretrained(sw["base"]).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<s>assistant\n")
    r = client.chat.completions.create(model="a", messages=messages, **GREEDY)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.choices[0].message.content == reference("a", [text])[0]
    assert r.choices[0].finish_reason in ("stop", "length")
    parts = [{"type": "text", "text": "Is the movie "}, {"type": "text", "text": "good?"}]
    r2 = client.chat.completions.create(model="a", messages=[messages[0], {"role": "user", "content": parts}], **GREEDY)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_streaming_gives_the_same_text(client):
    whole = client.completions.create(model="b", prompt=PROMPTS[1], temperature=0, max_tokens=12)
    chunks = list(
        client.completions.create(
            model="b",
            prompt=PROMPTS[1],
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "Tell me about the movie."}]
    whole = client.chat.completions.create(model="a", messages=messages, temperature=0, max_tokens=12)
    chunks = list(
        client.chat.completions.create(model="a", messages=messages, temperature=0, max_tokens=12, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sampling_is_reproducible_with_a_seed(client):
    kw = {"model": "a", "prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0.9, "top_p": 0.95}
    one = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == one
    assert {client.completions.create(seed=s, **kw).choices[0].text for s in range(8)} != {one}


def test_errors_are_openai_shaped(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nosuch", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="auto", prompt="x", max_tokens=2)
    assert "router" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", max_tokens=2, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], logit_bias={"5": 1})
    for body in (b"{not json", b"[1, 2]", b'{"model": "a"}'):
        r = httpx.post(server + "/completions", content=body, headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 400 and set(err) == {"message", "type", "param", "code"}, r.text
        assert err["type"] == "invalid_request_error"
        if body == b"{not json":
            assert err["param"] is None and "could not parse" in err["message"]
    r = httpx.get(server + "/nosuch")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200  # still fine


def test_runtime_load_checks_every_patch(sw, server, client, reference):
    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "c", "lora_path": str(sw["c"])})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []
    assert "c" in {m.id for m in client.models.list().data}
    got = client.completions.create(model="c", prompt=PROMPTS[0], **GREEDY).choices[0].text
    assert got == reference("c", PROMPTS[:1])[0]
    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "c", "lora_path": str(sw["c"])})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]

    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(sw["bad"])})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "patch_incompatible" and "does not fit tiny: targets:" in err["message"]
    assert "bad" not in {m.id for m in client.models.list().data}

    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "warn", "lora_path": str(sw["warn"])})
    assert r.status_code == 200, r.text
    assert any("chat template" in w for w in r.json()["warnings"])
    assert client.completions.create(model="warn", prompt="x", max_tokens=2).choices[0].text is not None

    r = httpx.post(
        server + "/load_lora_adapter", json={"lora_name": "plain", "lora_path": str(sw["root"] / "adapter-c")}
    )
    assert r.status_code == 200 and "plain adapter" in r.json()["warnings"][0]  # no manifest: its base is unknown
    assert httpx.post(server + "/unload_lora_adapter", json={"lora_name": "plain"}).status_code == 200

    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "x", "lora_path": str(sw["root"] / "none")})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"  # as a path outside --patch-root

    for name in ("c", "warn"):
        r = httpx.post(server + "/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="x", max_tokens=2)
    assert httpx.post(server + "/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404


def test_concurrent_mixed_patch_requests_equal_sequential(client):
    jobs = [(m, p, 6 + i) for i, (m, p) in enumerate(zip(["tiny", "a", "b", "a", "b", "tiny", "a", "b"], PROMPTS * 2))]

    def run(job):
        m, p, n = job
        r = client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    sequential = [run(j) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, jobs))
    assert concurrent == sequential
    assert [n for _, n in concurrent] == [n for *_, n in jobs]  # ignore_eos: exactly max_tokens


# ---------------------------------------------------------------- the engine, in process


@pytest.fixture(scope="module")
def engine(sw):
    from portllm.serve import Engine, EngineConfig

    eng = Engine(sw["base"], {"a": sw["a"], "b": sw["b"]}, EngineConfig(max_batch=6, max_queue=4), name="tiny")
    yield eng.start()
    eng.stop()


GREEDY_PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _req(eng, prompt, patch, n=8, **kw):
    return GenRequest(eng.encode(prompt), patch, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw))


def test_engine_mixed_batches_equal_requests_alone(engine):
    """Staggered arrivals (newcomers merge into a running batch), different lengths, rows leaving early."""
    jobs = [(p, m, 4 + 3 * i % 9) for i, (p, m) in enumerate((p, m) for p in PROMPTS for m in (None, "a", "b"))]
    alone = [engine.submit(_req(engine, p, m, n)).result() for p, m, n in jobs]
    streams = []
    for i, (p, m, n) in enumerate(jobs):
        while engine.queued >= 3:  # the queue holds 4
            time.sleep(0.001)
        streams.append(engine.submit(_req(engine, p, m, n)))
        if i % 3 == 2:
            time.sleep(0.005)
    together = [s.result() for s in streams]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.completion_tokens for c in together] == [n for *_, n in jobs]
    assert engine.stats["max_rows"] > 1


def test_engine_queue_full_cancel_and_timeout(engine):
    from portllm.serve import Overloaded

    with engine.model_lock:  # the worker stalls at its next step
        first = engine.submit(_req(engine, PROMPTS[0], "a", n=30))
        while engine.queued:
            time.sleep(0.001)
        waiting = [engine.submit(_req(engine, PROMPTS[1], None)) for _ in range(4)]
        with pytest.raises(Overloaded) as e:
            engine.submit(_req(engine, PROMPTS[1], "b"))
        assert e.value.status == 429 and e.value.retry_after
        waiting[0].cancel()
        late = waiting[1]
        late.deadline = time.monotonic()  # out of time before it is admitted
    assert waiting[0].result().finish_reason == "cancelled"
    assert late.result().finish_reason == "timeout"
    assert [w.result().finish_reason for w in waiting[2:]] == ["length", "length"]
    assert first.result().completion_tokens == 30
    running = engine.submit(_req(engine, PROMPTS[2], "b", n=100))
    next(iter(running))  # it is in the batch
    running.cancel()
    done = running.result()
    assert done.finish_reason == "cancelled" and done.completion_tokens < 100
    assert engine.registry.refs("p2") == 0  # every request released its patch


def test_engine_stop_strings_are_never_streamed(engine):
    full = engine.submit(_req(engine, PROMPTS[0], "a", n=12)).result().text
    stop = full[4:7]
    assert stop and stop in full
    s = engine.submit(_req(engine, PROMPTS[0], "a", n=12, stop=(stop,)))
    pieces = [ev.text for ev in s]
    assert "".join(pieces) == full[: full.index(stop)]
    assert all(stop not in p for p in pieces)


def test_engine_unload_waits_for_running_requests(sw, engine):
    from portllm.serve import UnknownModel

    engine.load_patch("c", sw["c"])
    adapter = engine.patches["c"].adapter
    s = engine.submit(_req(engine, PROMPTS[0], "c", n=40))
    next(iter(s))
    engine.unload_patch("c")
    with pytest.raises(UnknownModel):
        engine.submit(_req(engine, PROMPTS[0], "c"))
    assert s.result().completion_tokens == 40  # finished with its patch
    for _ in range(100):
        if adapter not in engine.model.peft_config:
            break
        time.sleep(0.02)
    assert adapter not in engine.model.peft_config


def test_engine_routes_auto_through_the_router_seam(engine):
    class Always:
        def route(self, eng, requests):
            return ["b" for _ in requests]

    engine.router = Always()
    try:
        routed = engine.submit(_req(engine, PROMPTS[0], "auto")).result()
    finally:
        engine.router = None
    assert routed.patch == "b"
    assert routed.token_ids == engine.submit(_req(engine, PROMPTS[0], "b")).result().token_ids


def test_engine_refuses_a_routed_patch_that_is_not_loaded(engine):
    """A router naming a patch the engine does not have fails that request (never the base answering for it);
    the other requests are served by the patches they were routed to."""
    from fastapi.testclient import TestClient

    from portllm.serve import create_app

    class Confused:
        def route(self, eng, requests):
            return ["nosuch" if r.text == "lost" else "b" for r in requests]

    engine.router = Confused()
    try:
        ids = engine.encode(PROMPTS[0])
        streams = [engine.submit(GenRequest(ids, "auto", GREEDY_PARAMS, text=t)) for t in ("lost", "found")]
        lost, found = (s.result() for s in streams)
        with TestClient(create_app(engine)) as http:
            r = http.post("/v1/completions", json={"model": "auto", "prompt": "lost", "max_tokens": 2})
    finally:
        engine.router = None
        engine.start()
    assert lost.finish_reason == "error" and lost.token_ids == [] and lost.patch == "auto"  # never routed
    assert "'nosuch', which is not a loaded patch" in lost.error and "a, b" in lost.error
    assert found.finish_reason == "length" and found.patch == "b"
    assert found.token_ids == engine.submit(_req(engine, PROMPTS[0], "b")).result().token_ids
    err = r.json()["error"]
    assert r.status_code == 500 and err["type"] == "server_error" and "not a loaded patch" not in err["message"]
    assert err["message"] == f"internal error (request id {r.headers['x-request-id']})"  # the why is logged
    assert engine.registry.refs("auto") == 0  # the failed requests released what they held


def test_http_overload_and_timeout_answers(engine):
    from fastapi.testclient import TestClient

    from portllm.serve import create_app

    with TestClient(create_app(engine)) as http:  # the app's lifespan starts and stops the (running) engine
        with engine.model_lock:
            first = engine.submit(_req(engine, PROMPTS[0], None, n=4))
            while engine.queued:
                time.sleep(0.001)
            fill = [engine.submit(_req(engine, PROMPTS[0], None, n=4)) for _ in range(4)]
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        for s in [first, *fill]:
            s.result()
        engine.config.request_timeout_s = 1e-6
        try:
            r = http.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
        finally:
            engine.config.request_timeout_s = 600.0
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert not engine.alive
    engine.start()


# ---------------------------------------------------------------- command line and vLLM export


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's engine arguments: --max-lora-rank choices


def _parse_vllm_serve(shell):
    """`vllm serve` as vLLM documents its flags (positional model, --lora-modules NAME=PATH ...); unknown flags fail."""
    import argparse
    import shlex

    ap = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    ap.add_argument("model")
    ap.add_argument("--served-model-name", nargs="+")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--enable-lora", action="store_true")
    ap.add_argument("--max-loras", type=int, default=1)
    ap.add_argument("--max-lora-rank", type=int, default=16, choices=VLLM_MAX_LORA_RANKS)
    ap.add_argument("--lora-modules", nargs="+", default=[])
    argv = shlex.split(shell)
    assert argv[:2] == ["vllm", "serve"], argv
    ns = ap.parse_args(argv[2:])
    modules = dict(m.split("=", 1) for m in ns.lora_modules)
    assert len(modules) == len(ns.lora_modules), ns.lora_modules  # no name given twice
    return ns, modules


def test_export_vllm_checks_and_writes_modules(sw, tmp_path):
    """The printed command, read as vLLM reads it, serves the base with every module: each NAME=PATH is a
    directory that PEFT loads onto the base with the source adapter's exact tensors and config."""
    import json

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights
    from transformers import AutoModelForCausalLM

    from portllm import Patch, PortLLMError
    from portllm.serve import export_vllm

    res = export_vllm(sw["base"], {"a": sw["a"], "warn": sw["warn"]}, tmp_path / "mods", served_name="tiny", port=9000)
    assert any("chat template" in w for w in res.warnings["warn"]) and res.warnings["a"] == []
    ns, modules = _parse_vllm_serve(res.shell)
    assert Path(ns.model).is_absolute() and Path(ns.model).samefile(sw["base"])  # the base itself, no download
    assert ns.served_model_name == ["tiny"] and ns.port == 9000 and ns.enable_lora
    assert set(modules) == {"a", "warn"} and ns.max_loras >= len(modules)  # all in one batch
    ranks = []
    for name, path in modules.items():
        path = Path(path)
        assert path.is_absolute() and (path / "adapter_model.safetensors").is_file(), path
        config = json.loads((path / "adapter_config.json").read_text())
        source_dir = sw["root"] / f"adapter-{name}"  # what PEFT itself saved, before import and export
        source = json.loads((source_dir / "adapter_config.json").read_text())
        assert {k: config[k] for k in ("r", "lora_alpha", "target_modules")} == {
            k: source[k] for k in ("r", "lora_alpha", "target_modules")
        }
        assert Path(config["base_model_name_or_path"]).samefile(sw["base"])  # re-stamped for the served base
        ranks.append(config["r"])
        want = load_peft_weights(str(source_dir))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sw["base"]), str(path))
        got = get_peft_model_state_dict(model)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    assert ns.max_lora_rank >= max(ranks)
    lineage = Patch.load(modules["a"]).manifest.lineage[-1]  # the export is recorded in the module's manifest
    assert lineage["event"] == "ported" and lineage["mode"] == "adapter"

    with pytest.raises(PortLLMError, match="refusing to export bad .*does not fit"):
        export_vllm(sw["base"], {"b": sw["b"], "bad": sw["bad"]}, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # nothing written when one patch does not fit


def test_cli_export_vllm_and_serve_errors(sw, tmp_path):
    r = cli("export-vllm", "--base", sw["base"], "--patch", f"a={sw['a']}", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("vllm serve ")
    assert "--lora-modules a=" in r.stdout and (tmp_path / "m" / "a" / "adapter_model.safetensors").is_file()
    r = cli("serve", "--base", sw["base"], "--patch", f"a={sw['a']}", "--engine", "vllm", "--vllm-dir", tmp_path / "v",
            env={"PORTLLM_VLLM": "no-such-vllm"})  # fmt: skip
    assert "vllm serve" in r.stdout and "not installed here" in one_line_error(r)
    assert "'nope': expected NAME=PATH" in one_line_error(cli("serve", "--base", sw["base"], "--patch", "nope"))
    assert "unknown router for serving" in one_line_error(cli("serve", "--base", sw["base"], "--router", "bogus"))
    line = one_line_error(cli("serve", "--base", sw["base"], "--patch", f"bad={sw['bad']}", "--port", "0"))
    assert "does not fit" in line
    line = one_line_error(cli("export-vllm", "--base", sw["base"], "--patch", f"x/y={sw['a']}", "--out", tmp_path))
    assert "names a directory" in line
