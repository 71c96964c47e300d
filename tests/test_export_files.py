"""What users get on disk: sfp8 exports hold the dtypes the memory report predicts and load exactly or not at all;
exported files and directories are as readable as the umask says (like ``cp``), not 0600."""

import os
import shutil
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gemma3_qat.checkpoint import atomic_directory, atomic_file
from gemma3_qat.errors import CorruptFileError
from gemma3_qat.exporters.safetensors import SafetensorsExportError, export_safetensors, load_sfp8, load_sfp8_model
from gemma3_qat.formats import get_format
from gemma3_qat.models import quantizable_linears


@pytest.fixture
def sfp8_export(qat_run, tiny_text_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qat_run(tiny_text_dir, "sfp8", False), ckpt)
    export_safetensors(ckpt, tmp_path / "out", layout="sfp8", log=None)
    return ckpt, tmp_path / "out"


def test_sfp8_layout_stores_unquantized_tensors_at_the_predicted_dtype(sfp8_export):
    from gemma3_qat import memory as mem

    ckpt, out = sfp8_export
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        nbytes = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert dtypes["model.embed_tokens.weight"] == "BF16"  # not the fp32 latent copy
    assert {d for k, d in dtypes.items() if k.endswith("norm.weight")} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.endswith(".sfp8_codes")} == {"U8"}
    predicted = mem.weight_bytes(mem.model_spec(str(ckpt)), mem.WeightOptions("sfp8", "compact"))
    assert nbytes == predicted.total  # the memory report's compact sfp8 bytes, exactly


def test_load_sfp8_model_restores_every_weight_and_refuses_a_partial_export(sfp8_export, tmp_path):
    ckpt, out = sfp8_export
    state = load_sfp8(out)
    model = load_sfp8_model(out)
    loaded = model.state_dict()
    for name, value in state.items():
        assert torch.equal(loaded[name], value.float()), name
    from gemma3_qat.evaluate import load_for_eval

    student = load_for_eval(ckpt)  # the fake-quant student: its SFP values are the file's, bit for bit
    for name, linear in quantizable_linears(student).items():
        assert torch.equal(loaded[name + ".weight"], get_format("sfp8").fake_quantize_values(linear.weight)), name

    raw = load_file(str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    del raw["model.layers.0.input_layernorm.weight"]
    save_file(raw, str(out / "model.safetensors"), metadata=metadata)
    with pytest.raises(CorruptFileError, match=r"1 weights missing from the files \(e\.g\. model\.layers\.0\.input"):
        load_sfp8_model(out)
    del raw["model.layers.0.mlp.up_proj.sfp8_scale"]
    save_file(raw, str(out / "model.safetensors"), metadata=metadata)
    with pytest.raises(CorruptFileError, match="up_proj.sfp8_codes has no .*sfp8_scale"):
        load_sfp8(out)


def test_load_sfp8_refuses_other_layouts(qat_run, tiny_text_dir, tmp_path):
    shutil.copytree(qat_run(tiny_text_dir, "sfp8", False), tmp_path / "ckpt")
    export_safetensors(tmp_path / "ckpt", tmp_path / "plain", layout="unquantized", log=None)
    with pytest.raises(SafetensorsExportError, match="is not an sfp8 export .*from_pretrained"):
        load_sfp8(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory: pass an sfp8 export"):
        load_sfp8(tmp_path / "ckpt" / "nothing")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "a").write_text("a")
        (tmp_path / "ref").write_bytes(b"x")  # what open() / cp make
        (tmp_path / "refdir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "f.bin") == mode(tmp_path / "ref") == 0o666 & ~umask
    assert mode(tmp_path / "d") == mode(tmp_path / "refdir") == 0o777 & ~umask
    assert mode(tmp_path / "d" / "a") == 0o666 & ~umask


def test_exported_gguf_and_safetensors_are_world_readable_at_umask_022(qat_run, tiny_text_dir, tmp_path):
    from gemma3_qat.exporters.gguf import export_gguf

    shutil.copytree(qat_run(tiny_text_dir, "int4-block", False), tmp_path / "ckpt")
    old = os.umask(0o022)
    try:
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
        export_safetensors(tmp_path / "ckpt", tmp_path / "st", log=None)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "st").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "st").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_qat_checkpoints_are_world_readable_at_umask_022(qat_run, tiny_text_dir, tmp_path):
    from gemma3_qat.checkpoint import QAT_JSON, QATMetadata, write_qat_checkpoint
    from gemma3_qat.sources import load_gemma3

    run = qat_run(tiny_text_dir, "int4-block", False)
    model = load_gemma3(str(run), dtype=torch.float32)
    (tmp_path / "ckpt").mkdir()
    old = os.umask(0o022)
    try:
        write_qat_checkpoint(model, tmp_path / "ckpt", QATMetadata.read(run / QAT_JSON), run)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes  # safetensors alone makes 0600
