"""Fake quantization as modules: a quantizer (format + enabled flag) and the Linear / Embedding that use it.

The swapped modules share their Parameter objects with the model they came from (nothing is copied), keep the
state-dict keys (``...q_proj.weight``), and so stay a normal transformers model: ``generate``,
``save_pretrained`` of the latent weights and gradient checkpointing work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma3_qat.formats import WeightFormat, get_format, straight_through


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` with ``weight`` computes in: autocast's where it is on, else the weight's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class FakeQuantizer(nn.Module):
    """Maps a latent weight to its fake-quantized values (straight-through gradient).

    With ``cache=True`` the quantized values are computed once per weight *version*: an optimizer step bumps the
    latent Parameter's version counter, so the values are reused across gradient-accumulation micro-steps,
    activation-checkpoint recomputes, evaluation and generation, and recomputed after each update. The cache holds
    the values in each dtype asked for since the last update: under bf16 autocast a matmul asks for bf16 (one
    cast per step instead of one per forward, and half the memory), an embedding lookup for the exact fp32 values.
    The values are always computed from the fp32 latent weight, so codes and exports do not depend on the dtype.
    Turn the cache off when weights are sharded (FSDP) so that no full-size copy outlives the forward pass.
    An optimizer that updates the weights in place without bumping their version counter (torch's fused AdamW)
    must be followed by ``invalidate()`` (the trainer does it after every step).
    """

    def __init__(self, fmt: str | WeightFormat, enabled: bool = True, cache: bool = True, scale_grad: float = 0.0):
        super().__init__()
        self.format = get_format(fmt)
        self.enabled = enabled
        self.cache = cache
        self.scale_grad = scale_grad  # > 0: the scales learn too (``WeightFormat.scale_gradient``), times this
        self._key_of_cache: tuple | None = None
        self._cached: dict[torch.dtype, torch.Tensor] = {}
        self._scale_key: tuple | None = None
        self._scale: torch.Tensor | None = None

    def invalidate(self) -> None:
        """Forget the cached values: the next forward quantizes the weight again."""
        self._key_of_cache, self._cached, self._scale_key, self._scale = None, {}, None, None

    def _key(self, weight: torch.Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, weight.device, tuple(weight.shape))

    def quantized_values(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fake-quantized values of ``weight`` in ``dtype`` (default: the weight's), without autograd."""
        dtype = dtype or weight.dtype
        key = self._key(weight)
        if self.cache and self._key_of_cache == key and dtype in self._cached:
            return self._cached[dtype]
        exact = self._cached.get(weight.dtype) if self._key_of_cache == key else None
        if exact is None:
            exact = self.format.fake_quantize_values(weight.detach()).to(weight.dtype)
        values = exact.to(dtype)
        if self.cache:
            if self._key_of_cache != key:
                self._key_of_cache, self._cached = key, {}
            self._cached[dtype] = values
        return values

    def rows(self, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The fake-quantized values of ``rows`` (``[..., in]``, rows of ``weight`` as an embedding looks them up),
        equal to those rows of ``quantized_values(weight)``, with the gradient going to ``rows``: no full-table
        copy of the exact values is needed for a lookup. The per-tensor scale, where the format has one, comes
        from the whole weight (cached per version)."""
        if not self.enabled:
            return rows
        key = self._key(weight)
        if self._scale_key != key:
            self._scale_key, self._scale = key, self.format.tensor_scale_of(weight)
        flat = rows.reshape(-1, rows.shape[-1])
        values = self.format.rows_values(flat.detach().to(torch.float32), self._scale).to(rows.dtype)
        return straight_through(flat, values, fmt=self.format, scale_grad=self.scale_grad).reshape(rows.shape)

    def forward(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fake-quantized weight in ``dtype`` (default: the weight's), its gradient going to ``weight``."""
        if not self.enabled:
            return weight
        return straight_through(weight, self.quantized_values(weight, dtype), fmt=self.format,
                                scale_grad=self.scale_grad)

    def extra_repr(self) -> str:
        return f"format={self.format.name}, enabled={self.enabled}, cache={self.cache}, scale_grad={self.scale_grad}"


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight."""

    def __init__(self, linear: nn.Linear, quantizer: FakeQuantizer):
        nn.Module.__init__(self)  # no new storage: the Parameters below are the original ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_fake_quant = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fake_quant(self.weight, compute_dtype(x, self.weight)), self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear


_EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                    "sparse")


class FakeQuantEmbedding(nn.Embedding):
    """An embedding whose lookup reads the fake-quantized table, keeping Gemma's ``sqrt(hidden)`` scale.

    Replaces ``Gemma3TextScaledWordEmbedding`` (whose ``embed_scale`` a generic embedding swap would lose) and
    restores that exact class and its buffer on ``to_embedding``.
    """

    def __init__(self, embedding: nn.Embedding, quantizer: FakeQuantizer):
        nn.Module.__init__(self)
        for attr in _EMBEDDING_ATTRS:
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        self._original_class = type(embedding)
        self._original_attrs = {k: v for k, v in vars(embedding).items() if k == "scalar_embed_scale"}
        embed_scale = getattr(embedding, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor):
            self.register_buffer("embed_scale", embed_scale, persistent=False)
        else:
            self.embed_scale = None
        self.weight_fake_quant = quantizer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # the latent rows looked up, then their fake-quantized values: the same values as a lookup in the
        # fake-quantized table, without the table's exact copy (under bf16 autocast the head needs only a bf16 one)
        rows = F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
        out = self.weight_fake_quant.rows(self.weight, rows)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)
        return out

    def to_embedding(self) -> nn.Embedding:
        cls = self._original_class
        emb = cls.__new__(cls)
        nn.Module.__init__(emb)
        for attr in _EMBEDDING_ATTRS:
            setattr(emb, attr, getattr(self, attr))
        emb.weight = self.weight
        for k, v in self._original_attrs.items():
            setattr(emb, k, v)
        if self.embed_scale is not None:
            emb.register_buffer("embed_scale", self.embed_scale, persistent=False)
        return emb
