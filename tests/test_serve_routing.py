"""`portllm serve --router` / model `auto` on a tiny random model: the global (description) router and Arrow
pick one patch per request, whose answer equals asking for that patch by name; runtime patches are routable."""

import json

import pytest
import torch

import tiny
from conftest import require_module
from portllm import Patch, import_adapter

require_module("fastapi")
require_module("httpx")
from test_serve import GREEDY, TEMPLATE, _with_template, cli, one_line_error  # noqa: E402

DESCRIBED = {
    "movies": "movie review sentiment: is a review positive or negative",
    "math": "grade-school math word problems with numeric answers",
}
MATH = "Math word problem: Natalia sold clips to 48 of her friends, then half as many in May. How many in all?"
MOVIE = "a gorgeous, witty, seductive movie. Is this review positive or negative?"
YESNO = "Passage: the sky is blue on clear days. Question: is the sky blue? Answer yes or no."


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny base with a chat template; described patches (movies, math), one with only a registered task
    (boolq: its task definition's description), one with neither (task unknown to the registry)."""
    from portllm.routing import describe

    root = tmp_path_factory.mktemp("routed")
    base = _with_template(tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=48, layers=2), TEMPLATE)
    out = {"root": root, "base": base}
    for seed, (name, task) in enumerate((("movies", "a"), ("math", "b"), ("yesno", "boolq"), ("mystery", "zz"))):
        adapter = tiny.make_adapter(base, root / f"adapter-{name}", seed=20 + seed, target=["q_proj", "v_proj"])
        out[name] = import_adapter(adapter, base, root / name, task=task).path
        if name in DESCRIBED:
            describe(out[name], DESCRIBED[name])
    return out


@pytest.fixture(scope="module")
def engine(zoo):
    from portllm.routing import serve_router
    from portllm.serve import Engine, EngineConfig

    eng = Engine(zoo["base"], {"movies": zoo["movies"], "math": zoo["math"]}, EngineConfig(max_batch=4), name="tiny")
    eng.router = serve_router("description", eng)
    yield eng.start()
    eng.stop()


@pytest.fixture(scope="module")
def http(zoo, engine):
    from fastapi.testclient import TestClient

    from portllm.serve import create_app
    from portllm.serve.security import ServerSecurity

    security = ServerSecurity(allow_runtime_loading=True, patch_roots=(zoo["root"],))  # runtime loading is opt-in
    with TestClient(create_app(engine, security)) as client:
        yield client
    engine.start()


def _complete(http, model, prompt):
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY})
    assert r.status_code == 200, r.text
    return r


def _chat(http, model, messages, **kw):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": messages, **GREEDY, **kw})
    assert r.status_code == 200, r.text
    return r


def test_global_router_serves_the_described_patch(engine, http):
    from portllm.routing import serve_router

    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"tiny", "movies", "math", "auto"}
    r = _complete(http, "auto", MATH)
    assert r.headers["x-portllm-routed-to"] == "math" and r.json()["model"] == "auto:math"
    routing = json.loads(r.headers["x-portllm-routing"])
    assert routing["router"] == "description" and routing["patch"] == "math"
    assert routing["scores"]["math"] > routing["scores"]["movies"]
    assert r.json()["choices"][0]["text"] == _complete(http, "math", MATH).json()["choices"][0]["text"]
    assert r.json()["choices"][0]["text"] != _complete(http, "movies", MATH).json()["choices"][0]["text"]

    # a chat is routed by its last user message (not the system prompt, not the template)
    messages = [{"role": "system", "content": "You solve math word problems."}, {"role": "user", "content": MOVIE}]
    r = _chat(http, "auto", messages)
    assert r.json()["model"] == "auto:movies"
    assert r.json()["choices"][0]["message"] == _chat(http, "movies", messages).json()["choices"][0]["message"]
    with http.stream("POST", "/v1/chat/completions", json={"model": "auto", "messages": messages, **GREEDY,
                                                           "stream": True}) as s:  # fmt: skip
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"auto:movies"}

    # below the threshold: the base answers
    engine.router = serve_router("description:threshold=0.99", engine)
    try:
        r = _complete(http, "auto", MATH)
    finally:
        engine.router = serve_router("description", engine)
    assert r.headers["x-portllm-routed-to"] == "tiny" and r.json()["model"] == "auto:tiny"
    assert r.json()["choices"][0]["text"] == _complete(http, "tiny", MATH).json()["choices"][0]["text"]


def test_runtime_loaded_patches_become_routable(zoo, engine, http):
    assert _complete(http, "auto", YESNO).headers["x-portllm-routed-to"] != "yesno"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "yesno", "lora_path": str(zoo["yesno"])})
    assert r.status_code == 200, r.text
    r = _complete(http, "auto", YESNO)  # no description: its task's ("yes/no questions about a passage")
    assert r.headers["x-portllm-routed-to"] == "yesno"
    assert r.json()["choices"][0]["text"] == _complete(http, "yesno", YESNO).json()["choices"][0]["text"]

    r = http.post("/v1/load_lora_adapter", json={"lora_name": "mystery", "lora_path": str(zoo["mystery"])})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": "auto", "prompt": YESNO, **GREEDY})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "model" and "mystery" in err["message"]
    assert "yesno" not in err["message"] and "\n" not in err["message"]
    assert _complete(http, "mystery", YESNO).status_code == 200  # named, it still serves

    for name in ("mystery", "yesno"):
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    assert _complete(http, "auto", YESNO).headers["x-portllm-routed-to"] != "yesno"
    assert _complete(http, "auto", MATH).headers["x-portllm-routed-to"] == "math"


def test_auto_without_a_router_is_an_openai_400(engine, http):
    router, engine.router = engine.router, None
    try:
        assert "auto" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        r = http.post("/v1/completions", json={"model": "auto", "prompt": MATH, "max_tokens": 2})
        c = http.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "x"}]})
    finally:
        engine.router = router
    for resp in (r, c):
        err = resp.json()["error"]
        assert resp.status_code == 400 and set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["param"] == "model" and "--router" in err["message"]


# ---------------------------------------------------------------- Arrow


def _layer_inputs(model, names, ids):
    """Each named linear layer's input for the prompt (plain transformers, no patch)."""
    mods, seen = dict(model.named_modules()), {}

    def grab(name):
        return lambda _m, args: seen.__setitem__(name, args[0][0])

    hooks = [mods[n].register_forward_pre_hook(grab(n)) for n in names]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return seen


def _toy_patches(zoo, prompts):
    """Patch j reads one direction per layer: the base's mean input there over prompt j (repeated tokens),
    so prompt j activates patch j and barely the other."""
    from transformers import AutoModelForCausalLM

    template = Patch.load(import_adapter(zoo["root"] / "adapter-movies", zoo["base"], zoo["root"] / "tmpl").path)
    names = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in template.tensors})
    model = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    made = []
    for j, ids in enumerate(prompts):
        seen = _layer_inputs(model, names, ids)
        t = {}
        for k, v in template.tensors.items():
            v = torch.zeros_like(v)
            n = k.split(".lora_")[0].removeprefix("base_model.model.")
            if ".lora_A" in k:
                v[0] = torch.nn.functional.normalize(seen[n].mean(0), dim=0)
            else:
                v[:, 0] = 0.5
            t[k] = v
        made.append(Patch(dict(template.config), t, template.manifest.copy()).save(zoo["root"] / f"toy{j}").path)
    return made


def test_arrow_picks_the_patch_a_prompt_activates(zoo):
    from portllm.routing import serve_router
    from portllm.serve import Engine, EngineConfig, GenRequest, SamplingParams

    prompts = [[40] * 8, [200] * 8]
    toys = _toy_patches(zoo, prompts)
    eng = Engine(zoo["base"], {"t0": toys[0]}, EngineConfig(max_batch=4), name="tiny")
    eng.router = serve_router("arrow-request", eng)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with eng:
        eng.load_patch("t1", toys[1])  # loaded at runtime: its prototypes are computed when first needed
        for j, ids in enumerate(prompts):
            req = GenRequest(list(ids), "auto", params)
            got = eng.submit(req).result()
            assert got.patch == f"t{j}", req.routing
            s = req.routing["scores"]
            assert req.routing["router"] == "arrow-request" and s[f"t{j}"] > 2 * s[f"t{1 - j}"]
            assert got.token_ids == eng.submit(GenRequest(list(ids), f"t{j}", params)).result().token_ids
        # batched: both in one step, each routed from its own prompt
        both = [eng.submit(GenRequest(list(ids), "auto", params)) for ids in prompts]
        assert [s.result().patch for s in both] == ["t0", "t1"]
        eng.unload_patch("t1")
        assert eng.submit(GenRequest(list(prompts[1]), "auto", params)).result().patch == "t0"


# ---------------------------------------------------------------- command line


def test_cli_router_errors_are_one_line(zoo):
    assert "unknown router for serving" in one_line_error(cli("serve", "--base", zoo["base"], "--router", "bogus"))
    line = one_line_error(cli("serve", "--base", zoo["base"], "--router", "description:alpha=3"))
    assert "takes no 'alpha=3'" in line and "threshold" in line
    line = one_line_error(
        cli("serve", "--base", zoo["base"], "--router", "description", "--patch", f"m={zoo['mystery']}", "--port", "0")
    )
    assert "m have no description" in line


def test_serve_router_api(zoo, engine):
    from portllm import PortLLMError
    from portllm.routing import serve_router
    from portllm.serve import router_factory

    assert serve_router("description", engine).name == "description"
    assert serve_router("description", engine, threshold=0.5).values["threshold"] == 0.5
    with pytest.raises(PortLLMError, match="one patch per request"):
        router_factory("phatgoose")
    with pytest.raises(PortLLMError, match=r"threshold must be a number in \[-1, 1\]"):
        serve_router("description:threshold=3", engine)
