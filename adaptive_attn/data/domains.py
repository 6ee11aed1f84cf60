"""Offline text of three complexities, each its own domain with its own validation loss:

- `code`: the Python standard library's own sources (long-range structure: names defined far earlier);
- `prose`: English prose every Python install carries: the help topics of `pydoc_data.topics` and the
  docstrings of the standard library's modules;
- `repetitive`: log lines from a handful of templates with few varying fields (almost everything is
  predictable from the last few lines).

Each domain is a list of (key, document) pairs; the key decides its split.
"""

import ast
import sysconfig

import numpy as np

from adaptive_attn.data.text import is_text, stdlib_files

TEXT_DOMAINS = ("code", "prose", "repetitive")


def code_documents() -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in stdlib_files() if is_text(p)]


def prose_documents() -> list[tuple[str, bytes]]:
    """One document per help topic and one per standard-library module (its docstrings, in order)."""
    from pydoc_data.topics import topics

    docs = [(f"topic:{name}", text.encode()) for name, text in sorted(topics.items())]
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # test files written to fail parsing
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        strings = [ast.get_docstring(n, clean=True) for n in nodes]
        text = "\n\n".join(s for s in strings if s and len(s) > 40)
        if text:
            docs.append((str(path.relative_to(sysconfig.get_paths()["stdlib"])), text.encode()))
    return docs


def repetitive_documents(n_docs: int = 400, lines: int = 60, seed: int = 0) -> list[tuple[str, bytes]]:
    """Service logs: every line one of five templates, a few fields drawn from small sets."""
    rng = np.random.default_rng(seed)
    templates = [
        "INFO  worker-{w} processed batch {n} in {ms} ms",
        "INFO  worker-{w} heartbeat ok",
        "DEBUG cache hit for key user:{n}",
        "WARN  worker-{w} retrying request {n} (attempt {a})",
        "INFO  scheduler assigned batch {n} to worker-{w}",
    ]
    docs = []
    for d in range(n_docs):
        start = int(rng.integers(0, 10_000))
        body = []
        for i in range(lines):
            template = templates[int(rng.choice(5, p=[0.4, 0.3, 0.15, 0.05, 0.1]))]
            fields = dict(w=int(rng.integers(1, 4)), n=start + i // 3, ms=10 * int(rng.integers(1, 6)), a=1)
            body.append(f"2024-05-{1 + d % 28:02d} 12:{i // 60:02d}:{i % 60:02d} " + template.format(**fields))
        docs.append((f"log:{d}", ("\n".join(body) + "\n").encode()))
    return docs


def domain_documents(name: str) -> list[tuple[str, bytes]]:
    return {"code": code_documents, "prose": prose_documents, "repetitive": repetitive_documents}[name]()
