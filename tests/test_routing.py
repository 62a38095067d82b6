"""Routing among patches on tiny random models: equalities with PEFT, routers' choices, batch independence."""

import json

import pytest
import torch

import tiny
from portllm import PortLLMError, import_adapter
from portllm.eval import loglikelihoods, open_lm
from portllm.routing import PER_TOKEN, PatchSet, Request, get_router, router_names
from portllm.routing.routers import lora_prototype, topk_softmax

HIDDEN = 48


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A BPE base, three patches on it (different ranks and targets), and a patch made on another base."""
    root = tmp_path_factory.mktemp("zoo")
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=HIDDEN, layers=2)
    other = tiny.make_base(root / "other", seed=5, bpe=True, vocab_size=320, hidden=HIDDEN, layers=2)
    specs = [("sst2", 4, "all-linear"), ("boolq", 8, ["q_proj", "v_proj", "down_proj"]), ("gsm8k", 4, "all-linear")]
    patches = []
    for i, (task, r, target) in enumerate(specs):
        a = tiny.make_adapter(base, root / f"a{i}", r=r, alpha=2 * r, seed=10 + i, target=target)
        patches.append(import_adapter(a, base, root / task, task=task).path)
    a = tiny.make_adapter(other, root / "ao", r=4, seed=3)
    foreign = import_adapter(a, other, root / "foreign", task="sst2").path
    return {"root": root, "base": base, "patches": patches, "foreign": foreign}


def _ids(lm_tok, texts):
    enc = [lm_tok.encode(t) for t in texts]
    n = max(map(len, enc))
    ids = torch.full((len(enc), n), lm_tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for j, e in enumerate(enc):
        ids[j, n - len(e) :] = torch.tensor(e)
        mask[j, n - len(e) :] = 1
    return ids, mask


TEXTS = ["The movie was great and the actors were wonderful.", "Janet has 16 eggs and sells 9 of them for $2 each."]


@pytest.mark.parametrize("router", ["uniform", "arrow", "mixture", "oracle", "select"])
def test_one_patch_equals_peft_attach(zoo, router):
    peft_lm = open_lm(zoo["base"], zoo["patches"][1])
    ps = PatchSet(zoo["base"], [zoo["patches"][1]])
    ids, mask = _ids(ps.tokenizer, TEXTS)
    if router == "select":
        ps.use(None)
        reqs = [Request(patch=0), Request(patch="boolq")]
    else:
        ps.use(get_router(router))
        reqs = [Request(text=t, label="boolq") for t in TEXTS]
    with torch.no_grad(), ps.rows(reqs):
        got = ps.model(input_ids=ids, attention_mask=mask).logits
        want = peft_lm.model(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-4
    with torch.no_grad():  # outside a request context and with no router: the bare base
        bare = ps.use(None).model(input_ids=ids, attention_mask=mask).logits
        base = open_lm(zoo["base"]).model(input_ids=ids, attention_mask=mask).logits
    assert (bare - base).abs().max() < 1e-5


def test_uniform_is_the_linear_average(zoo, tmp_path):
    from portllm.merge import merge

    ps = PatchSet(zoo["base"], zoo["patches"])
    ranks = sum(max(m.rank for m in p.modules.values()) for p in ps.patches)
    merged, _ = merge(ps.patches, "linear", rank=ranks)  # exact: rank of the stacked factors
    merged.save(tmp_path / "lin")
    ref = open_lm(zoo["base"], tmp_path / "lin")
    ids, mask = _ids(ps.tokenizer, TEXTS)
    with torch.no_grad():
        want = ref.model(input_ids=ids, attention_mask=mask).logits
        got = ps.use(get_router("uniform")).model(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-4
    # Arrow with top-k = N and an enormous temperature weighs every patch equally too (patches with the same
    # targets: where a patch is absent, Arrow shares the weight among those present)
    same = [zoo["patches"][0], zoo["patches"][2]]
    merged, _ = merge(same, "linear", rank=8)
    merged.save(tmp_path / "lin2")
    ps2 = PatchSet(zoo["base"], same).use(get_router("arrow", top_k=2, temperature=1e12))
    with torch.no_grad():
        want = open_lm(zoo["base"], tmp_path / "lin2").model(input_ids=ids, attention_mask=mask).logits
        flat = ps2.model(input_ids=ids, attention_mask=mask).logits
    assert (flat - want).abs().max() < 1e-4


def test_patches_of_another_base_are_refused(zoo):
    with pytest.raises(PortLLMError, match="another base"):
        PatchSet(zoo["base"], [zoo["patches"][0], zoo["foreign"]])


def test_arrow_picks_the_patch_an_input_activates(zoo, tmp_path):
    """Orthogonal toy patches: patch i reads only input direction e_i; an input along e_j routes to j."""
    from portllm import Patch

    ps0 = Patch.load(zoo["patches"][0])
    made = []
    for i in range(3):
        t = {}
        for k, v in ps0.tensors.items():
            v = torch.zeros_like(v)
            if ".lora_A" in k:
                v[0, i] = 1.0  # A reads e_i only
            else:
                v[:, 0] = 0.5  # B writes along a fixed direction
            t[k] = v
        p = Patch(dict(ps0.config), t, ps0.manifest.copy())
        made.append(p.save(tmp_path / f"o{i}").path)
    ps = PatchSet(zoo["base"], made).use(get_router("arrow", top_k=1))
    layer = ps.layers[0]
    for j in range(3):
        x = torch.zeros(1, 4, layer.in_features)
        x[..., j] = 2.0
        x[..., 5] = 0.3  # a direction none of them reads
        w = ps.router.weights(ps, layer, x, {})
        assert w.shape == (1, 4, 3)
        assert torch.all(w.argmax(-1) == j) and torch.allclose(w.sum(-1), torch.ones(1, 4))
    # the prototype is the exact top right singular vector of B·A
    a, b = torch.randn(4, 20, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    v = lora_prototype(a, b).double()
    ref = torch.linalg.svd(b @ a).Vh[0]
    assert min((v - ref).norm(), (v + ref).norm()) < 1e-5


def test_global_router_picks_the_described_patch(zoo, tmp_path):
    import shutil

    from portllm.routing import describe
    from portllm.routing.routers import expert_embeddings, global_scores

    paths = []
    for p, text in zip(
        zoo["patches"],
        ["movie review sentiment: is a review positive or negative", "answer yes/no questions about a passage",
         "grade-school math word problems with numeric answers"],
    ):  # fmt: skip
        q = tmp_path / p.name
        shutil.copytree(p, q)
        d = describe(q, text)
        assert not d.was_signed and d.description == text
        paths.append(q)
    ps = PatchSet(zoo["base"], paths)
    assert ps.experts[2].description.startswith("grade-school")
    emb = expert_embeddings(ps)
    reqs = [
        Request(text="Natalia sold clips to 48 of her friends, then half as many in May. How many clips in all?"),
        Request(text="a gorgeous, witty, seductive movie.\nQuestion: Is this sentence positive or negative?"),
    ]
    g = global_scores(ps, reqs, emb)
    assert g.argmax(-1).tolist() == [2, 0]
    # GLIDER with the Arrow local router: a large α makes the description decide
    ps.use(get_router("glider", local="arrow", alpha=1000.0, top_k=1))
    cache = ps.router.rows(ps, reqs)
    w = ps.router.weights(ps, ps.layers[0], torch.randn(2, 3, ps.layers[0].in_features), cache)
    assert w.argmax(-1).tolist() == [[2, 2, 2], [0, 0, 0]]


def test_glider_without_descriptions_is_one_clear_error(zoo):
    with pytest.raises(PortLLMError, match="portllm describe"):
        PatchSet(zoo["base"], zoo["patches"]).use(get_router("glider", local="arrow"))


def test_mixed_batch_equals_each_alone(zoo, tmp_path):
    import shutil

    from portllm.routing import describe

    paths = []
    for p, text in zip(zoo["patches"], ["movie sentiment", "yes or no questions", "math word problems"]):
        q = tmp_path / p.name
        shutil.copytree(p, q)
        describe(q, text)
        paths.append(q)
    ps = PatchSet(zoo["base"], paths).use(get_router("glider", local="arrow", alpha=5.0, top_k=2))
    texts = [*TEXTS, "Question: is the sky blue?\nAnswer:"]
    ids, mask = _ids(ps.tokenizer, texts)
    reqs = [Request(text=t) for t in texts]
    with torch.no_grad():
        with ps.rows(reqs):
            together = ps.model(input_ids=ids, attention_mask=mask).logits
        for j, t in enumerate(texts):
            one, m1 = _ids(ps.tokenizer, [t])
            with ps.rows([reqs[j]]):
                alone = ps.model(input_ids=one, attention_mask=m1).logits
            assert (together[j, -one.shape[1] :] - alone[0]).abs().max() < 1e-4
    # through the scoring engine: each row routed from its own request, whatever the batch
    pairs = [(t, " yes") for t in texts] + [(t, " no") for t in texts]
    share = [j for j in range(3)] * 2
    lm = ps.lm()
    with ps.requests({j: reqs[j] for j in range(3)}):
        batched, _ = loglikelihoods(lm, pairs, batch_size=16, share=share)
        single, _ = loglikelihoods(lm, pairs, batch_size=1, share=share)
    assert batched == pytest.approx(single, abs=1e-4)


def test_arrow_equals_peft_arrow(zoo):
    """PEFT 0.21's Arrow (power-iteration prototypes) against ours (exact SVD), with PEFT given our prototypes."""
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM

    same = [zoo["patches"][0], zoo["patches"][2]]  # Arrow in PEFT needs one rank and one set of targets
    ps = PatchSet(zoo["base"], same).use(get_router("arrow", top_k=1, temperature=0.5))
    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    peft = create_arrow_model(
        model, [str(p) for p in same], ArrowConfig(top_k=1, router_temperature=0.5, rng_seed=0)
    ).eval()
    ids, mask = _ids(ps.tokenizer, TEXTS)
    with torch.no_grad():
        peft(input_ids=ids, attention_mask=mask)  # builds PEFT's prototypes
        ours = {layer.name: ps.router._protos[layer.index][0] for layer in ps.layers}
        for name, mod in peft.named_modules():
            if hasattr(mod, "lora_arrow") and "arrow_router" in mod.lora_arrow:
                key = name.removeprefix("base_model.model.")
                arrow = mod.lora_arrow["arrow_router"]
                cos = torch.nn.functional.cosine_similarity(arrow.prototypes, ours[key], dim=-1).abs()
                # PEFT runs 15 power iterations from a random start; ours is the exact top singular vector
                assert torch.all(cos > 0.8), (key, cos)
                arrow.prototypes.copy_(ours[key])
        want = peft(input_ids=ids, attention_mask=mask).logits
        got = ps.model(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-4


def test_topk_softmax_and_knobs():
    w = topk_softmax(torch.tensor([[1.0, 3.0, 2.0, float("-inf")]]), 2)
    assert w[0, 0] == 0 and w[0, 3] == 0 and torch.isclose(w.sum(), torch.tensor(1.0))
    with pytest.raises(PortLLMError, match="unknown router"):
        get_router("nope")
    with pytest.raises(PortLLMError, match="top_k"):
        get_router("arrow", top_k=0)
    with pytest.raises(PortLLMError, match="local"):
        get_router("glider", local="mlp")


def test_phatgoose_gates_train_cache_and_route(zoo, tmp_path):
    from portllm.routing.phatgoose import GateConfig, gates_file, load_gates
    from portllm.routing.score import evaluate_routed
    from portllm.tasks import get_task

    data = tiny.sentiment_data(tmp_path / "data", n_train=32, n_eval=8)
    ps = PatchSet(zoo["base"], zoo["patches"][:1])
    ps.gate_config, ps.data = GateConfig(steps=3, batch_size=4, max_length=32), data
    gates = load_gates(ps)
    assert gates_file(ps, 0, ps.gate_config).is_file()
    assert set(gates[0]) == {layer.name for layer in ps.layers}
    assert any(float(g.abs().max()) > 0 for g in gates[0].values())  # they learned something
    res = evaluate_routed(ps, get_router("phatgoose"), [get_task("sst2")], limit=8, data=data, out=tmp_path / "run")
    peft = open_lm(zoo["base"], zoo["patches"][0])
    from portllm.eval import evaluate

    ref = evaluate(peft, [get_task("sst2")], limit=8, data=data)
    assert res.tasks["sst2"].value == ref.tasks["sst2"].value  # one patch: routing cannot change the answers
    body = json.loads((tmp_path / "run" / "results.json").read_text())
    assert body["routing"]["router"] == "phatgoose" and body["routing"]["top_k"] == 2


def test_cli_describe_and_routed_eval(zoo, tmp_path):
    import shutil

    from test_cli import one_line_error, run

    data = tiny.sentiment_data(tmp_path / "data", n_train=32, n_eval=6)
    q = tmp_path / "sst2"
    shutil.copytree(zoo["patches"][0], q)
    (q / "portllm.sig").write_text("{}")  # a (fake) signature: describe must say it no longer verifies
    r = run("describe", q, "movie review sentiment")
    assert r.returncode == 0, r.stderr
    assert "no longer verifies" in r.stderr
    assert json.loads((q / "portllm.json").read_text())["extra"]["routing"]["description"] == "movie review sentiment"
    env = {"PORTLLM_DATA": str(data)}
    r = run("eval", "--model", zoo["base"], "--patches", f"{q},{zoo['patches'][1]}", "--router", "oracle",
            "--tasks", "sst2", "--limit", "6", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"]["sst2"]["n"] == 6
    one_line_error(run("eval", "--model", zoo["base"], "--router", "arrow", "--tasks", "sst2", env=env))
    line = one_line_error(
        run("eval", "--model", zoo["base"], "--patches", f"{q},{zoo['foreign']}", "--tasks", "sst2", env=env)
    )
    assert "another base" in line
    line = one_line_error(run("describe", tmp_path / "missing", "x"))
    assert "does not exist" in line


def test_study_writes_report(zoo, tmp_path):
    import shutil

    from portllm.routing.phatgoose import GateConfig
    from portllm.routing.study import StudyConfig, run_study

    data = tiny.sentiment_data(tmp_path / "data", n_train=32, n_eval=14)  # 10 test rows, 4 dev rows (the merges)
    shutil.copy(data / "sst2" / "test.tsv", data / "sst2" / "dev.tsv")
    p2 = tmp_path / "p2"
    shutil.copytree(zoo["patches"][2], p2)
    raw = json.loads((p2 / "portllm.json").read_text())
    raw["task"] = "sst2_heldout"
    (p2 / "portllm.json").write_text(json.dumps(raw))
    cfg = StudyConfig(
        base=str(zoo["base"]),
        patches=[str(zoo["patches"][0]), str(p2)],
        held_out=[],
        routers=["glider", "arrow", "mixture", "uniform"],
        limit=10,
        merges=["linear", "ties"],
        gates=GateConfig(steps=2, batch_size=4, max_length=32),
        dev=4,
    )
    logs = []
    rep = run_study(cfg, tmp_path / "out", tmp_path / "cache", data, log=logs.append)
    hi = rep["held_in"]
    assert hi["tasks"] == ["sst2", "sst2_heldout"] and set(hi["routers"]) == {"glider", "arrow", "mixture", "uniform"}
    # what the answers must be, computed here without the study: the oracle is each task's own patch attached by
    # PEFT, the base the bare base, uniform the linear average of the patches (merged at full rank: exact)
    from portllm import Patch
    from portllm.eval import run_task
    from portllm.merge import merge
    from portllm.tasks import get_task, load_examples

    merged, _ = merge([Patch.load(zoo["patches"][0]), Patch.load(p2)], "linear", rank=8)
    merged.save(tmp_path / "average")
    own = {"sst2": zoo["patches"][0], "sst2_heldout": p2}
    per = hi["per_task"]
    for t in hi["tasks"]:
        task = get_task(t)
        ex = load_examples(task, "eval", data, 10)

        def k(*model, task=task, ex=ex):
            return sum(r["correct"] for r in run_task(open_lm(*model), task, ex).records)

        assert per[t]["oracle"]["k"] == k(zoo["base"], own[t]), t
        assert per[t]["base"]["k"] == k(zoo["base"]), t
        assert per[t]["routers"]["uniform"]["k"] == k(zoo["base"], tmp_path / "average"), t
    # the suite's patch p2 changes sst2_heldout's answers (7 right -> 5): an oracle giving the base there would fail
    assert per["sst2_heldout"]["oracle"]["k"] != per["sst2_heldout"]["base"]["k"]
    assert hi["oracle"] == pytest.approx((per["sst2"]["oracle"]["value"] + per["sst2_heldout"]["oracle"]["value"]) / 2)
    assert rep["routers_params"]["glider"]["alpha"] == 10.0
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Routing")
    assert (tmp_path / "out" / "routing.png").stat().st_size > 1000
    n_logs = len(logs)
    run_study(cfg, tmp_path / "out", tmp_path / "cache", data, log=logs.append)  # all cached: nothing rescored
    assert not [m for m in logs[n_logs:] if m.startswith(("scoring", "merging"))]


def test_study_tunes_glider_on_a_dev_slice_disjoint_from_the_test_slice(zoo, tmp_path):
    from dataclasses import replace

    from portllm.errors import PortLLMError
    from portllm.routing.phatgoose import GateConfig
    from portllm.routing.study import StudyConfig, run_study

    data = tiny.sentiment_data(tmp_path / "data", n_train=32, n_eval=10)
    cfg = StudyConfig(
        base=str(zoo["base"]),
        patches=[str(zoo["patches"][0])],
        held_out=[],
        routers=["glider"],
        limit=6,
        merges=[],
        gates=GateConfig(steps=2, batch_size=4, max_length=32),
        dev=4,
        tune=True,
        tune_top_k=(1,),
        tune_alpha=(1.0, 10.0),
    )
    logs = []
    rep = run_study(cfg, tmp_path / "out", tmp_path / "cache", data, log=logs.append)
    tu = rep["tuning"]
    assert tu["dev_rows"] == [6, 10] and tu["dev_n"] == {"sst2": 4} and len(tu["grid"]) == 2
    assert tu["chosen"]["dev"] == max(g["dev"] for g in tu["grid"])
    assert rep["routers_params"]["glider (tuned)"]["alpha"] == tu["chosen"]["alpha"]
    assert rep["held_in"]["per_task"]["sst2"]["routers"]["glider (tuned)"]["n"] == 6  # scored on the test rows
    assert any("(4 each, dev)" in m for m in logs) and "Tuning glider" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(PortLLMError, match="no eval examples after the first 10"):
        run_study(replace(cfg, limit=10), tmp_path / "out2", tmp_path / "cache", data, log=logs.append)


# ---------------------------------------------------------------- review fixes


def _unsaved(path):
    """A patch in memory only (no manifest checksum of its weights), as an API caller may pass one."""
    from portllm import Patch

    q = Patch.load(path)
    m = q.manifest.copy()
    m.files.clear()
    return Patch(dict(q.config), dict(q.tensors), m)


def test_gate_cache_is_keyed_per_patch_and_task(zoo):
    from portllm.routing.phatgoose import GateConfig, gates_file

    ps = PatchSet(zoo["base"], [_unsaved(p) for p in zoo["patches"][:2]])
    assert ps.patches[0].weights_sha256 is None
    cfg = GateConfig()
    assert gates_file(ps, 0, cfg) != gates_file(ps, 1, cfg)  # was the set's hash for both: one patch's gates for all
    again = PatchSet(zoo["base"], [_unsaved(zoo["patches"][0])])
    assert gates_file(again, 0, cfg) == gates_file(ps, 0, cfg)  # the patch's own identity, whatever the set
    other = _unsaved(zoo["patches"][0])
    other.manifest.task = "boolq"  # same weights, gates learned on other data
    assert gates_file(PatchSet(zoo["base"], [other]), 0, cfg) != gates_file(ps, 0, cfg)


def test_rows_state_is_reset_when_setting_rows_fails(zoo):
    ps = PatchSet(zoo["base"], zoo["patches"][:2])

    class Failing:
        def rows(self, pset, reqs):
            raise PortLLMError("encoder missing")

    ps.router = Failing()
    with pytest.raises(PortLLMError, match="encoder missing"):
        with ps.rows([Request(patch=1)]):
            pass
    assert ps._row_weights is None and ps._rows is None and ps._cache == {}


def test_bfloat16_selection_matches_peft(zoo):
    """PEFT adds the fp32 update to the bf16 base output, then casts: the sum is rounded once."""
    ps = PatchSet(zoo["base"], [zoo["patches"][0]], dtype="bfloat16")
    peft = open_lm(zoo["base"], zoo["patches"][0], dtype="bfloat16")
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ps.rows([Request(patch=0)] * 2):
        got = ps.model(input_ids=ids).logits.float()
        want = peft.model(input_ids=ids).logits.float()
    assert (got - want).abs().max() < 1e-3  # was 0.14: the update cast to bf16 before the sum (two roundings)


def test_phatgoose_gates_train_under_inference_mode_and_refuse_untasked_first(zoo, tmp_path):
    from portllm import Patch
    from portllm.routing.phatgoose import GateConfig, gates_file

    data = tiny.sentiment_data(tmp_path / "data", n_train=16, n_eval=4)
    ps = PatchSet(zoo["base"], [_unsaved(zoo["patches"][0])])
    ps.gate_config, ps.data = GateConfig(steps=2, batch_size=2, max_length=32, seed=7), data
    with torch.inference_mode():  # e.g. `use()` called while scoring: the gates still need gradients
        ps.use(get_router("phatgoose"))
    assert ps.router._gates[0][0].abs().sum() > 0
    # a patch without a task is refused before the others' gates are trained (not after minutes of training)
    q = Patch.load(zoo["patches"][1])
    q.manifest.task = None
    ps2 = PatchSet(zoo["base"], [_unsaved(zoo["patches"][0]), q])
    ps2.gate_config, ps2.data = GateConfig(steps=2, batch_size=2, max_length=32, seed=8), data
    with pytest.raises(PortLLMError, match="records no task"):
        ps2.use(get_router("phatgoose"))
    assert not gates_file(ps2, 0, ps2.gate_config).is_file()


def test_oracle_reads_task_names_as_the_registry_does(zoo):
    q = _unsaved(zoo["patches"][1])
    q.manifest.task = "BoolQ"  # as given at import; the suite's label is the registry's name
    ps = PatchSet(zoo["base"], [_unsaved(zoo["patches"][0]), q]).use(get_router("oracle"))
    cache = ps.router.rows(ps, [Request(label="boolq"), Request(label="sst2"), Request(label="piqa")])
    assert cache["w"][:, 0].tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


def test_no_task_label_reaches_a_non_oracle_router(zoo, tmp_path):
    from portllm.eval import run_task
    from portllm.routing.routers import Oracle, Uniform
    from portllm.routing.score import score_tasks
    from portllm.tasks import get_task, load_examples

    seen = []

    class Spy(Uniform):
        name = "spy"

        def rows(self, pset, reqs):
            seen.extend(reqs)
            return {}

    data = tiny.sentiment_data(tmp_path / "data", n_train=8, n_eval=4)
    t = get_task("sst2")
    ps = PatchSet(zoo["base"], zoo["patches"][:1])
    score_tasks(ps, Spy(), {"sst2": (t, load_examples(t, "eval", data, 4))}, batch_size=4)
    texts = [r.text for r in seen if r.text]
    assert texts and all(r.label is None for r in seen)

    # the oracle does get each row's task label, and answers with that task's patch among the set's three
    labels = []

    class LabelSpy(Oracle):
        name = "oracle-spy"

        def rows(self, pset, reqs):
            labels.extend(r.label for r in reqs)
            return super().rows(pset, reqs)

    ex = load_examples(t, "eval", data, 4)
    runs = score_tasks(PatchSet(zoo["base"], zoo["patches"]), LabelSpy(), {"sst2": (t, ex)}, batch_size=4)
    assert labels and set(labels) == {"sst2"}
    got = [s for r in runs["sst2"].records for s in r["scores"]]
    own = [s for r in run_task(open_lm(zoo["base"], zoo["patches"][0]), t, ex).records for s in r["scores"]]
    base = [s for r in run_task(open_lm(zoo["base"]), t, ex).records for s in r["scores"]]
    assert got == pytest.approx(own, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, base)) > 1e-3  # the patch, not the base


def test_non_finite_knobs_and_options_a_router_does_not_take(zoo):
    for knobs in ({"alpha": float("inf")}, {"temperature": float("inf")}, {"alpha": float("nan")}):
        with pytest.raises(PortLLMError, match="finite"):
            get_router("glider", **knobs)
    from test_cli import one_line_error, run

    line = one_line_error(
        run("eval", "--model", zoo["base"], "--patches", zoo["patches"][0], "--router", "arrow", "--alpha", "3",
            "--tasks", "sst2")
    )  # fmt: skip
    assert "takes no --alpha" in line


# ---------------------------------------------------------------- one router namespace, no silent fallbacks


@pytest.fixture(scope="module")
def pair(zoo, tmp_path_factory):
    """Two described patches whose tasks share the toy sentiment data (sst2, sst2_heldout), so every router
    (PHATGOOSE gates included) can run on them."""
    import shutil

    from portllm.routing import describe

    root = tmp_path_factory.mktemp("pair")
    data = tiny.sentiment_data(root / "data", n_train=16, n_eval=4)
    shutil.copy(data / "sst2" / "test.tsv", data / "sst2" / "dev.tsv")
    paths = []
    made = [(zoo["patches"][0], "sst2", "movie review sentiment"), (zoo["patches"][2], "sst2_heldout", "math problems")]
    for src, task, text in made:
        q = root / task
        shutil.copytree(src, q)
        raw = json.loads((q / "portllm.json").read_text())
        raw["task"] = task
        (q / "portllm.json").write_text(json.dumps(raw))
        describe(q, text)
        paths.append(q)
    return {"paths": paths, "data": data}


@pytest.mark.parametrize("name", router_names(PER_TOKEN))
def test_every_router_changes_the_output_and_none_is_the_base(zoo, pair, name):
    from portllm.routing.phatgoose import GateConfig

    ps = PatchSet(zoo["base"], pair["paths"])
    ps.gate_config, ps.data = GateConfig(steps=2, batch_size=2, max_length=32), pair["data"]
    ps.use(get_router(name))
    ids, mask = _ids(ps.tokenizer, TEXTS)
    with torch.no_grad():
        with ps.rows([Request(text=t, label=task) for t, task in zip(TEXTS, ["sst2", "sst2_heldout"])]):
            got = ps.model(input_ids=ids, attention_mask=mask).logits
        base = open_lm(zoo["base"]).model(input_ids=ids, attention_mask=mask).logits
    diff = float((got - base).abs().max())
    assert diff < 1e-5 if name == "none" else diff > 1e-3, diff


def test_one_router_namespace():
    import re

    from portllm.routing import KINDS, PER_REQUEST, ROUTERS, Router, register, serve_router
    from portllm.routing.serving import parse_spec

    token, request = router_names(PER_TOKEN), router_names(PER_REQUEST)
    assert {"none", "uniform", "oracle", "arrow", "phatgoose", "glider", "mixture"} <= set(token)
    assert set(request) == {"description", "arrow-request"}
    assert all(cls.name == n and cls.kind in KINDS for n, cls in ROUTERS.items())  # no alias: one name, one entry
    assert "global" not in ROUTERS and ROUTERS["glider"].kind == PER_TOKEN  # glider is GLIDER everywhere
    for taken in ("glider", "description"):  # a name of either kind cannot be registered again
        with pytest.raises(ValueError, match="registered twice"):
            register(type("Dup", (Router,), {"name": taken}))
    # the server serves only per-request routers, and says which and why
    for n in token:
        with pytest.raises(PortLLMError, match=re.escape(f"--router {n}: the server picks one patch per request and "
                                                         "serves description, arrow-request; ")):  # fmt: skip
            serve_router(n)
    for n in ("global", "glider:threshold=0.3"):
        with pytest.raises(PortLLMError):
            parse_spec(n)
    # and a patch set runs only per-token routers
    for n in request:
        with pytest.raises(PortLLMError, match=f"router {n} picks one loaded patch per request.*needs a per-token"):
            get_router(n)


def test_cli_refuses_a_router_of_the_other_kind_in_one_line(zoo):
    from test_cli import one_line_error, run

    line = one_line_error(run("serve", "--base", zoo["base"], "--router", "glider"))
    assert "picks one patch per request and serves description, arrow-request" in line
    patch = zoo["patches"][0]
    line = one_line_error(run("eval", "--model", zoo["base"], "--patches", patch, "--router", "description"))
    assert "needs a per-token router" in line and "glider" in line


def test_get_router_refuses_a_knob_the_router_does_not_take():
    from portllm.routing.study import StudyConfig, study_router

    with pytest.raises(PortLLMError, match=r"router arrow takes no alpha; its parameters: top_k, temperature$"):
        get_router("arrow", alpha=3.0)  # was dropped silently
    with pytest.raises(PortLLMError, match=r"router uniform takes no top_k; its parameters: none"):
        get_router("uniform", top_k=2)
    assert get_router("arrow", alpha=None).values == {"top_k": 3, "temperature": 1.0}  # None: no value given
    # the study's --top-k / --alpha go to each router that takes them, by design (documented)
    cfg = StudyConfig(base="b", patches=[], held_out=[], top_k=1, alpha=3.0)
    assert study_router("arrow", cfg).values == {"top_k": 1, "temperature": 1.0}
    assert study_router("glider", cfg).values["alpha"] == 3.0 and study_router("uniform", cfg).values == {}


def test_oracle_refuses_rows_it_has_no_labels_for(zoo):
    ps = PatchSet(zoo["base"], zoo["patches"][:2]).use(get_router("oracle"))
    ids, mask = _ids(ps.tokenizer, TEXTS)
    with torch.no_grad():
        with pytest.raises(PortLLMError, match="router oracle reads task labels"):
            ps.model(input_ids=ids, attention_mask=mask)  # outside rows(): was the base, silently
        with pytest.raises(PortLLMError, match="task labels .* for 1 rows, but the batch has 2"):
            with ps.rows([Request(label="sst2")]):
                ps.model(input_ids=ids, attention_mask=mask)  # was the base for every row
        with pytest.raises(PortLLMError, match="row 1 has none"):
            with ps.rows([Request(label="sst2"), Request(text="no label")]):
                pass
        with ps.rows([Request(label="sst2"), Request(patch=1)]):  # a row whose patch the caller chose needs none
            ps.model(input_ids=ids, attention_mask=mask)


def test_glider_never_drops_its_global_term_silently(zoo, pair):
    # alpha=0, given explicitly: no descriptions needed, and GLIDER is its local router alone
    bare = PatchSet(zoo["base"], zoo["patches"])
    bare.use(get_router("glider", local="arrow", alpha=0.0, top_k=2))
    layer = bare.layers[0]
    layer_x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    w = bare.router.weights(bare, layer, layer_x, bare.router.rows(bare, [Request(), Request()]))
    arrow = get_router("arrow", top_k=2)
    arrow.prepare(bare)
    assert torch.allclose(w, arrow.weights(bare, layer, layer_x, {}))
    with pytest.raises(PortLLMError, match="portllm describe"):  # alpha > 0 without descriptions
        bare.use(get_router("glider", local="arrow", alpha=1.0))
    # alpha > 0: every row needs its text, and the forward pass its rows
    ps = PatchSet(zoo["base"], pair["paths"]).use(get_router("glider", local="arrow"))
    layer = ps.layers[0]
    layer_x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with pytest.raises(PortLLMError, match="row 1 has no text"):
        ps.router.rows(ps, [Request(text="a movie"), Request()])
    with pytest.raises(PortLLMError, match="router glider reads each row's request text"):
        ps.router.weights(ps, layer, layer_x, {})
    with pytest.raises(PortLLMError, match="for 1 rows, but the batch has 2"):
        ps.router.weights(ps, layer, layer_x, ps.router.rows(ps, [Request(text="a movie")]))
    assert ps.router.weights(ps, layer, layer_x, ps.router.rows(ps, [Request(patch=0), Request(text="x")])) is not None


def test_serve_routers_refuse_rather_than_answer_with_the_base(zoo):
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from portllm.routing import serve_router

    nothing = SimpleNamespace(patches={})
    for name in ("arrow-request", "description"):
        with pytest.raises(PortLLMError, match=f"router {name}: no patch is loaded to route to"):
            serve_router(name).check(nothing)
    arrow = serve_router("arrow-request")
    with pytest.raises(PortLLMError, match="no patch is loaded"):
        arrow.route(nothing, [SimpleNamespace(prompt_ids=[5, 6])])  # was: every request answered by the base
    # a patch whose update is zero (PEFT's own init: B = 0) has no direction to read: never choosable, so refused
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(zoo["base"]), LoraConfig(r=4, target_modules=["q_proj"]), "fresh"
    )
    model.load_adapter(str(zoo["patches"][0]), adapter_name="sst2")
    info = {a: SimpleNamespace(fingerprint=a, adapter=a, path=None) for a in ("fresh", "sst2")}
    eng = SimpleNamespace(patches=dict(info), model=model)
    with pytest.raises(PortLLMError, match=r"router arrow-request: patch\(es\) fresh have no LoRA update"):
        arrow.check(eng)
    del eng.patches["fresh"]
    arrow.check(eng)  # the readable patch alone routes
