"""What the embedding's storage type costs on its own, beside the matmuls at Q4_0, in one run.

    python benchmarks/embedding_cost.py [--windows 64]

On the embedded default model (PyTorch, fp32 forward), the 64 validation windows benchmarks/quality.py scores:
KL(teacher || candidate) of the teacher with only its embedding (tied to the LM head) quantized and dequantized by
the gguf package's Q8_0 and Q4_0, and of the teacher with only its matmuls fake-quantized to int4-block (Q4_0).
It is the measurement behind the default recipe's ``quantize_embeddings: false`` with the GGUF exporter's Q8_0
embedding.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gemma3_qat.evaluate import compare_logits, evaluation_windows, model_logits  # noqa: E402
from gemma3_qat.sources import load_gemma3, resolve_model  # noqa: E402
from gemma3_qat.qat.prepare import prepare  # noqa: E402


def through_gguf(x: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    a = x.detach().numpy().astype(np.float32)
    return torch.from_numpy(gguf.dequantize(gguf.quantize(a, qtype), qtype).reshape(a.shape).astype(np.float32))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=64)
    args = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    windows, labels, data = evaluation_windows(tokenizer, seq_len=256, max_windows=args.windows)
    teacher = list(model_logits(load_gemma3(None, dtype=torch.float32).eval(), windows))
    print(f"# embedded default model, {len(windows)} windows x 256 tokens of {data}; KL to the fp32 teacher")
    for label, qtype in (("embedding only, Q8_0", gguf.GGMLQuantizationType.Q8_0),
                         ("embedding only, Q4_0", gguf.GGMLQuantizationType.Q4_0), ("matmuls only, Q4_0", None)):
        model = load_gemma3(None, dtype=torch.float32).eval()
        if qtype is None:
            prepare(model, "int4-block")
        else:
            embedding = model.get_input_embeddings().weight
            with torch.no_grad():
                embedding.copy_(through_gguf(embedding, qtype))
        kl = compare_logits(list(model_logits(model, windows)), teacher, labels)[1]
        print(f"{label:<22} KL {kl:.5f}", flush=True)


if __name__ == "__main__":
    main()
