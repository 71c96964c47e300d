"""What the exporters write, and refuse to write: every file next to an output obeys the output's overwrite rule
and is checked before anything is written; each ``--to`` refuses the other's flags; ``--dry-run`` writes nothing."""

import shutil

import pytest
from safetensors import safe_open

from gemma3_qat.errors import InputError, MissingFileError, OutputExistsError
from gemma3_qat.exporters import export, refuse_flags
from gemma3_qat.exporters.gguf import export_gguf
from gemma3_qat.exporters.safetensors import export_safetensors


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------- flags


def test_each_to_refuses_the_flags_of_the_other(qat_run, tiny_text_dir, tmp_path):
    for flags, flag in (({"layout": "compressed-tensors"}, "--layout"), ({"dtype": "bf16"}, "--dtype")):
        with pytest.raises(InputError, match=f"^{flag} is a --to safetensors option .* --to gguf"):
            export(tiny_text_dir, "gguf", tmp_path / "m.gguf", type="f16", log=None, **flags)
    run = qat_run(tiny_text_dir, "int4-block")
    for flags, flag in (({"type": "q8_0"}, "--type"), ({"lossy": True}, "--lossy"),
                        ({"embedding_type": "f16"}, "--embedding-type")):
        with pytest.raises(InputError, match=f"^{flag} is a --to gguf( / --to gemma-cpp)? option .* --to safetensors"):
            export(run, "safetensors", tmp_path / "out", log=None, **flags)
    for flags, flag in (({"layout": "sfp8"}, "--layout"), ({"lossy": True}, "--lossy"),
                        ({"embedding_type": "f16"}, "--embedding-type")):
        with pytest.raises(InputError, match=f"^{flag} is a --to (gguf|safetensors) option .* --to gemma-cpp"):
            refuse_flags("gemma-cpp", **flags)
    refuse_flags("gemma-cpp", type="sfp8", layout=None, lossy=False)  # its own flag, and flags not given
    # None / False: not given (what the CLI passes for a flag left out)
    gguf = export(tiny_text_dir, "gguf", tmp_path / "m.gguf", type="f16", embedding_type=None, layout=None,
                  dtype=None, dry_run=True, log=None)
    safetensors = export(run, "safetensors", tmp_path / "out", layout=None, dtype=None, type=None,
                         embedding_type=None, lossy=False, dry_run=True, log=None)
    assert gguf.tensors and (safetensors.layout, safetensors.dtype) == ("unquantized", "f32")
    assert listing(tmp_path) == []
    with pytest.raises(InputError, match="unknown --to 'onnx'; choose one of: gguf, safetensors, gemma-cpp"):
        export(run, "onnx")


# --------------------------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("fmt,layout,dtype", [("int4-block", "unquantized", "f16"),
                                               ("int4-channel", "compressed-tensors", None),
                                               ("sfp8", "sfp8", None)])
def test_safetensors_dry_run_writes_nothing_and_plans_exactly_what_is_written(qat_run, tiny_text_dir, tmp_path,
                                                                             fmt, layout, dtype):
    run = qat_run(tiny_text_dir, fmt, True)
    plan = export_safetensors(run, tmp_path / "out", layout=layout, dtype=dtype, dry_run=True, log=None)
    assert listing(tmp_path) == []
    written = export_safetensors(run, tmp_path / "out", layout=layout, dtype=dtype, log=None)
    assert written.path == plan.path == tmp_path / "out"
    stored = {s.name: s for t in plan.tensors for s in t.stored}
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(stored)
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert (tensor.dtype, tuple(tensor.shape)) == (stored[key].dtype, stored[key].shape), key
    assert plan.nbytes == sum(s.nbytes for s in stored.values())
    kinds = {t.kind for t in plan.tensors}
    assert kinds == {"unquantized": {"copy", "values"}, "compressed-tensors": {"copy", "values", "packed"},
                     "sfp8": {"copy", "codes"}}[layout]


def test_gguf_dry_run_writes_nothing(tiny_text_dir, tmp_path):
    plan = export_gguf(tiny_text_dir, tmp_path / "m.gguf", plain_type="q8_0", dry_run=True, log=None)
    assert plan.tensors and listing(tmp_path) == []


# --------------------------------------------------------------------------------------------- outputs


def test_gguf_refuses_a_directory_even_with_force(tiny_text_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="is a directory"):
        export_gguf(tiny_text_dir, tmp_path / "out", plain_type="f16", force=True, log=None)
    assert listing(tmp_path) == ["out"]


def test_gguf_never_replaces_a_file_beside_it_without_force(tiny_text_dir, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    with pytest.raises(OutputExistsError, match="notes.md already exists; pass --force"):
        export_gguf(tiny_text_dir, tmp_path / "notes.gguf", plain_type="f16", log=None)
    assert listing(tmp_path) == ["notes.md"] and notes.read_text() == "my notes\n"  # nothing written
    export_gguf(tiny_text_dir, tmp_path / "notes.gguf", plain_type="f16", model_card=False, log=None)
    assert notes.read_text() == "my notes\n"  # no card: nothing beside the GGUF to check
    export_gguf(tiny_text_dir, tmp_path / "notes.gguf", plain_type="f16", force=True, log=None)
    assert notes.read_text().startswith("# notes.gguf")


def test_gguf_checks_the_mmproj_file_before_writing_the_text_file(tiny_multimodal_dir, tmp_path):
    (tmp_path / "mmproj-m.gguf").write_text("someone else's\n")
    with pytest.raises(OutputExistsError, match="mmproj-m.gguf already exists"):
        export_gguf(tiny_multimodal_dir, tmp_path / "m.gguf", plain_type="f16", log=None)
    assert listing(tmp_path) == ["mmproj-m.gguf"]


@pytest.mark.parametrize("to", ["gguf", "safetensors"])
def test_missing_parents_are_refused_not_created(qat_run, tiny_text_dir, tmp_path, to):
    out = tmp_path / "no" / "such" / "parent" / "x"
    with pytest.raises(MissingFileError, match="parent does not exist; create it first"):
        if to == "gguf":
            export_gguf(tiny_text_dir, out.with_suffix(".gguf"), plain_type="f16", log=None)
        else:
            export_safetensors(qat_run(tiny_text_dir, "int4-block"), out, log=None)
    assert listing(tmp_path) == []


def test_safetensors_refuses_a_file_even_with_force(qat_run, tiny_text_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qat_run(tiny_text_dir, "int4-block"), run)
    (tmp_path / "out").write_text("not a directory\n")
    with pytest.raises(OutputExistsError, match="is a file"):
        export_safetensors(run, tmp_path / "out", force=True, log=None)
    assert (tmp_path / "out").read_text() == "not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporary directory left
    export_safetensors(run, tmp_path / "dir", log=None)
    export_safetensors(run, tmp_path / "dir", force=True, log=None)  # a directory replaces a directory
    assert (tmp_path / "dir" / "model.safetensors").exists()
