"""A mixture of lattices: one name for a file whose tensors sit on different lattices (llama.cpp's Q4_K_M).

The mixture itself has no numerics: which lattice each tensor takes is a per-tensor policy of the architecture
(``gemma3_qat.mixtures``: llama-quantize's rules, by layer index and row length), and every tensor is then
quantized, trained and exported by its own lattice's class (``formats.lattices``). This object is what
``--format q4_k_m`` names: its description, the lattices it may use and the GGUF file type it writes.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType, LlamaFileType

from gemma3_qat.formats.base import FormatError
from gemma3_qat.formats.weight_format import WeightFormat

T = GGMLQuantizationType


class Mixture(WeightFormat):
    """A per-tensor choice among ``lattices`` (format names), made by ``gemma3_qat.mixtures``."""

    is_mixture = True
    lattices: tuple[str, ...] = ()

    def _no_numerics(self):
        raise FormatError(f"{self.name} is a mixture: each tensor has its own lattice "
                          f"({', '.join(self.lattices)}); quantize it with that lattice's format")

    def check_shape(self, shape):  # every shape has a type under the policy (F16 at worst)
        super().check_shape(shape)

    def quantize(self, weight):
        self._no_numerics()

    def dequantize(self, qw):
        self._no_numerics()

    def fake_quantize_values(self, weight):
        self._no_numerics()

    def gguf_ggml_type(self, *, lossy=False, tensor_scale=None):
        if lossy:
            return super().gguf_ggml_type(lossy=True)
        raise FormatError(f"{self.name} is a mixture: each tensor's GGUF type is its lattice's")

    def compact_bytes(self, shape):
        self._no_numerics()


class Q4KM(Mixture):
    name = "q4_k_m"
    summary = ("llama.cpp's Q4_K_M file, trained type for type: Q4_K, Q6_K for attn_v / ffn_down in "
               "llama-quantize's use_more_bits layers and for the tied embedding; Q5_0 / Q8_0 where rows are not "
               "a multiple of 256")
    runtimes = "llama.cpp / Ollama / LM Studio (GGUF Q4_K_M: the types and bytes llama-quantize Q4_K_M writes)"
    lattices = ("q4_k", "q6_k", "q5_0", "q8_0-lattice")
    gguf_exact = (T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0)
    gguf_file_type = LlamaFileType.MOSTLY_Q4_K_M
    bits_range = (4.5, 8.5)  # Q4_K ... Q8_0 (a Q6_K fallback); a model's size: gemma3-qat memory --format q4_k_m
    gguf_caveat = ("q4_k_m: each tensor in the type llama-quantize Q4_K_M gives it (Q4_K / Q6_K, Q5_0 / Q8_0 where "
                   "rows are not a multiple of 256), holding its trained codes")

    @property
    def bits_per_weight(self) -> float:
        return 4.5  # its bulk (Q4_K); its tensors range over bits_range

    @property
    def gguf_type(self) -> str:
        return "Q4_K_M: " + "/".join(t.name for t in self.gguf_exact) + " per tensor, as llama-quantize"


MIXTURE_CLASSES = (Q4KM,)
