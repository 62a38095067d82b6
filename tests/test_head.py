"""The head run only where a loss reads it gives transformers' own loss and gradients, and the same
log-likelihoods as the full logits, on Llama and Gemma-3 (final-logit softcapping, tied head)."""

from __future__ import annotations

import pytest
import torch

from portllm.head import lm_loss, logits_at, predicting
from portllm.repair.distill import option_logprobs
from portllm.sft import completion_logliks
from portllm.train import collate
from tiny import tiny_config


def _gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=8,
        final_logit_softcapping=30.0, pad_token_id=3, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg)


def _llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_config())


def _lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def _batch(seed: int = 0):
    """Ragged rows, each with its labelled answer at a different place (some rows with two answer spans)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, spans in [(12, [(9, 11)]), (20, [(4, 6), (17, 19)]), (7, [(5, 6)]), (16, [(14, 15)])]:
        x = torch.randint(4, 96, (n,), generator=g).tolist()
        y = [-100] * n
        for a, b in spans:
            y[a:b] = x[a:b]
        rows.append((x, y))
    return rows


@pytest.fixture(params=["llama", "gemma3"])
def model(request):
    torch.manual_seed(0)
    return _lora(_llama() if request.param == "llama" else _gemma())


def test_loss_and_grads_equal_transformers(model):
    ids, labels, mask = collate(_batch(), 3, "cpu")
    model.train()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours = lm_loss(model, ids, mask, labels)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_head_runs_only_where_a_label_is_predicted(model):
    ids, labels, mask = collate(_batch(), 3, "cpu")
    pos = predicting(labels)
    assert pos.tolist() == [3, 4, 8, 9, 13, 16, 17]  # every answer token's predecessor, nothing else
    assert logits_at(model, ids, mask, pos).shape == (4, len(pos), 96)


def test_completion_logliks_equal_full_logits(model):
    rows = _batch(1)
    ids, labels, mask = collate(rows, 3, "cpu")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    want = []
    for j, (_, y) in enumerate(rows):
        t = [(i, tok) for i, tok in enumerate(y[1:]) if tok != -100]
        want.append(sum(float(logp[j, i, tok]) for i, tok in t) / len(t))
    assert completion_logliks(model, rows, 3) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_option_logprobs_equal_full_logits(model):
    g = torch.Generator().manual_seed(2)

    def toks(n):
        return torch.randint(4, 96, (n,), generator=g).tolist()

    items = [
        ([(toks(9), toks(2)), (toks(9), toks(1))], [2.0, 1.0]),
        ([(toks(4), toks(3)), (toks(15), toks(1))], [1.0, 1.0]),
    ]
    got = option_logprobs(model, 3, items)
    want = []
    with torch.no_grad():
        for options, norms in items:
            scores = []
            for (c, x), norm in zip(options, norms):
                lp = torch.log_softmax(model(input_ids=torch.tensor([c + x])).logits[0].float(), -1)
                scores.append(sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(x)) / norm)
            want.append(torch.log_softmax(torch.tensor(scores), -1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b, rtol=1e-4, atol=1e-5)


def test_a_forward_without_logits_to_keep_is_sliced():
    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    torch.manual_seed(0)
    inner = _llama()
    ids, labels, mask = collate(_batch(), 3, "cpu")
    pos = predicting(labels)
    torch.testing.assert_close(logits_at(Plain(inner), ids, mask, pos), logits_at(inner, ids, mask, pos))
