"""Pretrain the embedded default model: a tiny Gemma 3 trained from scratch on the standard library.

    gemma3-qat pretrain-default --recipe recipes/default-pretrain.yaml --output gemma3_qat/assets/default-model

Reproducible: fixed seeds, the corpus file list recorded with hashes, the validation split shipped. Plain
next-token loss; AdamW, warmup + cosine; one process on the CPU. Writes the checkpoint (bf16 safetensors, config,
tokenizer incl. ``tokenizer.model``), the data assets and ``MODEL_CARD.md`` with the measured numbers.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from gemma3_qat.errors import InputError


@dataclass
class PretrainRecipe:
    vocab_size: int = 4096
    hidden: int = 256
    ffn: int = 512
    layers: int = 6
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 64
    sliding_window: int = 64  # smaller than seq_len: the local layers' window is exercised
    context: int = 2048
    seq_len: int = 256
    batch: int = 16
    steps: int = 1500
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    chat_fraction: float = 0.1  # share of chat-templated samples mixed into pretraining
    eval_every: int = 250
    seed: int = 0
    threads: int = 2

    @classmethod
    def load(cls, path: str | Path) -> "PretrainRecipe":
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown recipe keys {sorted(unknown)} in {path}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def _pack(token_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    flat = [t for ids in token_lists for t in ids]
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def unigram_perplexity(train_ids: torch.Tensor, valid_ids: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one unigram model fitted on the training tokens (the baseline to beat)."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[valid_ids.flatten()].mean().item())


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    from gemma3_qat.qat.distill import token_metrics  # the one definition of NLL (and KL, top-1)

    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        nll = token_metrics(model(input_ids=x).logits[:, :-1], x[:, 1:])["nll"].sum()
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def pretrain_default(recipe: PretrainRecipe, output: Path, log=print) -> dict:
    from transformers import Gemma3ForCausalLM

    from gemma3_qat.embedded import corpus, samples
    from gemma3_qat.embedded.sentencepiece import train_sentencepiece
    from gemma3_qat.models import Architecture, hf_config
    from gemma3_qat.tokenizer import load_tokenizer

    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    t0 = time.time()
    output = Path(output)
    work = output.with_name(output.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)

    docs = corpus.stdlib_documents()
    train_docs, valid_docs = corpus.split(docs)
    corpus.write_manifest(docs, work / "data" / "stdlib-manifest.json")
    with gzip.open(work / "data" / "validation.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in valid_docs:
            f.write(json.dumps({"path": d.path, "text": d.text}) + "\n")
    chat = samples.chat_samples(train_docs, 4000, seed=recipe.seed)
    for name, rows in (("sample-text.jsonl", samples.text_samples(train_docs, 1500, seed=recipe.seed)),
                       ("sample-chat.jsonl", chat[:300])):
        (work / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"corpus: {len(train_docs)} train / {len(valid_docs)} validation files")

    chunks = [d.text[i:i + 4000] for d in train_docs for i in range(0, len(d.text), 4000)]
    train_sentencepiece(chunks, work, vocab_size=recipe.vocab_size)
    tok = load_tokenizer(work)
    encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos, eos = tok.bos_token_id, tok.eos_token_id
    train_lists = [[bos, *ids, eos] for ids in encode([d.text for d in train_docs])]
    chat_texts = [tok.apply_chat_template(c["messages"], tokenize=False) for c in chat[300:]]
    chat_lists = [ids + [eos] for ids in encode(chat_texts)]  # the template already starts with <bos>
    valid_lists = [[bos, *ids, eos] for ids in encode([d.text for d in valid_docs])]
    train = _pack(train_lists, recipe.seq_len)
    chat_windows = _pack(chat_lists, recipe.seq_len)
    valid = _pack(valid_lists, recipe.seq_len)
    log(f"tokens: train {train.numel():,} + chat {chat_windows.numel():,}, validation {valid.numel():,}")

    # the architecture record of the default model: no RoPE scaling, query_pre_attn_scalar = head_dim (what
    # llama.cpp applies whatever the config says), the 5 local : 1 global pattern
    arch = Architecture("default", recipe.layers, recipe.hidden, recipe.ffn, recipe.heads, recipe.kv_heads,
                        recipe.head_dim, recipe.sliding_window, recipe.context, len(tok),
                        source="gemma3_qat.embedded.pretrain", query_pre_attn_scalar=recipe.head_dim)
    config = hf_config(arch)
    model = Gemma3ForCausalLM(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(recipe.seed)
    n_chat = round(recipe.batch * recipe.chat_fraction)
    history = []
    for step in range(recipe.steps):
        rows = torch.randint(len(train), (recipe.batch - n_chat,), generator=gen)
        crow = torch.randint(len(chat_windows), (n_chat,), generator=gen)
        x = torch.cat([train[rows], chat_windows[crow]])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}/{recipe.steps} loss {sum(history[-50:]) / 50:.3f} "
                f"lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
        if (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps:
            log(f"  validation perplexity {perplexity(model, valid[:64]):.2f}")

    model.eval()
    results = {
        "parameters": n_params,
        "train_tokens_seen": recipe.steps * recipe.batch * recipe.seq_len,
        "final_train_loss": sum(history[-50:]) / min(50, len(history)),
        "validation_perplexity": perplexity(model, valid),
        "unigram_validation_perplexity": unigram_perplexity(train, valid, len(tok)),
        "validation_tokens": valid.numel(),
        "train_seconds": time.time() - t0,
    }
    prompt = "def read_config(path):\n    \"\"\"Read a JSON configuration file.\"\"\"\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=80, do_sample=False)
    results["greedy_prompt"] = prompt
    results["greedy_completion"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    model.to(torch.bfloat16).save_pretrained(work)
    (work / "pretrain-recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
    (work / "pretrain-results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(json.dumps({k: v for k, v in results.items() if k != "greedy_completion"}, indent=2))
    if output.exists():
        shutil.rmtree(output)
    work.rename(output)
    write_model_card(output)
    return results


@torch.no_grad()
def ptq_sensitivity(model_dir: Path, windows: int = 64) -> dict:
    """Teacher vs post-training quantization (matmul weights only, no training) on the shipped validation split:
    perplexity and mean KL(teacher || PTQ) per format. QAT needs a teacher that quantization visibly hurts."""
    from gemma3_qat.evaluate import compare_logits, evaluation_windows, pytorch_logits
    from gemma3_qat.formats import FORMATS
    from gemma3_qat.sources import load_gemma3
    from gemma3_qat.qat.prepare import prepare
    from gemma3_qat.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids, labels, _ = evaluation_windows(tok, seq_len=256, max_windows=windows)
    teacher = list(pytorch_logits(model_dir, ids))
    out = {"teacher": {"perplexity": compare_logits(iter(teacher), teacher, labels)[0], "kl": 0.0}}
    for name in FORMATS:
        model = load_gemma3(str(model_dir), dtype=torch.float32).eval()
        prepare(model, name)
        logits = (model(input_ids=ids[i:i + 8]).logits for i in range(0, len(ids), 8))
        ppl, kl, _, top1, _ = compare_logits((row for batch in logits for row in batch), teacher, labels)
        out[name] = {"perplexity": ppl, "kl": kl, "top1": top1}
    return out


def write_model_card(model_dir: Path) -> Path:
    """MODEL_CARD.md from the recorded recipe and results, plus the PTQ sensitivity measured now."""
    model_dir = Path(model_dir)
    r = json.loads((model_dir / "pretrain-results.json").read_text())
    recipe = (model_dir / "pretrain-recipe.yaml").read_text()
    manifest = json.loads((model_dir / "data" / "stdlib-manifest.json").read_text())
    n_train = sum(1 for f in manifest["files"] if f["split"] == "train")
    n_valid = len(manifest["files"]) - n_train
    sens = ptq_sensitivity(model_dir)
    size = (model_dir / "model.safetensors").stat().st_size
    rows = "\n".join(f"| {k} | {v['perplexity']:.3f} | {v['kl']:.4f} |" for k, v in sens.items())
    card = f"""# gemma3-qat embedded default model

A tiny Gemma 3 trained from scratch so that `gemma3-qat` runs end to end with no download and no GPU, and so that
quality checks have a teacher whose predictions mean something.

## Architecture
Gemma 3 rules (transformers `Gemma3ForCausalLM`): 6 layers, layers 0-4 sliding-window (window
{yaml.safe_load(recipe)['sliding_window']}) and layer 5 global, QK-norm, tied embeddings, RoPE base 1e4 local / 1e6 global,
`query_pre_attn_scalar = head_dim`. {r['parameters']:,} parameters, stored in bf16 ({size / 1e6:.1f} MB).
Tokenizer: SentencePiece BPE, {yaml.safe_load(recipe)['vocab_size']} pieces, byte fallback, Gemma's special ids
(`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4) and control tokens `<start_of_turn>`, `<end_of_turn>`, Gemma 3's
chat template.

## Data
The Python {manifest['python']} standard library of the interpreter that built it (PSF licence): {n_train} train
and {n_valid} validation files, split by top-level module ({manifest['validation_rule']}). The file list with
SHA-256 hashes is `data/stdlib-manifest.json`; the validation split itself is `data/validation.jsonl.gz`, so results
are comparable on any machine. 10% of each batch is chat-templated docstring Q&A from the train split
(`data/sample-chat.jsonl` holds 300 of them; `data/sample-text.jsonl` 1,500 text excerpts of 1,500 characters: the bundled sample data, mixed 0.8 text / 0.2 chat by default).

## Training
Plain next-token loss, AdamW (betas 0.9/0.95), warmup + cosine, gradient clipping 1.0, one process, 2 CPU threads:

```yaml
{recipe.strip()}
```

| | |
|---|---|
| tokens seen | {r['train_tokens_seen']:,} |
| training time | {r['train_seconds'] / 60:.0f} min on 2 CPU cores (shared with other work while it ran) |
| final training loss (mean of the last 50 steps) | {r['final_train_loss']:.3f} |
| validation perplexity ({r['validation_tokens']:,} tokens) | **{r['validation_perplexity']:.2f}** |
| unigram baseline perplexity, same split and tokens | {r['unigram_validation_perplexity']:.2f} |

Rebuild from a clean checkout (same quality; the exact bits depend on the standard library's version):
`gemma3-qat pretrain-default --recipe recipes/default-pretrain.yaml --output gemma3_qat/assets/default-model --force`

## Greedy generation (code prompt)
```python
{r['greedy_prompt']}{r['greedy_completion']}
```

## Sensitivity to quantization (why it is a useful teacher)
Post-training quantization of the matmul weights (embedding unquantized), no training, on 64 windows of 256 tokens
of the validation split (`gemma3_qat.embedded.pretrain.ptq_sensitivity`):

| model | perplexity | mean KL(teacher ‖ model) |
|---|---|---|
{rows}
"""
    path = model_dir / "MODEL_CARD.md"
    path.write_text(card)
    return path
