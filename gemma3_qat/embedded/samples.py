"""Sample datasets built from the corpus, in the formats ``train`` accepts: plain ``text`` and chat ``messages``.

Chat samples ask what a standard-library function does and answer with the first paragraph of its docstring, so
the default run exercises the chat template on text the model knows.
"""

from __future__ import annotations

import ast
import random

from gemma3_qat.embedded.corpus import Document


def text_samples(docs: list[Document], n: int, chars: int = 1500, seed: int = 0) -> list[dict]:
    """``n`` excerpts of ``chars`` characters, files drawn in proportion to their length (big modules give more)."""
    rng = random.Random(seed)
    weights = [len(d.text) for d in docs]
    out = []
    for doc in rng.choices(docs, weights=weights, k=n):
        start = rng.randrange(max(1, len(doc.text) - chars))
        out.append({"text": doc.text[start:start + chars]})
    return out


def _functions_with_docstrings(doc: Document):
    try:
        tree = ast.parse(doc.text)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) > 40:
                yield node, docstring.split("\n\n")[0].strip()


def chat_samples(docs: list[Document], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    candidates = []
    for doc in docs:
        module = doc.path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for node, answer in _functions_with_docstrings(doc):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            candidates.append((f"What does the {kind} `{module}.{node.name}` do?", answer))
    rng.shuffle(candidates)
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in candidates[:n]
    ]
