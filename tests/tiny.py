"""Tiny random Llama-style bases, tokenizers and LoRA adapters built in code for unit tests."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def make_tokenizer(vocab_size: int, rename: int = 0, template: str | None = "{{ messages }}"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    for i in range(rename):  # change some token strings (a "new tokenizer")
        words[len(SPECIALS) + i] = f"x{i}"
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if template:
        tok.chat_template = template
    return tok


def make_bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in milliseconds: encodes any text, like real LLM tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [
        "The movie was great and the actors were wonderful.",
        "Question: Is this sentence positive or negative?",
        "Answer: yes no True False positive negative",
        "Sarah was a much better surgeon than Maria so she won.",
        "Janet has 16 eggs and sells 9 of them for $2 each. #### 18",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_config(vocab_size: int = 96, hidden: int = 32, layers: int = 2, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **kw,
    )


def make_base(
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_rename: int = 0,
    template: str | None = "{{ messages }}",
    max_shard_size: str | None = None,
    bpe: bool = False,
    **cfg,
) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(**cfg)
    model = LlamaForCausalLM(config).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    tok = (
        make_bpe_tokenizer(config.vocab_size) if bpe else make_tokenizer(config.vocab_size, tokenizer_rename, template)
    )
    tok.save_pretrained(out)
    return Path(out)


def evolve(src: Path, out: Path, eps: float = 0.02, seed: int = 1) -> Path:
    """θ' = θ + a relative perturbation of every matrix: a stand-in for continued pretraining."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * eps * p.float().std().to(p.dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return Path(out)


def make_adapter(base: Path, out: Path, r: int = 4, alpha: int = 8, seed: int = 0, target="all-linear", **kw) -> Path:
    """A PEFT LoRA adapter with non-zero B (init_lora_weights=False), so the update is not a no-op."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=target, init_lora_weights=False, **kw)
    )
    with torch.no_grad():  # PEFT's random B is small; make the update clearly visible
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(10)
    peft_model.save_pretrained(out)
    return Path(out)


POS = ["good", "great", "fine", "lovely", "superb"]
NEG = ["bad", "awful", "boring", "poor", "dull"]


def sentiment_data(data: Path, n_train: int = 64, n_eval: int = 24, seed: int = 0, text: bool = False) -> Path:
    """A data directory with a toy SST-2 (sst2/train.tsv, sst2/test.tsv) a tiny model can learn;
    with `text`, also the plain-text files the `text` corpus and held-out KL read."""
    import random

    rng = random.Random(seed)

    def rows(n: int) -> str:
        out = []
        for _ in range(n):
            y = rng.randint(0, 1)
            out.append(f"the movie was {rng.choice(POS if y else NEG)} .\t{y}")
        return "sentence\tlabel\n" + "\n".join(out) + "\n"

    (data / "sst2").mkdir(parents=True, exist_ok=True)
    (data / "sst2" / "train.tsv").write_text(rows(n_train))
    (data / "sst2" / "test.tsv").write_text(rows(n_eval))
    if text:
        words = POS + NEG + ["the", "movie", "was", "."]
        body = "\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(120))
        for f in ("wikitext-2/valid.txt", "wikitext-2/test.txt", "tinyshakespeare/input.txt"):
            (data / "text" / f).parent.mkdir(parents=True, exist_ok=True)
            (data / "text" / f).write_text(body)
    return data
