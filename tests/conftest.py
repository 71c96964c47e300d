import os
from pathlib import Path

# the fixture builders (builders.py, tokenizer_parity.py) live here: scripts the tests start import them too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent),
                                                       os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # silence torchao's CUDA-only extension warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from builders import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised text-only Gemma 3 (1B style), fp32, with its tokenizer."""
    from builders import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-text"), tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_multimodal_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised multimodal Gemma 3 (4B style, small SigLIP tower), fp32, with its tokenizer."""
    from builders import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mm"), tokenizer_dir, multimodal=True, seed=1)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """Small local training data in both formats: plain text and chat messages (JSONL)."""
    import json

    from builders import sample_texts

    root = tmp_path_factory.mktemp("data")
    texts = sample_texts()
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:120]))
    chats = [{"messages": [{"role": "user", "content": f"Explain part {i}."},
                           {"role": "assistant", "content": t[:300]}]} for i, t in enumerate(texts[120:200])]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


@pytest.fixture(scope="session")
def qat_run(tmp_path_factory, sample_data):
    """Factory ``qat_run(model_dir, fmt, quantize_embeddings=False, *, steps=2, mixed_precision="no") -> Path``:
    the run directory the
    real trainer (``gemma3_qat.qat.train.train``) writes for ``model_dir`` on the sample text, once per argument
    set in the session. The export tests export these, never a checkpoint a test wrote its own way. Shared: copy
    the directory before changing anything in it."""
    runs = {}

    def make(model_dir, fmt, quantize_embeddings=False, *, steps=2, mixed_precision="no"):
        key = (str(model_dir), fmt, bool(quantize_embeddings), steps, mixed_precision)
        if key not in runs:
            from gemma3_qat.qat.train import TrainConfig, train

            out = tmp_path_factory.mktemp("qat-run") / "run"
            config = TrainConfig(model=str(model_dir), format=fmt, quantize_embeddings=quantize_embeddings,
                                 data=[str(sample_data / "text.jsonl")], seq_len=64, batch_size=2, micro_batch_size=2,
                                 steps=steps, lr=1e-3, warmup_steps=1, eval_every=100, eval_rows=2, save_every=100,
                                 mixed_precision=mixed_precision, output=str(out))
            runs[key] = train(config, log=lambda *_: None)
        return runs[key]

    return make
