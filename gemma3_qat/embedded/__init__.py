"""The builder of the shipped default model (``gemma3-qat pretrain-default``, for maintainers): its corpus, its
samples, its tokenizer and its pretraining. A separate tool: nothing else in ``gemma3_qat`` imports it, and users
never need it at run time (``gemma3_qat.assets`` holds what it built)."""
