"""The built-in quickstart task: docstring → function retrieval over the local Python standard library.

A CodeSearchNet-style set that needs no download. Every function or method of the stdlib that has a
docstring gives one pair:

* **query**: the docstring's summary, i.e. its first sentence (first paragraph, cut at the first
  ``". "``/``"? "``/``"! "``), whitespace-normalised;
* **document**: the function's source *without* its docstring, from its decorators and ``def`` line
  (so the function name is part of the document, as it is in real code search) to its last line,
  dedented. The document title is empty: a qualified name as title would give the module and class
  away, which a code-search user does not know when they type a query.

Parsing is done with :mod:`ast` on the source files only; nothing is imported or executed.

Filters (counted in ``stats.json``):

* folders that are not ordinary library code: test suites (``test``/``tests``), ``site-packages``,
  ``idlelib``, ``tkinter``, ``turtledemo``, ``lib2to3``, ``ensurepip``, ``pydoc_data``, ``encodings``
  (hundreds of generated, identical codec classes), ``lib-dynload``, ``config-*``;
* functions whose name contains ``test`` (as CodeSearchNet), dunder methods (``__repr__`` &c., whose
  docstrings are mostly boilerplate like "Return self==value."); single-underscore private helpers
  are kept (their docstrings are real);
* functions nested in other functions (closures have no stable identity);
* short summaries (< 3 words or < 12 characters) and boilerplate ones (``"Return self."``,
  ``"Docstring"``, ``"TODO"``, ``"XXX"``, ``"Deprecated..."``, ``"Same as ..."``, ``"Alias for ..."``,
  ``"See ..."``, doctest or ``:param:`` lines, ...);
* trivial bodies: fewer than 2 code lines after the docstring, or only ``pass`` / ``...`` /
  ``raise NotImplementedError``.

Duplicates:

* exact duplicate documents (the same code, e.g. a method copied between modules) are kept once,
  the first in (module, line) order; the later copies are dropped along with their queries;
* ambiguous summaries (the same normalised summary for two or more *different* documents, e.g.
  "Return the number of bytes.") are dropped as queries, because a single judged positive would be
  wrong; their documents stay in the corpus as distractors.

Split: by module (``json.decoder``, ``asyncio.events``, ...), from a SHA-256 of the dotted module
name, so a module's functions never straddle splits. 70 % train / 10 % dev / 20 % test of modules. The corpus holds every kept
document of all three splits (BEIR practice: test queries search the full corpus).

The result is a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/{train,dev,test}.tsv``)
plus ``stats.json`` and ``README.md``, built atomically and cached per Python version.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from retriever.io import atomic_dir

__all__ = ["BUILDER_VERSION", "SPLIT_FRACTIONS", "FunctionRecord", "extract_functions", "build_dataset",
           "default_cache_dir", "cached_stdlib_dataset", "split_of"]

# Bump when a rule below changes, so cached folders built by older rules are not reused.
BUILDER_VERSION = 1
SPLIT_FRACTIONS = {"train": 70, "dev": 10, "test": 20}  # percent of modules

SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo", "lib2to3",
             "ensurepip", "pydoc_data", "encodings", "lib-dynload", "__pycache__", "venv"}
SKIP_DIR_PREFIXES = ("config-", ".")

MIN_SUMMARY_WORDS = 3
MIN_SUMMARY_CHARS = 12
MIN_BODY_LINES = 2

_BOILERPLATE = re.compile(
    r"^(return self\b|docstring|todo\b|xxx\b|fixme\b|deprecated\b|same as\b|alias for\b|alias of\b|see\b"
    r"|for internal use\b|internal\b|override\b|overrides\b|implementation of\b|undocumented\b"
    r"|not implemented\b|helper\b|>>>|:param|:return|@|\.\. )",
    re.IGNORECASE,
)
_TRIVIAL_BODY = re.compile(r"^(pass|\.\.\.|raise NotImplementedError(\(.*\))?|return|return None)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


@dataclass(frozen=True)
class FunctionRecord:
    """One stdlib function: where it lives, its query and its document."""

    id: str            # module.Qual.name, with "~2", "~3" for a repeated name in the same module
    module: str        # dotted module name: the unit of the split
    lineno: int
    summary: str       # the query
    code: str          # the document: source without the docstring


def split_of(module: str) -> str:
    """Deterministic split of a dotted module name (independent of Python's hash seed)."""
    bucket = int(hashlib.sha256(module.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < SPLIT_FRACTIONS["train"]:
        return "train"
    if bucket < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["dev"]:
        return "dev"
    return "test"


def summarize(docstring: str) -> str:
    """The first sentence of the docstring's first paragraph, whitespace-normalised."""
    paragraph = []
    for line in docstring.strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    text = " ".join(paragraph)
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


def is_useful_summary(summary: str) -> bool:
    return (len(summary) >= MIN_SUMMARY_CHARS and len(summary.split()) >= MIN_SUMMARY_WORDS
            and not _BOILERPLATE.match(summary))


def _normalize_summary(summary: str) -> str:
    return " ".join(summary.lower().rstrip(".!? ").split())


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_source_files(root: Path) -> Iterator[Path]:
    """Library ``.py`` files under ``root``, skipping tests, GUIs and tooling."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(SKIP_DIR_PREFIXES))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith(("test_", ".")) and name != "__main__.py":
                yield Path(dirpath) / name


def _document(source_lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's code with its docstring statement cut out, or None if nothing is left."""
    doc_stmt = node.body[0]
    rest = node.body[1:]
    # One-line forms (``def f(): "doc"; return x``) share a line with the docstring: skip them.
    if not rest or doc_stmt.lineno == node.lineno or rest[0].lineno == doc_stmt.end_lineno:
        return None
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    head = source_lines[start:doc_stmt.lineno - 1]
    tail = source_lines[doc_stmt.end_lineno:node.end_lineno]
    body_code = [ln.strip() for ln in tail if ln.strip() and not ln.strip().startswith("#")]
    if len(body_code) < MIN_BODY_LINES or all(_TRIVIAL_BODY.match(ln) for ln in body_code):
        return None
    code = textwrap.dedent("".join(head + tail)).strip("\n")
    return code if code.strip() else None


def _walk_functions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Module- and class-level functions (methods of nested classes too), not closures."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
        elif isinstance(node, ast.ClassDef):
            yield from _walk_functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.If, ast.Try)):
            # Platform-dependent definitions: ``if sys.platform == "win32": def f(): ...``.
            inner = list(node.body) + list(getattr(node, "orelse", []))
            for handler in getattr(node, "handlers", []):
                inner += handler.body
            inner += list(getattr(node, "finalbody", []))
            yield from _walk_functions(inner, prefix)


def extract_functions(root: str | os.PathLike, counts: dict[str, int] | None = None) -> list[FunctionRecord]:
    """Every function under ``root`` that passes the filters, in (module, line) order.

    ``counts`` (if given) is filled with how many candidates each filter dropped.
    """
    root = Path(root)
    counts = counts if counts is not None else {}
    for key in ("files", "unparsable_files", "functions_seen", "no_docstring", "dunder_or_test_name",
                "short_or_boilerplate_summary", "trivial_body", "kept"):
        counts.setdefault(key, 0)
    records: list[FunctionRecord] = []
    for path in sorted(iter_source_files(root), key=lambda p: _module_name(root, p)):
        counts["files"] += 1
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            counts["unparsable_files"] += 1
            continue
        module = _module_name(root, path)
        lines = source.splitlines(keepends=True)
        seen: dict[str, int] = {}
        for qualname, node in _walk_functions(tree.body, ""):
            counts["functions_seen"] += 1
            name = node.name
            if (name.startswith("__") and name.endswith("__")) or "test" in name.lower():
                counts["dunder_or_test_name"] += 1
                continue
            docstring = ast.get_docstring(node, clean=True)
            if not docstring or not docstring.strip():
                counts["no_docstring"] += 1
                continue
            summary = summarize(docstring)
            if not is_useful_summary(summary):
                counts["short_or_boilerplate_summary"] += 1
                continue
            code = _document(lines, node)
            if code is None:
                counts["trivial_body"] += 1
                continue
            base_id = f"{module}.{qualname}"
            seen[base_id] = seen.get(base_id, 0) + 1
            doc_id = base_id if seen[base_id] == 1 else f"{base_id}~{seen[base_id]}"
            records.append(FunctionRecord(doc_id, module, node.lineno, summary, code))
            counts["kept"] += 1
    return records


def _deduplicate(records: list[FunctionRecord], counts: dict[str, int]) -> tuple[list[FunctionRecord], set[str]]:
    """Drop repeated documents (keep the first); return the kept records and the ids whose
    summary is ambiguous (shared with a different document) and so gets no query."""
    by_code: dict[str, FunctionRecord] = {}
    kept: list[FunctionRecord] = []
    for rec in records:
        if rec.code in by_code:
            continue
        by_code[rec.code] = rec
        kept.append(rec)
    counts["duplicate_documents_dropped"] = len(records) - len(kept)
    by_summary: dict[str, list[str]] = {}
    for rec in kept:
        by_summary.setdefault(_normalize_summary(rec.summary), []).append(rec.id)
    ambiguous = {doc_id for ids in by_summary.values() if len(ids) > 1 for doc_id in ids}
    counts["ambiguous_queries_dropped"] = len(ambiguous)
    return kept, ambiguous


def _take_per_split(records: list[FunctionRecord], limit: int | None) -> list[FunctionRecord]:
    """At most ``limit`` queries per split, spread evenly over the (module, line) order."""
    if limit is None:
        return records
    out = []
    for split in SPLIT_FRACTIONS:
        chunk = [r for r in records if split_of(r.module) == split]
        step = max(1, len(chunk) / limit) if chunk else 1
        out += [chunk[int(i * step)] for i in range(min(limit, len(chunk)))]
    return out


def build_dataset(output: str | os.PathLike, source_root: str | os.PathLike | None = None,
                  max_queries_per_split: int | None = None, max_docs: int | None = None) -> Path:
    """Build the BEIR folder at ``output`` (atomically; an existing folder is replaced).

    ``source_root`` defaults to this interpreter's stdlib. ``max_queries_per_split`` and ``max_docs``
    cut a small, still consistent slice (every judged document is kept) for tests and smoke runs.
    """
    source_root = Path(source_root or sysconfig.get_paths()["stdlib"])
    counts: dict[str, int] = {}
    records = extract_functions(source_root, counts)
    if not records:
        raise ValueError(f"no usable functions found under {source_root}")
    records, ambiguous = _deduplicate(records, counts)
    with_query = _take_per_split([r for r in records if r.id not in ambiguous], max_queries_per_split)
    judged_ids = {r.id for r in with_query}
    corpus = records
    if max_docs is not None and len(corpus) > max_docs:
        extra = [r for r in corpus if r.id not in judged_ids]
        step = len(extra) / max(1, max_docs - len(judged_ids)) if len(judged_ids) < max_docs else None
        keep = judged_ids | ({extra[int(i * step)].id for i in range(max_docs - len(judged_ids))} if step else set())
        corpus = [r for r in corpus if r.id in keep]

    qrels: dict[str, list[FunctionRecord]] = {split: [] for split in SPLIT_FRACTIONS}
    for rec in with_query:
        qrels[split_of(rec.module)].append(rec)
    modules = {split: sorted({r.module for r in recs}) for split, recs in qrels.items()}
    stats = {
        "builder_version": BUILDER_VERSION,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "source_root": str(source_root),
        "documents": len(corpus),
        "queries": {split: len(recs) for split, recs in qrels.items()},
        "modules_with_queries": {split: len(names) for split, names in modules.items()},
        "test_modules": modules["test"],
        "dev_modules": modules["dev"],
        "filters": counts,
        "split_fractions_percent_of_modules": SPLIT_FRACTIONS,
    }
    with atomic_dir(output) as tmp:
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as fh:
            for rec in corpus:
                fh.write(json.dumps({"_id": rec.id, "title": "", "text": rec.code}, ensure_ascii=False) + "\n")
        with open(tmp / "queries.jsonl", "w", encoding="utf-8") as fh:
            for rec in with_query:
                fh.write(json.dumps({"_id": f"q:{rec.id}", "text": rec.summary,
                                     "metadata": {"module": rec.module, "split": split_of(rec.module)}},
                                    ensure_ascii=False) + "\n")
        (tmp / "qrels").mkdir()
        for split, recs in qrels.items():
            with open(tmp / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
                fh.write("query-id\tcorpus-id\tscore\n")
                for rec in recs:
                    fh.write(f"q:{rec.id}\t{rec.id}\t1\n")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(stats), encoding="utf-8")
    return Path(output)


def _readme(stats: dict) -> str:
    q = stats["queries"]
    return (
        f"# negatron quickstart: Python {stats['python']} stdlib docstring → function retrieval\n\n"
        f"Built by `retriever.quickstart_data` (builder v{stats['builder_version']}) from `{stats['source_root']}`.\n"
        f"Query: the first sentence of a function's docstring. Document: the function's source without its\n"
        f"docstring (title empty). Split by module (SHA-256 of the dotted module name).\n\n"
        f"- documents: {stats['documents']} (train + dev + test functions, all searchable)\n"
        f"- queries: train {q['train']}, dev {q['dev']}, test {q['test']}\n"
        f"- modules with queries: train {stats['modules_with_queries']['train']}, "
        f"dev {stats['modules_with_queries']['dev']}, test {stats['modules_with_queries']['test']}\n"
        f"- filter counts: {json.dumps(stats['filters'])}\n\n"
        "See docs/quickstart.md in the negatron repository for the rules.\n"
    )


def default_cache_dir() -> Path:
    """``$NEGATRON_CACHE_DIR`` or ``$XDG_CACHE_HOME/negatron`` or ``~/.cache/negatron``."""
    if os.environ.get("NEGATRON_CACHE_DIR"):
        return Path(os.environ["NEGATRON_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "negatron"


def cached_stdlib_dataset(cache_dir: str | os.PathLike | None = None, max_queries_per_split: int | None = None,
                          max_docs: int | None = None) -> tuple[Path, bool]:
    """The stdlib BEIR folder, built on first use; returns ``(path, was_cached)``.

    The key holds the Python version and implementation, the builder version and the slice options,
    so a different interpreter or rule set never reuses a stale folder.
    """
    key = f"stdlib-{sys.implementation.name}{platform.python_version()}-v{BUILDER_VERSION}"
    if max_queries_per_split is not None or max_docs is not None:
        key += f"-q{max_queries_per_split}-d{max_docs}"
    path = Path(cache_dir or default_cache_dir()) / "quickstart" / key
    if (path / "stats.json").is_file():
        return path, True
    return build_dataset(path, max_queries_per_split=max_queries_per_split, max_docs=max_docs), False
