"""Gemma's tokenizer facts (fixed special ids, control tokens, chat template) and loading a checkpoint's tokenizer.

The builder of Gemma-style SentencePiece tokenizers (test fixtures, the embedded model) is
``gemma3_qat.embedded.sentencepiece``.
"""

from __future__ import annotations

from pathlib import Path

# Gemma's fixed ids.
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_IDS = {PAD: 0, EOS: 1, BOS: 2, UNK: 3}
# Control tokens right after the fixed ids (<mask> is 4 as in Gemma 3; Gemma 3 has the others at higher ids:
# what matters is that each is one special token).
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
CONTROL_TOKENS = ("<mask>", START_OF_TURN, END_OF_TURN, "<start_of_image>", "<end_of_image>", "<image_soft_token>")

# Gemma 3's chat template, in substance: roles user/model, a system prompt folded into the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def load_tokenizer(path: str | Path):
    """The transformers tokenizer of a checkpoint directory (``from_pretrained``; never ``vocab_file=``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
