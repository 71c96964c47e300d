"""The KV cache: exact bytes per layer type at any context, batch and dtype; and llama.cpp's cell rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma3_qat.memory.base import KV_DTYPES, MemoryInputError, _positive, _type_bytes
from gemma3_qat.memory.spec import ModelSpec, model_spec


@dataclass
class KVCache:
    """KV cache bytes: global layers hold the whole context, local (sliding) layers min(context, window)."""

    model: str
    context: int
    batch: int
    dtype: str
    global_layers: int
    local_layers: int
    window: int
    bytes_per_token_layer: int  # K and V of one token in one layer
    global_bytes: int
    local_bytes: int
    every_layer_global: int  # the same context with no sliding window (llama.cpp swa_full=True)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.global_bytes + self.local_bytes

    @property
    def local_tokens(self) -> int:
        return min(self.context, self.window)


def kv_bytes_per_token_layer(spec: ModelSpec, dtype: str) -> int:
    """K and V of one token in one layer: 2 rows of ``kv_heads * head_dim`` in ``dtype`` (ggml row size)."""
    if dtype not in KV_DTYPES:
        raise MemoryInputError(f"unknown KV dtype {dtype!r}; choose one of: {', '.join(KV_DTYPES)}")
    return 2 * _type_bytes(KV_DTYPES[dtype], spec.kv_dim, spec.kv_dim)


def context_warnings(spec: ModelSpec, context: int) -> list[str]:
    if context > spec.context:
        return [f"context {context:,} is beyond {spec.name}'s maximum of {spec.context:,} tokens: computed anyway"]
    return []


def kv_cache(model: str | ModelSpec, context: int = 32_768, *, batch: int = 1, dtype: str = "bf16") -> KVCache:
    """The cache a runtime needs at ``context`` tokens for ``batch`` sequences, exactly (no runtime padding: see
    ``LlamaCppKV`` for llama.cpp's cell rounding). A context beyond the model's maximum is computed, with a warning
    in ``KVCache.warnings``."""
    spec = model_spec(model)
    _positive("context", context)
    _positive("batch", batch)
    per = kv_bytes_per_token_layer(spec, dtype)
    local_tokens = min(context, spec.sliding_window)
    return KVCache(spec.name, context, batch, dtype, spec.global_layers, spec.local_layers, spec.sliding_window,
                   per, batch * per * spec.global_layers * context, batch * per * spec.local_layers * local_tokens,
                   batch * per * spec.layers * context, context_warnings(spec, context))


@dataclass(frozen=True)
class LlamaCppKV:
    """How llama.cpp sizes its two caches (``llama_kv_cache_iswa``, as built in llama-cpp-python 0.3.36).

    ``cell_pad``: n_ctx is rounded up to a multiple of 256 cells, and so is the SWA cache (llama.cpp issue
    #17037, "the SWA cache is always padded to 256 for performance"). ``n_ubatch``: the SWA cache holds the window
    plus one micro-batch (tokens of a micro-batch attend to up to ``window`` earlier positions while being
    written): ``swa_cells = min(ctx_cells, pad(window * n_seq + n_ubatch, 256))``. ``swa_full=True``: local
    layers get the whole context (needed for context shifting/caching of prompts beyond the window).
    """

    n_ubatch: int = 512  # llama.cpp's (and llama-cpp-python's) default micro-batch
    n_seq: int = 1  # sequences sharing one unified cache
    cell_pad: int = 256
    swa_full: bool = False

    def cells(self, spec: ModelSpec, n_ctx: int) -> tuple[int, int]:
        """(cells of the global layers' cache, cells of the local layers' cache)."""
        _positive("context", n_ctx)
        base = -(-n_ctx // self.cell_pad) * self.cell_pad
        if self.swa_full:
            return base, base
        wanted = spec.sliding_window * self.n_seq + self.n_ubatch
        return base, min(base, -(-wanted // self.cell_pad) * self.cell_pad)

    def kv_bytes(self, spec: ModelSpec, n_ctx: int, dtype: str = "f16") -> tuple[int, int]:
        """(bytes of the global layers' cache, bytes of the local layers' cache) as llama.cpp allocates them."""
        base, swa = self.cells(spec, n_ctx)
        per = kv_bytes_per_token_layer(spec, dtype)
        return per * spec.global_layers * base, per * spec.local_layers * swa
