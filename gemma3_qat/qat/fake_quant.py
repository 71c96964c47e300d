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


class FakeQuantizer(nn.Module):
    """Maps a latent weight to its fake-quantized values (straight-through gradient).

    With ``cache=True`` the quantized values are computed once per weight *version*: an optimizer step bumps the
    latent Parameter's version counter, so the values are reused across gradient-accumulation micro-steps,
    activation-checkpoint recomputes, evaluation and generation, and recomputed after each update. Turn it off
    when weights are sharded (FSDP) so that no full-size copy outlives the forward pass.
    """

    def __init__(self, fmt: str | WeightFormat, enabled: bool = True, cache: bool = True, scale_grad: float = 0.0):
        super().__init__()
        self.format = get_format(fmt)
        self.enabled = enabled
        self.cache = cache
        self.scale_grad = scale_grad  # > 0: the scales learn too (``WeightFormat.scale_gradient``), times this
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def _key(self, weight: torch.Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))

    def quantized_values(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized values of ``weight`` in its dtype, without autograd."""
        if self.cache and self._cached is not None and self._cached[0] == self._key(weight):
            return self._cached[1]
        values = self.format.fake_quantize_values(weight.detach()).to(weight.dtype)
        self._cached = (self._key(weight), values) if self.cache else None
        return values

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return straight_through(weight, self.quantized_values(weight), fmt=self.format, scale_grad=self.scale_grad)

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
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)

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
        table = self.weight_fake_quant(self.weight)
        out = F.embedding(input_ids, table, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
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
