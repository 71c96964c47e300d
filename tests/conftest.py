import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # silence torchao's CUDA-only extension warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from gemma3_qat.embedded.tiny import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised text-only Gemma 3 (1B style), fp32, with its tokenizer."""
    from gemma3_qat.embedded.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-text"), tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_multimodal_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised multimodal Gemma 3 (4B style, small SigLIP tower), fp32, with its tokenizer."""
    from gemma3_qat.embedded.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mm"), tokenizer_dir, multimodal=True, seed=1)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """Small local training data in both formats: plain text and chat messages (JSONL)."""
    import json

    from gemma3_qat.embedded.tiny import sample_texts

    root = tmp_path_factory.mktemp("data")
    texts = sample_texts()
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:120]))
    chats = [{"messages": [{"role": "user", "content": f"Explain part {i}."},
                           {"role": "assistant", "content": t[:300]}]} for i, t in enumerate(texts[120:200])]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root
