"""Real llama.cpp (llama-cpp-python, built portable): our GGUF files load, tokenize and compute like PyTorch.

Uses the embedded default model: a trained teacher, so that logits are far from flat and agreement means something.
"""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.llama, pytest.mark.slow]

from gemma3_qat.assets import default_model_path  # noqa: E402
from gemma3_qat.evaluate import EvalError, LlamaCppModel, evaluate, evaluation_windows, pytorch_logits  # noqa: E402
from gemma3_qat.exporters.gguf import export_gguf  # noqa: E402
from gemma3_qat.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def teacher_dir():
    return default_model_path()


@pytest.fixture(scope="module")
def windows(teacher_dir):
    ids, labels, _ = evaluation_windows(load_tokenizer(teacher_dir), seq_len=256, max_windows=12)
    return ids, labels


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, float]:
    """mean KL(a || b), top-1 agreement, max |logit difference| over all positions."""
    a, b = torch.cat(a).float(), torch.cat(b).float()
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    kl = float((la.exp() * (la - lb)).sum(-1).mean())
    return kl, float((a.argmax(-1) == b.argmax(-1)).float().mean()), float((a - b).abs().max())


def llama_logits(path, ids):
    with LlamaCppModel(path, n_ctx=ids.shape[1]) as m:
        return [torch.from_numpy(m.logits(w.tolist())) for w in ids]


def test_plain_f32_export_matches_transformers(teacher_dir, tmp_path, windows):
    ids, _ = windows
    export_gguf(teacher_dir, tmp_path / "f32.gguf", plain_type="f32", log=None)
    kl, top1, max_diff = compare(list(pytorch_logits(teacher_dir, ids)), llama_logits(tmp_path / "f32.gguf", ids))
    print(f"F32 export vs transformers: max |dlogit| {max_diff:.2e}, KL {kl:.2e}, top-1 {100 * top1:.2f}%")
    assert max_diff <= 1e-2 and top1 >= 0.999


@pytest.mark.parametrize("fmt", ["int4-block", "int4-channel", "sfp8"])
def test_quantized_export_matches_the_fake_quant_student(qat_run, teacher_dir, tmp_path, windows, fmt):
    ids, _ = windows
    shutil.copytree(qat_run(teacher_dir, fmt, fmt != "sfp8", steps=0), tmp_path / "ckpt")  # the trainer's PTQ
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
    student = list(pytorch_logits(tmp_path / "ckpt", ids))
    kl, top1, max_diff = compare(student, llama_logits(tmp_path / "m.gguf", ids))
    print(f"{fmt}: llama.cpp vs PyTorch fake-quant student: KL {kl:.2e}, top-1 {100 * top1:.2f}%, "
          f"max |dlogit| {max_diff:.3f}")
    # llama.cpp's CPU kernels round activations to 8 bits for Q4_0 matmuls: close, not identical
    assert kl <= 1e-3 and top1 >= 0.97


def tokenizer_strings(tok) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "  ", "\t", "\n", "(", ")", ":", "é", "ü", "中文", "日本語",
             "Ω", "🙂", "0", "42", "3.14159", "-7", "x_1", "__init__", "<start_of_turn>", "<end_of_turn>", "<bos>",
             "<eos>", "<pad>", "<mask>", "user", "model", "    ", "\n\n", "'''", '"', "#", "@decorator", "λ"]
    out = ["", " ", "  leading spaces", "trailing   ", "\n\n\n", "tabs\t\tand\tspaces", "1234567890",
           "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn>"]
    for n in range(190):
        k = int(rng.integers(1, 12))
        out.append("".join(str(rng.choice(words)) + (" " if rng.random() < 0.5 else "") for _ in range(k)))
    chats = [[{"role": "user", "content": "Write a loop."}, {"role": "assistant", "content": "for i in range(3):\n    print(i)"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 = ?"}]]
    out += [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return out


def test_tokenizer_parity_with_llama_cpp(teacher_dir, tmp_path):
    tok = load_tokenizer(teacher_dir)
    export_gguf(teacher_dir, tmp_path / "m.gguf", plain_type="f16", log=None)
    strings = tokenizer_strings(tok)
    assert len(strings) >= 200
    with LlamaCppModel(tmp_path / "m.gguf", n_ctx=64) as m:
        mismatches = [s for s in strings if tok(s).input_ids != m.tokenize(s)]
        assert m.tokenize("<start_of_turn>") == [tok.bos_token_id, tok.convert_tokens_to_ids("<start_of_turn>")]
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, e.g. {mismatches[:3]!r}"


def test_eval_agrees_across_backends_and_refuses_a_foreign_tokenizer(qat_run, teacher_dir, tmp_path,
                                                                    tiny_text_dir):
    shutil.copytree(qat_run(teacher_dir, "int4-block", False, steps=0), tmp_path / "ckpt")  # teacher in its qat.json
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
    result = evaluate([tmp_path / "ckpt", tmp_path / "m.gguf"], max_windows=8, log=lambda *_: None)
    torch_row, gguf_row = result.results
    print(result.table())
    assert abs(torch_row.kl_mean - gguf_row.kl_mean) <= 1e-3
    export_gguf(tiny_text_dir, tmp_path / "foreign.gguf", plain_type="f32", log=None)
    with pytest.raises(EvalError, match="tokenizer differs"):
        evaluate([tmp_path / "foreign.gguf"], teacher=str(teacher_dir), max_windows=2, log=lambda *_: None)
