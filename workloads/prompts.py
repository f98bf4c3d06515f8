"""Workloads: prompt sets as token ids, with a prompt length and an output length.

Built in: `synthetic-ids` (seeded random ids, no text), `code-heldout` (windows of standard-library source files the trained checkpoints never saw) and
`docs-heldout` (docstrings of those files: natural language). Any local .json/.jsonl/.parquet/.csv/.txt file
is loaded through `datasets` (one prompt per row of its `text` column, or per line of a .txt); a hub dataset
name works when the hub is reachable and fails fast with one line when it is not.

Every workload has a calibration split, prompts of the same shape that are not the measured ones, for the profiling
passes of engines that profile (`load_workload(..., split="calibration")`): the built-in texts take the windows
halfway between the measured windows, synthetic-ids draws other sequences, a file takes the rows after those the
batch uses. `load_calibration` gives the split, or another workload named as the calibration set.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from engines.errors import BadInput

from .corpus import DATASET_SUFFIXES, docstrings, load_text_rows, stdlib_corpus

BUILTIN = {
    "synthetic-ids": "seeded random token ids, lengths within +-25% of prompt_len (no text)",
    "code-heldout": "held-out Python standard-library source files (never trained on): code completion",
    "docs-heldout": "docstrings of the held-out standard-library files: natural-language documentation text",
}


class Workload(list):
    """The prompts (a list of token-id lists, so it goes wherever prompts go) and what they are."""

    def __init__(self, name: str, source: str, prompts: list[list[int]], prompt_len: int, output_len: int,
                 tokenization: str, notes: dict | None = None):
        super().__init__(prompts)
        self.name = name
        self.source = source  # "builtin" | "file" | "hub"
        self.prompt_len = prompt_len
        self.output_len = output_len  # max_new_tokens the workload asks for
        self.tokenization = tokenization  # the model's tokenizer, or bytes for a model without one
        self.notes = dict(notes or {})

    def metadata(self) -> dict:
        return dict(workload=self.name, workload_source=self.source, prompt_len=self.prompt_len,
                    output_len=self.output_len, tokenization=self.tokenization, **self.notes)


def known_workloads() -> list[str]:
    return list(BUILTIN)


ALLOWED = "a local .json/.jsonl/.parquet/.csv/.txt file or a hub dataset org/name"
SPLITS = ("measure", "calibration")
OWN_SPLIT = "split"  # the calibration setting that names the workload's own calibration split
CALIBRATION_FIRST = 1_000_000  # synthetic-ids: calibration sequence i is sequence CALIBRATION_FIRST + i


def resolve_workload(name: str) -> tuple[str, str]:
    """What a workload name is: ("builtin", name), ("file", path) or ("hub", name). The one place a workload
    name is resolved; the checks before a run and the loader both call it. BadInput for anything else."""
    if name in BUILTIN:
        return "builtin", name
    path = Path(name).expanduser()
    if path.is_file():
        return "file", str(path)
    if path.exists() or path.suffix.lower() in DATASET_SUFFIXES or path.suffix.lower() == ".txt" \
            or name.startswith((".", "/", "~")):
        raise BadInput(f"workload {name!r}: no such file; give a .json/.jsonl/.parquet/.csv/.txt file or one of: "
                       f"{', '.join(BUILTIN)}")
    if name.count("/") == 1:
        return "hub", name
    from .models import did_you_mean
    raise BadInput(f"unknown workload {name!r}{did_you_mean(name, BUILTIN)}; allowed: {', '.join(BUILTIN)}, "
                   f"{ALLOWED}")


def check_workload(name: str, text_column: str = "text") -> None:
    """Validation before a run (no model, no tokenizer): BadInput for a name that cannot be a workload, a file
    that does not parse or has no text column or no text, a hub dataset that cannot be reached."""
    kind, ref = resolve_workload(name)
    if kind == "builtin" and name != "synthetic-ids" and not any(t.strip() for t in builtin_texts(name)):
        raise BadInput(f"workload {name!r} is empty on this machine: no held-out standard-library text was found "
                       "(it is read from this Python's standard library); use synthetic-ids or a text file")
    if kind == "file":
        if not any(t.strip() for t in load_text_rows(Path(ref), text_column)):
            raise BadInput(f"workload {name!r} has no non-empty text in column {text_column!r}")
    elif kind == "hub":
        _require_hub(name)


def check_calibration(calibration: str, workload: str) -> None:
    """Validation before a run: the calibration set is the workload's own split, or another workload that exists."""
    if calibration == OWN_SPLIT:
        return
    if calibration == workload:
        raise BadInput(f"calibration {calibration!r} is the cell's own workload, whose prompts are the measured ones; "
                       f"use calibration = {OWN_SPLIT!r} (its calibration split) or another workload")
    try:
        check_workload(calibration)
    except BadInput as exc:
        raise BadInput(f"calibration {calibration!r}: {exc}; or use {OWN_SPLIT!r}, the workload's own calibration "
                       "split") from None


def load_calibration(workload: str, calibration: str = OWN_SPLIT, **kwargs) -> Workload:
    """The prompts a profiling pass runs on: the workload's calibration split, or another workload's prompts.
    kwargs: load_workload's (model, batch_size, prompt_len, output_len, seed)."""
    check_calibration(calibration, workload)
    if calibration == OWN_SPLIT:
        return load_workload(workload, split="calibration", **kwargs)
    out = load_workload(calibration, **kwargs)
    out.notes["calibration_for"] = workload
    return out


def builtin_texts(name: str) -> list[str]:
    """The texts of a built-in workload, in a fixed order (sorted by file name)."""
    held = [d for d in stdlib_corpus().split()[1]]
    if name == "code-heldout":
        return [d.text for d in held]
    if name == "docs-heldout":
        return [doc for d in held for doc in docstrings(d.text)]
    raise BadInput(f"workload {name!r} is not a built-in text workload")


def load_workload(name_or_path: str, tokenizer=None, num_prompts: int | None = None, prompt_len: int = 64,
                  output_len: int = 32, vocab_size: int | None = None, seed: int = 0, text_column: str = "text",
                  *, model=None, batch_size: int | None = None, split: str = "measure") -> Workload:
    """Prompts for one run: `num_prompts` prompts of exactly `prompt_len` tokens (built-ins) or of at most
    `prompt_len` tokens (one per row of a file; rows are reused in order when there are fewer than asked).

    tokenizer: the model's (a transformers tokenizer). Without one (random-weight presets) the UTF-8 bytes of
    the text are the ids, modulo `vocab_size`, so the prompts stay deterministic and text-shaped.
    model (a LoadedModel) and batch_size are the harness's spelling of tokenizer/vocab_size and num_prompts.
    split: "measure", or "calibration" for as many prompts of the same shape that are not the measured ones."""
    if model is not None:
        tokenizer = tokenizer or model.tokenizer
        config = model.model.config
        vocab_size = vocab_size or getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
    num_prompts = num_prompts or batch_size or 8
    for label, value, low in (("num_prompts", num_prompts, 1), ("prompt_len", prompt_len, 1),
                              ("output_len", output_len, 1)):
        if value < low:
            raise BadInput(f"{label}={value}: must be at least {low}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {SPLITS}")
    calibrating = split == "calibration"
    if name_or_path == "synthetic-ids":
        if not vocab_size:
            raise BadInput("workload 'synthetic-ids' needs vocab_size (or the model) to draw token ids")
        first = CALIBRATION_FIRST if calibrating else 0
        return Workload(name_or_path, "builtin", synthetic_prompts(num_prompts, prompt_len, vocab_size, seed, first),
                        prompt_len, output_len, f"random ids in [1, {vocab_size})",
                        dict(description=BUILTIN[name_or_path], split=split, first_sequence=first))
    if tokenizer is None and not vocab_size:
        raise BadInput("a model without a tokenizer needs vocab_size to turn text into ids")
    encode, tokenization = _encoder(tokenizer, vocab_size)
    fallback = getattr(model, "notes", {}).get("tokenization") if tokenizer is None else None
    if fallback:  # say why the bytes: the checkpoint's own tokenizer could not be used
        tokenization = f"{tokenization}: {fallback[len('utf-8 bytes: '):]}"

    if name_or_path in BUILTIN:
        source, prompts, notes = _text_windows(name_or_path, encode, num_prompts, prompt_len, seed, calibrating)
    else:
        source, prompts, notes = _text_rows(name_or_path, encode, num_prompts, prompt_len, text_column, calibrating)
    return Workload(name_or_path, source, prompts, prompt_len, output_len, tokenization, dict(notes, split=split))


def _text_windows(name: str, encode, n: int, length: int, seed: int, calibrating: bool):
    """A built-in text workload's (source, prompts, notes): windows of its token stream (the calibration split:
    halfway between them)."""
    stream: list[int] = []
    for text in builtin_texts(name):
        stream.extend(encode(text))
    if not stream:
        raise BadInput(f"workload {name!r}: its text encodes to no tokens with this model's tokenization")
    if calibrating and len(stream) // n < 2 * length:
        raise BadInput(f"workload {name!r}: {n} prompts of {length} tokens leave no room in its {len(stream)}-token "
                       "stream for a calibration split of as many; name another workload as the calibration set, "
                       "or use the engine option profile=oracle")
    prompts = _windows(stream, n, length, seed, phase=0.5 if calibrating else 0.0)
    return "builtin", prompts, dict(description=BUILTIN[name], stream_tokens=len(stream),
                                    wrapped=len(stream) < n * length,
                                    windows="halfway between the measured windows" if calibrating else "evenly spaced")


def _text_rows(name: str, encode, n: int, length: int, text_column: str, calibrating: bool):
    """A file's or hub dataset's (source, prompts, notes): a prompt per row (the calibration split: the rows after
    those the batch uses)."""
    kind, ref = resolve_workload(name)
    if kind == "file":
        texts, source = load_text_rows(Path(ref), text_column), "file"
    else:
        texts, source = _hub_texts(name, text_column), "hub"
    rows = [ids[:length] for ids in (encode(t) for t in texts) if ids]
    if not rows:
        raise BadInput(f"workload {name!r} has no non-empty text in column {text_column!r}")
    first = n if calibrating else 0
    if first >= len(rows):
        raise BadInput(f"workload {name!r} has {len(rows)} rows and the batch uses {n}: no rows are left for a "
                       "calibration split; name another workload as the calibration set, or use the engine option "
                       "profile=oracle")
    prompts = [rows[first + i % (len(rows) - first)] for i in range(n)]
    return source, prompts, dict(rows=len(rows), first_row=first, reused_rows=n > len(rows) - first)


def synthetic_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int, first: int = 0) -> list[list[int]]:
    """Sequences first .. first + batch_size - 1; sequence i is the same at every batch size (seeded by seed and
    i); id 0 is left out as the pad id."""
    import torch
    out = []
    jitter = prompt_len // 4
    for i in range(first, first + batch_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        n = prompt_len + int(torch.randint(-jitter, jitter + 1, (1,), generator=g)) if jitter else prompt_len
        out.append(torch.randint(1, vocab_size, (max(1, n),), generator=g).tolist())
    return out


def _encoder(tokenizer, vocab_size):
    if tokenizer is not None:
        return (lambda text: tokenizer.encode(text, add_special_tokens=False)), \
            f"model tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} ids)"
    return (lambda text: [b % vocab_size for b in text.encode("utf-8")]), \
        f"utf-8 bytes modulo vocab {vocab_size} (the model has no tokenizer)"


def _windows(stream: list[int], n: int, length: int, seed: int, phase: float = 0.0) -> list[list[int]]:
    """n windows of `length` tokens at evenly spaced offsets (shifted by the seed, and by `phase` of the spacing),
    wrapping around the stream."""
    if not stream:
        raise BadInput("the built-in workload is empty on this machine (no held-out standard-library text)")
    total = len(stream)
    step = max(1, total // n)
    shift = int(hashlib.sha1(str(seed).encode()).hexdigest(), 16) % step if seed else 0
    out = []
    for i in range(n):
        start = (i * step + shift + int(phase * step)) % total
        window = stream[start:start + length]
        while len(window) < length:  # wrap around a short stream
            window += stream[: length - len(window)]
        out.append(window)
    return out


def _require_hub(name: str) -> None:
    from .models import hub_reachable
    if not hub_reachable():
        raise BadInput(f"workload {name!r} looks like a hub dataset but the hub cannot be reached from this "
                       f"machine (no network); give a local .json/.jsonl/.parquet/.txt file or one of: "
                       f"{', '.join(BUILTIN)}")


def _hub_texts(name: str, text_column: str) -> list[str]:
    _require_hub(name)
    import datasets
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise BadInput(f"hub dataset {name!r} could not be loaded ({str(exc).splitlines()[0][:200]})") from None
    if text_column not in ds.column_names:
        raise BadInput(f"hub dataset {name!r} has columns {ds.column_names}; expected a {text_column!r} column")
    return [str(t) for t in ds[text_column] if t]


def workload_sizes(name: str) -> dict:
    """Sizes of a built-in workload for `list workloads` (texts and characters; tokens depend on the model)."""
    texts = [] if name == "synthetic-ids" else builtin_texts(name)
    return dict(texts=len(texts), chars=sum(len(t) for t in texts))
