"""gemma3-qat: quantization-aware training and exact export for Gemma 3."""

__version__ = "0.1.0"
