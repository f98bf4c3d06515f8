"""The matrix file: expansion into cells, include/exclude, options, and one clear error per kind of bad input."""
from pathlib import Path

import pytest

from engines.errors import BadInput
from harness import matrix

GOOD = """
[matrix]
engines = ["resident", "offload", "lru"]
models = ["tiny-mixtral-random", "tiny-qwen2moe-random"]
batch_sizes = [1, 4]
hardware = ["cpu"]

[settings]
max_new_tokens = 8
min_duration_s = 1
warmup = 0

[engines.lru]
capacity = "50%"

[models.tiny-qwen2moe-random]
prompt_len = 12

[[exclude]]
engine = "resident"
batch_size = 4

[[include]]
engine = "offload"
model = "tiny-mixtral-random"
batch_size = [16, 32]
hardware = "cpu"
"""


def test_expands_product_with_rules_and_options():
    m = matrix.parse(GOOD, "m.toml")
    keys = [(c.engine, c.model, c.batch_size) for c in m.cells]
    assert len(keys) == 3 * 2 * 2 - 2 + 2  # product, minus resident at batch 4 (two models), plus two includes
    assert ("resident", "tiny-mixtral-random", 4) not in keys
    assert ("offload", "tiny-mixtral-random", 32) in keys
    assert len(set(c.key() for c in m.cells)) == len(m.cells)
    lru = [c for c in m.cells if c.engine == "lru"]
    assert all(c.engine_options == {"capacity": "50%"} for c in lru)
    assert all(c.max_new_tokens == 8 and c.warmup == 0 and c.min_duration_s == 1.0 for c in m.cells)
    assert {c.prompt_len for c in m.cells if c.model == "tiny-qwen2moe-random"} == {12}
    assert {c.prompt_len for c in m.cells if c.model == "tiny-mixtral-random"} == {32}
    assert all(c.workload == "synthetic-ids" for c in m.cells)


def test_an_include_may_give_its_cells_engine_options():
    text = GOOD + """
[[include]]
engine = "lru"
model = "tiny-mixtral-random"
batch_size = 1
hardware = "cpu"
options = { capacity = "2" }
"""
    lru = [c for c in matrix.parse(text, "m.toml").cells if c.engine == "lru" and c.batch_size == 1
           and c.model == "tiny-mixtral-random"]
    assert sorted(c.engine_options["capacity"] for c in lru) == ["2", "50%"]  # the include's and the axes' cell
    assert len({c.key() for c in lru}) == 2
    with pytest.raises(BadInput, match=r"\[\[include\]\] #2.options: must be a table of engine options"):
        matrix.parse(text.replace('options = { capacity = "2" }', 'options = "2"'), "m.toml")


@pytest.mark.parametrize("text, expected", [
    ("[matrix\nengines = 1", "m.toml: TOML syntax error"),
    (GOOD.replace("max_new_tokens = 8", "max_new_tokens = 8\nmax_new_token = 3"),
     "m.toml: [settings]: unknown key 'max_new_token'"),
    (GOOD.replace("max_new_tokens = 8", 'max_new_tokens = "8"'),
     "m.toml: [settings]: max_new_tokens must be an integer, got a string '8'"),
    (GOOD.replace('hardware = ["cpu"]', "hardware = []"), "m.toml: [matrix]: hardware is empty"),
    (GOOD.replace("batch_sizes = [1, 4]", "batch_sizes = [0, 4]"), "m.toml: [matrix]: batch size 0 must be at least 1"),
    (GOOD.replace("batch_sizes = [1, 4]", 'batch_sizes = [1, "x"]'),
     "m.toml: [matrix]: batch_sizes must hold whole numbers, got a string 'x'"),
    (GOOD.replace("[matrix]", "[matrix]\nengine = ['x']"), "m.toml: [matrix] unknown key 'engine'"),
    (GOOD.replace('"lru"]', '"lruu"]').replace("[engines.lru]", "[engines.lruu]"),
     "m.toml: unknown engine 'lruu' (did you mean 'lru'?)"),
    (GOOD.replace('capacity = "50%"', 'capacit = "50%"'), "m.toml: engine 'lru' has no option 'capacit'"),
    (GOOD.replace('models = ["tiny-mixtral-random", ', 'models = ["tiny-mixtral-randon", '),
     "m.toml: unknown model 'tiny-mixtral-randon' (did you mean 'tiny-mixtral-random'?)"),
    (GOOD.replace('hardware = ["cpu"]', 'hardware = ["tpu"]').replace('hardware = "cpu"', 'hardware = "tpu"'),
     "m.toml: unknown hardware 'tpu'"),
    (GOOD.replace("[[exclude]]\nengine", "[[exclude]]\nengines"), "m.toml: [[exclude]] #1: unknown key 'engines'"),
    (GOOD.replace('hardware = "cpu"\n', ""), "m.toml: [[include]] #1: an include names a whole cell; missing hardware"),
    ("[settings]\nseed = 1\n", "m.toml: missing [matrix] table"),
    (GOOD.replace("max_new_tokens = 8", "max_new_tokens = 8\nnvml_trace = 1"),
     "m.toml: [settings]: nvml_trace must be true or false, got an integer 1"),
    (GOOD.replace("max_new_tokens = 8", 'max_new_tokens = 8\nprocess_per = "engine"'),
     "m.toml: [settings]: process_per 'engine' is not one of cell, model"),
])
def test_bad_matrix_names_file_and_key(text, expected):
    with pytest.raises(BadInput) as err:
        matrix.parse(text, "m.toml")
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_cuda_hardware_on_a_machine_without_cuda_is_bad_input_unless_dry_run():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    text = GOOD.replace('hardware = ["cpu"]', 'hardware = ["cuda:budget=24GiB"]').replace('hardware = "cpu"',
                                                                                        'hardware = "cuda"')
    with pytest.raises(BadInput, match="needs CUDA"):
        matrix.parse(text, "m.toml")
    assert len(matrix.parse(text, "m.toml", check_hardware=False).cells) == 12


@pytest.mark.parametrize("name", ["cpu.toml", "gpu.toml"])
def test_shipped_matrices_parse(name):
    from workloads.models import known_models
    if name == "gpu.toml" and not {"small", "mixtral-8x7b"} <= set(known_models()):
        pytest.skip("workloads/models.py does not know the 'small' and 'mixtral-8x7b' models yet")
    m = matrix.load(matrix.MATRICES_DIR / name, check_hardware=name == "cpu.toml")
    assert m.cells
    assert {c.engine for c in m.cells} >= {"resident", "offload"}


def test_the_h200_specmoe_job_matrices():
    """Issue 13's matrices (results/h200/acceptance_job.sh): every engine and setting at every batch size, and
    --only slices by batch size (which device calls can share out) cover the main matrix."""
    main = matrix.load(matrix.MATRICES_DIR / "h200-specmoe.toml", check_hardware=False).cells
    spec = [c.engine_options for c in main if c.engine == "specmoe" and c.batch_size == 16]
    assert {c.engine for c in main} == {"offload", "overlap", "caching", "lru", "nospec", "specmoe"}
    assert {"gamma": 4, "adaptive": False, "prefetch": "none"} in spec  # the paper's settings
    assert {"gamma": "auto", "prefetch": "draft"} in spec  # the best
    assert sorted(o["gamma"] for o in spec if o.get("adaptive") is False and o["prefetch"] == "draft") == \
        [1, 2, 4, 6, 8, 10]
    assert all(c.hardware == "cuda:budget=25%" and c.dtype == "bfloat16" and c.max_new_tokens == 64 for c in main)
    slices = [matrix.only(main, [f"batch_size={b}"]) for b in ("1,4", "16,64", "256")]
    assert sorted(c.key() for part in slices for c in part) == sorted(c.key() for c in main)
    assert len(main) == 13 * 5 == len({c.key() for c in main})
    n = matrix.load(matrix.MATRICES_DIR / "h200-specmoe-n.toml", check_hardware=False).cells
    assert sorted((c.hardware, str(c.engine_options.get("draft_experts"))) for c in n if c.batch_size == 16) == [
        ("cuda:budget=25%", "1"), ("cuda:budget=50%", "1"), ("cuda:budget=50%", "2"), ("cuda:budget=50%", "None"),
        ("cuda:budget=50%", "budget")]  # None: nospec


def test_the_h200_paper_study_matrices():
    """Issue 14's matrices (results/h200/paper_job.sh): the figure's engines on the NLLB-like checkpoint, T(gamma)
    for gamma 1..10 and the N sweep / draft policies at batch 1 and 64, each cell once."""
    def cells(name):
        found = matrix.load(matrix.MATRICES_DIR / name, check_hardware=False).cells
        assert len({c.key() for c in found}) == len(found)
        return found
    figure = cells("h200-paper-nllb.toml")
    at = {(c.engine, c.hardware) for c in figure if c.batch_size == 256}
    assert {(e, "cuda:budget=25%") for e in ("offload", "overlap", "caching", "lru", "nospec", "specmoe")} <= at
    assert ("resident", "cuda") in at and ("offload", "cuda:budget=19%") in at
    assert sorted({c.batch_size for c in figure if c.engine == "offload"}) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    paper = [c.engine_options for c in figure if c.engine == "specmoe" and c.engine_options.get("prefetch") == "none"]
    assert paper and all(o["draft_experts"] == 4 for o in paper)  # the paper's N, not the default's all that fit
    gamma = cells("h200-paper-nllb-gamma.toml")
    assert sorted((c.batch_size, c.engine_options["gamma"]) for c in gamma) == \
        sorted((b, g) for b in (1, 64) for g in range(1, 11))
    assert all(c.engine_options["adaptive"] is False and c.engine_options["prefetch"] == "none"
               and c.engine_options["draft_experts"] == 4 for c in gamma)
    sweep = {(c.engine_options.get("draft_experts", 4), c.engine_options.get("draft_policy", "hot-temporal"))
             for c in cells("h200-paper-nllb-n.toml") if c.batch_size == 64}
    assert sweep == {(n, "hot-temporal") for n in (1, 2, 4, 8, 16)} | {(4, "random"), (4, "hot-global")}
    assert {c.model for name in ("h200-paper-nllb.toml", "h200-paper-nllb-gamma.toml", "h200-paper-nllb-n.toml")
            for c in cells(name)} == {"nllb-like"}
    assert {c.model for c in cells("h200-paper-mixtral.toml")} == {"mixtral-like"}
    default = {(c.engine, c.batch_size, c.engine_options.get("draft_experts"), c.engine_options.get("gamma"))
               for c in cells("h200-paper-nllb-default.toml")}
    for b in (1, 64, 256):  # the new default (all that fit) and the old one (4), side by side in one job
        assert {("nospec", b, None, None), ("nospec", b, 4, None), ("specmoe", b, None, None),
                ("specmoe", b, 4, None), ("offload", b, None, None)} <= default
    assert ("specmoe", 1, "budget", 10) in default  # T(10) at N = 16


def test_missing_file_is_one_line(tmp_path: Path):
    with pytest.raises(BadInput, match=r"nope.toml: no such matrix file"):
        matrix.load(tmp_path / "nope.toml")


def test_nvml_trace_is_a_boolean_setting():
    m = matrix.parse(GOOD.replace("max_new_tokens = 8", "max_new_tokens = 8\nnvml_trace = true"), "m.toml")
    assert all(c.nvml_trace for c in m.cells)
