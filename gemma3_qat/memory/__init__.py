"""How much memory a Gemma 3 model takes: parameters, weight bytes per format, KV cache, training, Table 3.

Everything is computed from shapes, with the same byte arithmetic as our exporters: GGUF type sizes come from the
``gguf`` package's ``GGML_QUANT_SIZES`` (the table that mirrors ggml's C code), model shapes from
``gemma3_qat.models`` and tensor names from the GGUF exporter's own name mapping, so that a prediction can be
checked against a written file tensor by tensor (``measure_gguf``). Units: GB = 1e9 bytes (Table 3 of the Gemma 3
report uses decimal GB; GiB fits none of its columns).

One module per concept; this package re-exports their public names (``from gemma3_qat import memory as mem``):

* ``spec``      what a model is: a built-in size, an HF config or directory; its tensors; ``param_counts``
* ``weights``   ``weight_bytes``: bytes by group for a format in a container: ``gguf`` (llama.cpp, what our
                exporter writes) or ``compact`` (compressed-tensors / gemma.cpp / safetensors: int4 at 4 bits +
                scales, SFP8 at 1 byte + one scale per tensor)
* ``kv``        ``kv_cache``: KV cache per layer type at any context, batch and KV dtype; llama.cpp's cell counts
* ``table3``    the report's Table 3: the published cells, our reproduction under one documented convention, and
                the first-principles value
* ``training``  ``training_memory``: teacher, student, gradients, AdamW, activations, logits; FSDP per-GPU figures
* ``measure``   ``measure_gguf``: a GGUF file against the prediction, tensor by tensor, header and padding apart
* ``baseline``  ``make_baseline`` / ``check_baseline``: the first-principles numbers tracked in CI
* ``views``     the reports ``gemma3-qat memory`` prints (``MemoryQuery(...).report()``), rendered by
                ``gemma3_qat.report``
"""

from gemma3_qat.memory.base import (
    CONTAINERS,
    EMBEDDING_CHOICES,
    GB,
    GROUPS,
    KV_DTYPES,
    qat_formats,
    TABLE_FORMATS,
    VISION_CHOICES,
    weight_formats,
    MemoryInputError,
)
from gemma3_qat.memory.baseline import (
    BASELINE_MODELS,
    Drift,
    baseline_cells,
    check_baseline,
    make_baseline,
    write_baseline,
)
from gemma3_qat.memory.kv import KVCache, LlamaCppKV, kv_bytes_per_token_layer, kv_cache
from gemma3_qat.memory.measure import GGUFMeasurement, TensorComparison, measure_gguf
from gemma3_qat.memory.spec import (
    ModelSpec,
    ParamCounts,
    TensorSpec,
    VisionSpec,
    hf_config,
    model_spec,
    model_tensors,
    param_counts,
    spec_from_directory,
    spec_from_hf_config,
    spec_from_shape,
)
from gemma3_qat.memory.table3 import (
    PUBLISHED_TABLE3,
    TABLE3_CONTEXT,
    TABLE3_HOMES,
    PaperConvention,
    Table3,
    Table3Cell,
    table3,
)
from gemma3_qat.memory.training import TrainingMemory, TrainingOptions, activation_bytes, logit_bytes, training_memory
from gemma3_qat.memory.views import (
    PLOT_CONTEXTS,
    MemoryQuery,
    check_report,
    measure_report,
    model_report,
    overview_report,
    plot,
    table3_report,
    training_report,
    update_baseline_report,
)
from gemma3_qat.memory.weights import (
    StoredTensor,
    WeightBytes,
    WeightOptions,
    embedding_for,
    stored_tensors,
    weight_bytes,
)
from gemma3_qat.report import Report, Table, render, to_json

__all__ = [
    "CONTAINERS",
    "EMBEDDING_CHOICES",
    "GB",
    "GROUPS",
    "KV_DTYPES",
    "qat_formats",
    "TABLE_FORMATS",
    "VISION_CHOICES",
    "weight_formats",
    "MemoryInputError",
    "BASELINE_MODELS",
    "Drift",
    "baseline_cells",
    "check_baseline",
    "make_baseline",
    "write_baseline",
    "KVCache",
    "LlamaCppKV",
    "kv_bytes_per_token_layer",
    "kv_cache",
    "GGUFMeasurement",
    "TensorComparison",
    "measure_gguf",
    "ModelSpec",
    "ParamCounts",
    "TensorSpec",
    "VisionSpec",
    "hf_config",
    "model_spec",
    "model_tensors",
    "param_counts",
    "spec_from_directory",
    "spec_from_hf_config",
    "spec_from_shape",
    "PUBLISHED_TABLE3",
    "TABLE3_CONTEXT",
    "TABLE3_HOMES",
    "PaperConvention",
    "Table3",
    "Table3Cell",
    "table3",
    "TrainingMemory",
    "TrainingOptions",
    "activation_bytes",
    "logit_bytes",
    "training_memory",
    "PLOT_CONTEXTS",
    "MemoryQuery",
    "check_report",
    "measure_report",
    "model_report",
    "overview_report",
    "plot",
    "table3_report",
    "training_report",
    "update_baseline_report",
    "StoredTensor",
    "WeightBytes",
    "WeightOptions",
    "embedding_for",
    "stored_tensors",
    "weight_bytes",
    "Report",
    "Table",
    "render",
    "to_json",
]
