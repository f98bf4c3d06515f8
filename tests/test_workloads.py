"""Workloads: built-in held-out prompt sets, local files through `datasets`, and clear errors for bad input."""
import json
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from engines.errors import BadInput
from workloads.corpus import Corpus, Doc, is_heldout, load_corpus, stdlib_corpus
from workloads.prompts import (_windows, builtin_texts, check_calibration, check_workload, known_workloads,
                               load_calibration, load_workload)


class ToyTokenizer:
    """Whitespace words -> ids, enough to check that a workload uses the model's tokenizer."""

    def encode(self, text, add_special_tokens=False):
        return [1 + (sum(map(ord, w)) % 97) for w in text.split()]

    def __len__(self):
        return 98


def test_builtin_code_workload_is_exact_length_deterministic_and_held_out():
    a = load_workload("code-heldout", ToyTokenizer(), num_prompts=6, prompt_len=40)
    b = load_workload("code-heldout", ToyTokenizer(), num_prompts=6, prompt_len=40)
    assert a == b and len(a) == 6 and all(len(p) == 40 for p in a)
    assert len({tuple(p) for p in a}) == 6  # distinct windows
    assert a.source == "builtin" and "ToyTokenizer" in a.tokenization
    train, held = stdlib_corpus().split()
    assert held and all(is_heldout(d.name) for d in held) and not any(is_heldout(d.name) for d in train)
    assert builtin_texts("code-heldout") == [d.text for d in held]
    assert load_workload("code-heldout", ToyTokenizer(), num_prompts=6, prompt_len=40, seed=1) != a


def test_builtin_docs_workload_without_tokenizer_uses_bytes_modulo_vocab():
    w = load_workload("docs-heldout", None, num_prompts=4, prompt_len=32, vocab_size=128)
    assert all(len(p) == 32 and max(p) < 128 for p in w)
    assert "utf-8 bytes" in w.tokenization
    docs = builtin_texts("docs-heldout")
    assert docs and all(len(d) >= 40 for d in docs)


@pytest.mark.parametrize("n,length,seed", [(8, 32, 0), (64, 48, 3), (100, 50, 7), (5, 1, 1)])
def test_calibration_windows_lie_between_the_measured_windows(n, length, seed):
    """On a stream of distinct ids, windows share an id only where they overlap in the stream."""
    stream = list(range(10_000))
    measured, calibration = (_windows(stream, n, length, seed, phase) for phase in (0.0, 0.5))
    assert len(calibration) == n and all(len(w) == length for w in calibration)
    assert not {i for w in measured for i in w} & {i for w in calibration for i in w}


@pytest.mark.parametrize("name,kwargs", [("code-heldout", dict(num_prompts=64, prompt_len=48)),
                                         ("docs-heldout", dict(num_prompts=8, prompt_len=32)),
                                         ("synthetic-ids", dict(num_prompts=16, prompt_len=24))])
def test_every_workload_has_a_calibration_split_of_the_same_shape(name, kwargs):
    measured = load_workload(name, ToyTokenizer(), vocab_size=98, **kwargs)
    calibration = load_workload(name, ToyTokenizer(), vocab_size=98, split="calibration", **kwargs)
    length = kwargs["prompt_len"]  # synthetic-ids varies lengths by up to a quarter either way
    assert len(calibration) == len(measured) and all(abs(len(p) - length) <= length // 4 for p in calibration)
    assert not {tuple(p) for p in measured} & {tuple(p) for p in calibration}
    assert calibration.metadata()["split"] == "calibration" and measured.metadata()["split"] == "measure"
    assert load_calibration(name, tokenizer=ToyTokenizer(), vocab_size=98, **kwargs) == calibration


def test_a_file_calibrates_on_the_rows_after_the_batch_and_says_when_there_are_none(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("\n".join(f"row number {i} of the file" for i in range(6)))
    w = load_workload(str(path), ToyTokenizer(), num_prompts=4, split="calibration")
    assert w == [ToyTokenizer().encode(f"row number {i} of the file") for i in (4, 5, 4, 5)]
    with pytest.raises(BadInput, match="has 6 rows and the batch uses 6: no rows are left for a calibration split"):
        load_workload(str(path), ToyTokenizer(), num_prompts=6, split="calibration")


def test_a_stream_too_short_for_both_splits_is_one_line():
    with pytest.raises(BadInput, match="leave no room in its .*-token stream for a calibration split"):
        load_workload("docs-heldout", ToyTokenizer(), num_prompts=4096, prompt_len=64, split="calibration")


def test_calibration_set_checks(tmp_path):
    check_calibration("split", "code-heldout")
    check_calibration("docs-heldout", "code-heldout")
    with pytest.raises(BadInput, match="calibration 'code-heldout' is the cell's own workload"):
        check_calibration("code-heldout", "code-heldout")
    with pytest.raises(BadInput, match=r"calibration '.*nope.txt': workload .* no such file.*or use 'split'"):
        check_calibration(str(tmp_path / "nope.txt"), "code-heldout")
    other = load_calibration("code-heldout", "docs-heldout", tokenizer=ToyTokenizer(), num_prompts=3,
                             prompt_len=16)
    assert other == load_workload("docs-heldout", ToyTokenizer(), num_prompts=3, prompt_len=16)
    assert other.metadata()["calibration_for"] == "code-heldout"


def test_harness_spelling_model_and_batch_size():
    class Loaded:
        tokenizer = None

        class model:
            class config:
                vocab_size = 300

    w = load_workload("code-heldout", batch_size=3, prompt_len=16, model=Loaded, seed=0)
    assert len(w) == 3 and all(len(p) == 16 for p in w) and max(max(p) for p in w) < 300


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ".txt"])
def test_local_files_load_through_datasets(tmp_path, suffix):
    rows = ["def add(a, b):", "The quick brown fox jumps", "import os"]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": r} for r in rows]))
    elif suffix == ".parquet":
        pd.DataFrame({"text": rows}).to_parquet(path)
    elif suffix == ".csv":
        pd.DataFrame({"text": rows}).to_csv(path, index=False)
    else:
        path.write_text("\n".join(rows) + "\n")
    w = load_workload(str(path), None, num_prompts=5, prompt_len=8, vocab_size=256)
    assert w.source == "file"
    assert w[0] == list(b"def add(") and w[1] == list(b"The quic") and w[2] == list(b"import o")
    assert w[3] == w[0] and w.notes["reused_rows"] is True  # fewer rows than prompts: rows are reused in order
    check_workload(str(path))


def test_wrong_columns_name_what_was_found_and_what_is_expected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": "yo"}) + "\n")
    with pytest.raises(BadInput) as err:
        load_workload(str(path), None, vocab_size=256)
    msg = str(err.value)
    assert "'question'" in msg and "'answer'" in msg and "expected a 'text' column" in msg and "\n" not in msg


def test_missing_file_and_unknown_name_are_one_line_errors(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_workload(str(tmp_path / "nope.jsonl"), None, vocab_size=256)
    with pytest.raises(BadInput, match="did you mean 'code-heldout'"):
        load_workload("code-heldut", None, vocab_size=256)
    with pytest.raises(BadInput, match="prompt_len=0"):
        load_workload("code-heldout", None, vocab_size=256, prompt_len=0)
    with pytest.raises(BadInput, match="no such file"):
        check_workload("./missing.parquet")
    assert "code-heldout" in known_workloads() and "docs-heldout" in known_workloads()


def test_hub_dataset_without_network_fails_fast_with_one_line():
    t0 = time.perf_counter()
    with pytest.raises(BadInput, match="hub cannot be reached") as err:
        load_workload("someorg/somedataset", None, vocab_size=256)
    assert time.perf_counter() - t0 < 15 and "\n" not in str(err.value)
    with pytest.raises(BadInput, match="hub cannot be reached"):
        check_workload("someorg/somedataset")  # before any model is loaded


def test_corpus_bad_input(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.bin").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(BadInput, match="holds no text"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(BadInput, match=r"has columns \['body'\]; expected a 'text' column"):
        load_corpus(tmp_path / "rows.jsonl")


def test_corpus_from_a_folder_and_a_rows_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha text")
    (tmp_path / "d" / "b.md").write_text("beta text")
    corpus = load_corpus(tmp_path / "d")
    assert [d.name for d in corpus.docs] == ["a.txt", "b.md"]
    pd.DataFrame({"text": ["one", "two"]}).to_parquet(tmp_path / "r.parquet")
    assert [d.text for d in load_corpus(tmp_path / "r.parquet").docs] == ["one", "two"]
    assert Corpus("x", [Doc("a", "1")]).fingerprint != Corpus("x", [Doc("a", "2")]).fingerprint


def test_list_rows_show_names_and_sizes():
    from workloads.cli import list_models_rows, list_workloads_rows
    models = {r["name"]: r for r in list_models_rows()}
    for name in ("tiny", "small", "tiny-random", "mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b",
                 "olmoe-1b-7b", "deepseek-v2-lite", "gpt-oss-20b"):
        assert name in models and models[name]["sizes"]
    mixtral = models["mixtral-8x7b"]["sizes"]
    assert "expert 336.00 MiB" in mixtral and "46.7B params" in mixtral  # 352.3e6 bytes, in the one byte format
    assert models["tiny"]["source"] == "trained" and models["gpt-oss-20b"]["source"] == "synthetic"
    work = {r["name"]: r for r in list_workloads_rows()}
    assert "texts" in work["code-heldout"]["sizes"] and "texts" in work["docs-heldout"]["sizes"]


def test_model_train_bad_input_exits_2_with_one_line(tmp_path):
    from workloads.cli import model_group
    runner = CliRunner()
    for args, needle in ((["train", "--preset", "huge"], "unknown training preset 'huge'; allowed: tiny, small"),
                         (["train", "--corpus", str(tmp_path / "none")], "does not exist")):
        result = runner.invoke(model_group, args)
        assert result.exit_code == 2, result.output
        error_lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
        assert len(error_lines) == 1 and needle in error_lines[0]
