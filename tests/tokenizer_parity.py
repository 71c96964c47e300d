"""Tokenizer parity between a GGUF file in llama.cpp and HF ``tokenizers``: the strings, and the comparison.

The strings cover what breaks SentencePiece exports: translated UI text in many scripts (the gettext message
catalogs installed on the machine, ``/usr/share/locale/*/LC_MESSAGES/*.mo``), Python source (indentation runs),
whitespace runs of every length, digits, emoji (incl. ZWJ sequences and flags), every added token of the
vocabulary, chat-templated turns and an image-token prompt. Deterministic for a given machine; without catalogs
the other sources still give more than ``minimum`` strings.
"""

from __future__ import annotations

import gettext
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

LOCALE_DIRS = ("/usr/share/locale", "/usr/local/share/locale")


def catalog_strings(limit: int = 1200, per_catalog: int = 6) -> list[str]:
    """Up to ``limit`` translated messages, ``per_catalog`` from each ``.mo`` file (sorted paths), spread over
    the languages installed."""
    files = sorted(p for d in LOCALE_DIRS if Path(d).is_dir() for p in Path(d).glob("*/LC_MESSAGES/*.mo"))
    out: list[str] = []
    for path in files:
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr, as gettext reads it
        except Exception:  # a damaged or foreign catalog: OSError, or whatever the parser raises
            continue
        texts = sorted({v for k, v in catalog.items() if k and isinstance(v, str) and v.strip() and len(v) < 2000})
        step = max(1, len(texts) // per_catalog)
        out += texts[::step][:per_catalog]
        if len(out) >= limit:
            break
    return out[:limit]


def code_strings(limit: int = 400) -> list[str]:
    """Windows of 1-12 lines of standard-library Python source (indentation, operators, docstrings)."""
    import importlib

    out: list[str] = []
    for name in ("json", "argparse", "textwrap", "string", "functools", "dataclasses", "difflib", "pprint"):
        lines = inspect.getsource(importlib.import_module(name)).splitlines(keepends=True)
        for i in range(0, len(lines), 13):
            out.append("".join(lines[i:i + 1 + i % 12]))
    return [s for s in out if s.strip()][:limit]


def synthetic_strings() -> list[str]:
    """Whitespace runs, digits, emoji, mixed scripts and byte-fallback characters."""
    out: list[str] = []
    for n in range(1, 40):
        out += [" " * n, "a" + " " * n + "b", "\n" * n, "x" + "\t" * n + "y", " " * n + "-A,  --accept",
                "\n" + " " * n + "return x", "\u2581" * (n % 5 + 1) + "literal"]
    for n in (0, 7, 42, 1234, 99999, 31415926535, 10 ** 20):
        out += [str(n), f"{n:,}", f"v{n}.{n % 7}", f"{n / 7:.5f}", f"#{n:x}"]
    out += ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "I ❤️ Unicode ✨", "e\u0301 vs é", "\u200b\u200dzero width",
            "日本語のテキストと English", "한국어 텍스트", "العربية والعبرية עברית", "हिन्दी पाठ", "ქართული",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕓𝕠𝕝𝕕", "\U0001F9EC\U0001FAE0", "\x00\x01\x7f control bytes", "tab\tand\r\nCRLF",
            "мама мыла раму", "Ünïcödé ñ ß ø", "中文，标点。「引号」", "  leading", "trailing  ", ""]
    return out


def added_token_strings(tokenizer_dir: str | Path) -> list[str]:
    """Every added token alone, and about 400 of them in context (``a <tok> b``)."""
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    table = config.get("added_tokens_decoder", {})
    tokens = [table[i]["content"] for i in sorted(table, key=int)]
    return tokens + [f"a {t} b" for t in tokens[:: max(1, len(tokens) // 400)]]


def chat_strings(tokenizer_dir: str | Path) -> list[str]:
    """Chat-templated turns (the checkpoint's template, rendered by jinja2 as transformers sets it up; loading
    the 262k tokenizer in transformers only for this takes 14 s) and an image-token prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    out = []
    if isinstance(config.get("chat_template"), str):
        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(config["chat_template"])
        chats = [[{"role": "user", "content": "Hi!"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and   3+3?\n"}],
                 [{"role": "user", "content": "def f(x):\n    return x"}]]
        # without the template's leading <bos>: the tokenizers add theirs
        out = [template.render(messages=c, bos_token="", add_generation_prompt=True) for c in chats]
    image = "<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>"
    out.append(f"<start_of_turn>user\nDescribe this image: {image}<end_of_turn>\n<start_of_turn>model\n")
    return out


def parity_strings(tokenizer_dir: str | Path, minimum: int = 2000) -> list[str]:
    strings = (catalog_strings() + code_strings() + synthetic_strings() + added_token_strings(tokenizer_dir)
               + chat_strings(tokenizer_dir))
    if len(strings) < minimum:  # a machine without catalogs: more source code
        strings += code_strings(limit=10 ** 6)[400:400 + minimum - len(strings)]
    return strings


@dataclass
class Parity:
    """Counts of strings whose ids / decoded text agree, and the first differences."""

    strings: int = 0
    same_ids: int = 0
    same_text: int = 0
    hf_round_trips: int = 0
    beyond: int = 0  # strings HF gives an id past the GGUF's vocabulary (an added token past the embedding)
    differences: list[tuple[str, str]] = field(default_factory=list)  # (kind, string)

    def line(self) -> str:
        return (f"{self.strings} strings: ids equal {self.same_ids}, detokenized text equal {self.same_text} "
                f"(HF round-trips {self.hf_round_trips}); with an id past the vocabulary {self.beyond}")


def compare(gguf_path: str | Path, tokenizer_json: str | Path, strings: list[str]) -> Parity:
    """Tokenize (BOS added, special tokens parsed, as HF does) and detokenize each string in llama.cpp (a
    vocab-only load) and in HF ``tokenizers``; detokenization starts from HF's ids in both."""
    import llama_cpp
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_json))
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    report = Parity()
    for s in strings:
        ids = hf.encode(s).ids
        got = llm.tokenize(s.encode("utf-8"), add_bos=True, special=True)
        text = hf.decode(ids, skip_special_tokens=False)
        report.strings += 1
        if max(ids) >= llm.n_vocab():  # llama.cpp cannot detokenize what it has no entry for
            report.beyond += 1
            report.differences.append(("beyond", s))
            continue
        got_text = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        report.same_ids += got == ids
        report.same_text += got_text == text
        report.hf_round_trips += text == "<bos>" + s
        if got != ids:
            report.differences.append(("ids", s))
        if got_text != text:
            report.differences.append(("text", s))
    return report
