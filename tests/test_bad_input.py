"""Bad input is one line naming the bad value and what is allowed, exit 2, before anything is measured: never a
`skipped` cell, never a traceback (issue 15, part 2, item 3)."""
import json
import textwrap
from pathlib import Path

import pytest

from harness.cli import main


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, args)))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def refused(args, capsys, tmp_path) -> str:
    """The one error line of a command refused before it measured anything."""
    code, out, err = run_main(list(args) + ["--results-dir", tmp_path / "runs"], capsys)
    assert code == 2, out + err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not list((tmp_path / "runs").glob("*/cells/*.json"))  # nothing measured, nothing recorded
    return err


def matrix(tmp_path: Path, engine="lru", options="", model="tiny-mixtral-random", workload="synthetic-ids",
           settings="") -> Path:
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(f"""
        [matrix]
        engines = ["{engine}"]
        models = [{json.dumps(model)}]
        batch_sizes = [1]
        hardware = ["cpu"]
        workloads = [{json.dumps(workload)}]
        [settings]
        max_new_tokens = 2
        {settings}
        """) + (f"[engines.{engine}]\n{options}\n" if options else ""))
    return path


@pytest.mark.parametrize("options, message", [
    ("capacity = true", "option capacity=True: expected a string or a number"),
    ('capacity = "-50%"', "lru capacity '-50%': a share of the experts must be in (0%, 100%]"),
    ("capacity = [1, 2]", "capacity must be a string, a number or true/false, got a list [1, 2]"),
    ('capacity = "lots"', "lru capacity 'lots': give a number of experts (64), a share (25%) or a size (2GiB)"),
])
def test_engine_option_values_and_types(options, message, capsys, tmp_path):
    assert message in refused(["run", matrix(tmp_path, options=options)], capsys, tmp_path)


def test_engine_option_from_the_command_line_is_coerced_by_the_engine(capsys, tmp_path):
    err = refused(["compare", "--engines", "specmoe", "--model", "tiny-mixtral-random", "--workload",
                   "synthetic-ids", "--option", "specmoe.gamma=2.5"], capsys, tmp_path)
    assert "engine 'specmoe' option gamma='2.5': expected a whole number" in err


@pytest.mark.parametrize("engine, options, message", [
    ("specmoe", 'prefetch = "always"', "specmoe prefetch='always'; allowed: draft, none"),
    ("specmoe", 'gamma = "auto"\ngammas = "1,0,4"',
     "specmoe gammas='1,0,4': give draft lengths of at least 1, like 1,2,4,6,8,10"),
    ("specmoe", 'gamma = "auto"\ngammas = ""', "specmoe gammas='': give draft lengths of at least 1"),
    ("specmoe", 'gamma = "long"', "option gamma='long': expected a whole number or auto"),
    ("caching", 'profile = "measured"', "caching profile='measured'; allowed: calibration, oracle"),
])
def test_speculation_and_profiling_options(engine, options, message, capsys, tmp_path):
    assert message in refused(["run", matrix(tmp_path, engine=engine, options=options)], capsys, tmp_path)


@pytest.mark.parametrize("lengths", [["--prompt-len", "100000"], ["--prompt-len", "32", "--max-new-tokens", "481"]])
def test_prompt_and_new_tokens_beyond_the_models_positions(lengths, capsys, tmp_path):
    err = refused(["compare", "--engines", "specmoe,offload", "--model", "tiny-mixtral-random", "--workload",
                   "synthetic-ids", *lengths], capsys, tmp_path)  # was: exit 0 and every cell `skipped`
    assert "model 'tiny-mixtral-random': prompt + new tokens = " in err
    assert "more than the model's max_position_embeddings (512)" in err


def test_a_batch_whose_cache_cannot_fit_the_machine(capsys, tmp_path):
    err = refused(["compare", "--engines", "offload", "--model", "tiny-mixtral-random", "--workload", "synthetic-ids",
                   "--batch-sizes", "1,100000000"], capsys, tmp_path)  # was: minutes of work, then the OOM killer
    assert "model 'tiny-mixtral-random': batch 100000000 of 64 positions a row needs " in err
    assert "GiB of KV cache; cpu has " in err and "use a smaller batch" in err


def test_a_calibration_set_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "calibration.jsonl"
    err = refused(["run", matrix(tmp_path, engine="caching", settings=f'calibration = "{missing}"')], capsys,
                  tmp_path)
    assert f"calibration '{missing}': workload '{missing}': no such file" in err and "or use 'split'" in err
    err = refused(["run", matrix(tmp_path, engine="caching", workload="code-heldout",
                                 settings='calibration = "code-heldout"')], capsys, tmp_path)
    assert "calibration 'code-heldout' is the cell's own workload" in err


def test_equal_options_spelled_differently_name_one_cell():
    from harness.matrix import parse
    m = parse('[matrix]\nengines = ["specmoe"]\nmodels = ["tiny-mixtral-random"]\nbatch_sizes = [1]\n'
              'hardware = ["cpu"]\n[engines.specmoe]\nadaptive = "off"\ngamma = "3"\n', "m.toml")
    assert m.cells[0].engine_options == {"adaptive": False, "gamma": 3}


def test_layers_beyond_the_model(capsys, tmp_path):
    err = refused(["compare", "--engines", "offload", "--model", "tiny-mixtral-random", "--workload",
                   "synthetic-ids", "--layers", "9"], capsys, tmp_path)
    assert "--layers 9: must be between 1 and 2" in err


def test_local_directory_without_config_or_with_a_broken_one(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    args = ["compare", "--engines", "offload", "--model", ckpt, "--workload", "synthetic-ids"]
    assert "no config.json" in refused(args, capsys, tmp_path)
    (ckpt / "config.json").write_text('{"model_type": "mixtral", "hidden_size": ')
    assert "its config cannot be loaded" in refused(args, capsys, tmp_path)


def test_checkpoint_without_moe_layers(capsys, tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(tmp_path / "dense")
    err = refused(["compare", "--engines", "offload", "--model", tmp_path / "dense", "--workload", "synthetic-ids"],
                  capsys, tmp_path)
    assert "has no MoE layers" in err and "LlamaForCausalLM" in err and "supported families: Mixtral" in err


def test_workload_file_without_text_column_or_with_broken_lines(capsys, tmp_path):
    no_text = tmp_path / "prompts.jsonl"
    no_text.write_text('{"prompt": "def add(a, b):"}\n')
    assert "expected a 'text' column" in refused(["run", matrix(tmp_path, workload=str(no_text))], capsys, tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "import os"}\n{"text": "unterminated\n')
    assert "line 2 is not JSON" in refused(["run", matrix(tmp_path, workload=str(broken))], capsys, tmp_path)


def test_offline_hub_id(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    err = refused(["compare", "--engines", "offload", "--model", "nobody/no-such-model", "--workload",
                   "synthetic-ids"], capsys, tmp_path)
    assert "is a hub id but the hub cannot be reached" in err


# -- faulty paths and plug-ins (part 2, item 4) -------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/proc/out.json", "/nonexistent-dir/out.json"])
def test_an_impossible_json_target_is_refused_before_any_cell(target, capsys, tmp_path):
    """Old code: --json /proc/out.json passed the check (root may write anywhere) and failed after every cell."""
    err = refused(["compare", "--engines", "offload", "--model", "tiny-mixtral-random", "--workload",
                   "synthetic-ids", "--json", target], capsys, tmp_path)
    assert f"output path {target}" in err


def test_impossible_outputs_of_export_report_and_regress(capsys, tmp_path):
    from click.testing import CliRunner
    from test_regress import matrix as cells, write_run

    from harness.regress import regress_command
    from harness.report import report_command
    run = write_run(tmp_path, "r", cells(seed=1))
    code, _, err = run_main(["export", run, "--csv", "/proc/t.csv"], capsys)
    assert code == 2 and "output path /proc/t.csv: not writable" in err
    for command, args in ((report_command, [str(run), "--out", "/proc/report"]),
                          (regress_command, ["--baseline", str(run), "--candidate", str(run), "--out",
                                             "/proc/regress.md"]),
                          (regress_command, ["--baseline", str(run), "--candidate", str(run), "--json-out",
                                             "/proc/gh.json"])):
        res = CliRunner().invoke(command, args)
        assert res.exit_code == 2 and res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
        assert "/proc/" in res.output and "| cell |" not in res.output  # refused before the comparison


def test_checkpoint_paths_too_long_for_a_file_name_are_hashed(tmp_path):
    from harness.results import RunDir, cell_filename
    from harness.schema import CellConfig, CellResult
    deep = "/".join(["a-rather-long-directory-name"] * 12)
    a, b = (CellConfig(engine="offload", model=f"/{deep}/{leaf}", batch_size=1, hardware="cpu")
            for leaf in ("ckpt-1", "ckpt-2"))
    assert len(cell_filename(a)) <= 200 and cell_filename(a) != cell_filename(b)
    assert cell_filename(a).endswith("ckpt-1-float32-b1-cpu-synthetic-ids-p32-n32-s0.json")
    run = RunDir.create(tmp_path, "r")
    run.write_cell(CellResult(config=a, status="ok", valid=True))  # old code: OSError, file name too long
    assert run.finished(a).config.model == a.model


def test_a_plugin_that_fails_to_import_is_one_line_naming_it(capsys, tmp_path, monkeypatch):
    from engines import registry
    monkeypatch.setattr(registry, "available", lambda: dict(registry.BUILTIN, broken="no_such_module:Engine"))
    err = refused(["compare", "--engines", "broken", "--model", "tiny-mixtral-random", "--workload",
                   "synthetic-ids"], capsys, tmp_path)
    assert "engine 'broken': its plug-in no_such_module:Engine cannot be loaded (ModuleNotFoundError" in err
    code, out, _ = run_main(["list", "engines"], capsys)
    assert code == 0 and "broken" in out and "cannot be loaded" in out


def test_model_info_of_a_preset_with_layers():
    """Old code: a TypeError on exactly what its own error message suggests (--layers K)."""
    from click.testing import CliRunner

    from workloads.cli import model_group
    res = CliRunner().invoke(model_group, ["info", "mixtral-8x7b", "--no-build", "--layers", "1"])
    assert res.exit_code == 0 and "layers: 1/32" in res.output, res.output
    res = CliRunner().invoke(model_group, ["info", "olmoe-1b-7b", "--layers", "1"])
    assert res.exit_code == 0 and "moe_layers: 1" in res.output and "expert_bytes: " in res.output, res.output
