"""Text corpora for training the project's checkpoints and for the built-in prompt sets.

The default corpus is the Python standard library's own source, present on every machine with Python and no
network. Documents are split into train and held-out by a hash of their name, so the split is the same on
every machine, for every model, and the trainer and the held-out workloads agree on it. The larger `code` corpus
adds the Python sources of the installed torch and transformers as training documents only (about 95 MB against
the standard library's 12 MB): enough tokens that the larger GPU recipes do not repeat their data.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import sysconfig
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from engines.errors import BadInput

HELDOUT_PERCENT = 5  # documents whose name hashes into the first 5 of 100 buckets are never trained on
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".html", ".tex", ".json", ".csv", ".toml", ".cfg", ".ini",
                 ".yaml", ".yml", ".js", ".ts", ".java", ".go", ".rs", ".cpp", ".sh", ""}
DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Doc:
    name: str  # stable across machines with the same files (path relative to the corpus root)
    text: str


@dataclass
class Corpus:
    name: str  # "stdlib", "code" or the path given
    docs: list[Doc]
    train_only: list[Doc] = field(default_factory=list)  # never held out, whatever their name hashes to

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for d in self.docs + self.train_only:
            h.update(d.name.encode())
            h.update(b"\0")
            h.update(d.text.encode("utf-8", "replace"))
            h.update(b"\0")
        return h.hexdigest()[:16]

    @property
    def chars(self) -> int:
        return sum(len(d.text) for d in self.docs + self.train_only)

    def split(self) -> tuple[list[Doc], list[Doc]]:
        """(train, held-out) by the hash of each document's name; `train_only` documents all go to train."""
        train, held = [], []
        for d in self.docs:
            (held if is_heldout(d.name) else train).append(d)
        return train + self.train_only, held


def is_heldout(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def stdlib_corpus() -> Corpus:
    """Every .py file of the standard library except site-packages and the test suites, sorted by name (read once
    per process; treat the result as read-only)."""
    root = stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Doc(rel, text))
    return Corpus("stdlib", docs)


# Packages whose Python sources the `code` corpus adds: dependencies of the project, so present wherever it runs.
CODE_PACKAGES = ("torch", "transformers")


@lru_cache(maxsize=1)
def code_corpus() -> Corpus:
    """The standard library plus the .py files of CODE_PACKAGES as installed here (test folders and
    transformers' `modular_*.py`, near copies of its modeling files, left out). The packages' files are
    training documents only: held-out text stays the standard library's, so held-out losses of models trained
    on either corpus measure the same thing, and copied code in the packages cannot leak into it."""
    extra = []
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise BadInput(f"corpus 'code' needs the package {package!r}, which is not installed here")
        root = Path(spec.origin).parent
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if {"test", "tests", "testing"} & set(rel.parts[:-1]) or rel.name.startswith("modular_"):
                continue
            text = _read_text(path)
            if text and text.strip():
                extra.append(Doc(f"site-packages/{package}/{rel.as_posix()}", text))
    return Corpus("code", list(stdlib_corpus().docs), train_only=extra)


NAMED_CORPORA = {"stdlib": stdlib_corpus, "code": code_corpus}


def load_corpus(path: str | Path | None = None, text_column: str = "text") -> Corpus:
    """None or "stdlib": the standard library. "code": it and the sources of torch and transformers (a folder
    of that name is ./code). A folder: every text file under it. A .txt file: one document. A .json, .jsonl,
    .parquet or .csv file: loaded through `datasets`, one document per row of `text_column`."""
    if path is None:
        return stdlib_corpus()
    if isinstance(path, str) and path in NAMED_CORPORA:
        return NAMED_CORPORA[path]()
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInput(f"corpus {str(path)!r} does not exist; give a folder of text files, a .txt file, "
                       f"a .json/.jsonl/.parquet/.csv file with a {text_column!r} column, or one of "
                       f"{', '.join(NAMED_CORPORA)} (leave it out for the Python standard library)")
    if p.is_dir():
        docs = []
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES:
                text = _read_text(f)
                if text and text.strip():
                    docs.append(Doc(f.relative_to(p).as_posix(), text))
    elif p.suffix.lower() in DATASET_SUFFIXES:
        texts = load_text_rows(p, text_column)
        docs = [Doc(f"{p.name}#{i}", t) for i, t in enumerate(texts) if t and t.strip()]
    else:
        text = _read_text(p)
        docs = [Doc(p.name, text)] if text and text.strip() else []
    if not docs:
        raise BadInput(f"corpus {str(path)!r} holds no text: no readable UTF-8 text files "
                       f"(suffixes {', '.join(sorted(s for s in TEXT_SUFFIXES if s))}) or rows")
    return Corpus(str(p), docs)


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:4096]:
        return None  # binary
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_text_rows(path: Path, text_column: str = "text") -> list[str]:
    """Rows of one local file through `datasets` (json, jsonl, parquet, csv, txt). BadInput when the file cannot
    be parsed (a JSON-lines file names its first broken line) or lacks the column."""
    import logging

    import datasets
    builder = DATASET_SUFFIXES.get(path.suffix.lower(), "text")
    if path.suffix.lower() == ".jsonl":
        _check_json_lines(path)
    datasets.disable_progress_bars()
    quiet = logging.getLogger("datasets")
    level, quiet.level = quiet.level, logging.CRITICAL  # datasets logs its own traceback-like line first
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        cause = exc.__cause__ or exc
        first = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise BadInput(f"file {str(path)!r} could not be read as {builder} ({first[:200]})") from None
    finally:
        quiet.setLevel(level)
    if builder == "text":
        text_column = "text"  # the text builder names its one column so
    if text_column not in ds.column_names:
        raise BadInput(f"file {str(path)!r} has columns {ds.column_names}; expected a {text_column!r} column "
                       "holding the prompt text")
    return [str(t) if t is not None else "" for t in ds[text_column]]


def _check_json_lines(path: Path) -> None:
    import json
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"file {str(path)!r} cannot be read ({exc})") from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"file {str(path)!r}: line {i} is not JSON ({exc.msg}); each line must be one "
                               "JSON object with a 'text' field") from None


def docstrings(text: str) -> list[str]:
    """Module, class and function docstrings of one Python source, in source order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                out.append(doc)
    return out
