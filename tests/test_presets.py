"""Architecture presets: the public models' shapes, their byte arithmetic, and that each builds at --layers 2."""
import pytest
import torch
from click.testing import CliRunner

from engines.errors import BadInput
from engines.runtime import find_experts_modules
from workloads.models import known_models, load_model
from workloads.presets import PRESETS, preset_config, shape_report, with_layers

# (MoE layers, experts per layer, parameters of one routed expert) from the published config.json files.
PUBLISHED_SHAPES = {
    "mixtral-8x7b": (32, 8, 3 * 4096 * 14336),
    "qwen1.5-moe-a2.7b": (24, 60, 3 * 2048 * 1408),
    "qwen3-30b-a3b": (48, 128, 3 * 2048 * 768),
    "olmoe-1b-7b": (16, 64, 3 * 2048 * 1024),
    "deepseek-v2-lite": (26, 64, 3 * 2048 * 1408),  # 27 layers, the first one dense
    "gpt-oss-20b": (24, 32, 3 * 2880 * 2880 + 2 * 2880 + 2880),  # gate_up and down carry biases
}


def test_every_public_model_has_a_preset():
    assert set(PRESETS) == set(PUBLISHED_SHAPES)
    assert set(PRESETS) <= set(known_models())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_the_published_total(name):
    report = shape_report(preset_config(name))
    published = PRESETS[name].published_params
    assert abs(report.total_params - published) / published < 0.02, (report.total_params, published)
    layers, experts, per_expert = PUBLISHED_SHAPES[name]
    assert (report.moe_layers, report.experts_per_layer, report.params_per_expert) == (layers, experts, per_expert)
    assert report.expert_params == layers * experts * per_expert
    assert report.bytes(torch.bfloat16)["expert_bytes"] == 2 * per_expert


def test_mixtral_expert_bytes_are_the_well_known_figures():
    b = shape_report(preset_config("mixtral-8x7b")).bytes(torch.bfloat16)
    assert b["expert_bytes"] == 352_321_536  # 3 x 4096 x 14336 x 2 bytes
    assert b["total_expert_bytes"] == 32 * 8 * 352_321_536  # ~90.2 GB of the model's ~93.4 GB


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_at_two_layers_and_reports_its_expert_bytes(name):
    loaded = load_model(name, dtype=torch.bfloat16, layers=2)
    try:
        layers, experts, per_expert = PUBLISHED_SHAPES[name]
        moe_here = 1 if name == "deepseek-v2-lite" else 2  # DeepSeek's first layer is dense
        assert loaded.source == "synthetic" and loaded.notes["synthetic"] is True
        assert (loaded.layers_loaded, loaded.layers_total) == (2, preset_config(name).num_hidden_layers)
        assert loaded.notes["layers"].startswith("2 of ")
        modules = find_experts_modules(loaded.model)
        assert len(modules) == moe_here and modules[0][1].num_experts == experts
        built = sum(p.nbytes for _, m in modules for p in m.parameters(recurse=False)
                    if p.dim() >= 2 and p.shape[0] == m.num_experts)
        assert built == loaded.notes["total_expert_bytes"] == moe_here * experts * per_expert * 2
        assert loaded.notes["expert_bytes"] == per_expert * 2
        assert loaded.notes["full_model_total_expert_bytes"] == layers * experts * per_expert * 2
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        assert logits.shape[-1] == preset_config(name).vocab_size and torch.isfinite(logits.float()).all()
    finally:
        del loaded


def test_random_weights_are_seeded_and_experts_differ():
    a = load_model("olmoe-1b-7b", dtype=torch.bfloat16, layers=1, seed=3)
    b = load_model("olmoe-1b-7b", dtype=torch.bfloat16, layers=1, seed=3)
    wa = find_experts_modules(a.model)[0][1].gate_up_proj
    wb = find_experts_modules(b.model)[0][1].gate_up_proj
    assert torch.equal(wa, wb)
    assert not torch.equal(wa[0], wa[1])
    assert abs(wa.float().std().item() - 0.02) < 0.002


def test_layers_out_of_range_is_bad_input():
    with pytest.raises(BadInput, match="--layers 99: must be between 1 and 16"):
        load_model("olmoe-1b-7b", layers=99)


def test_per_layer_lists_shrink_with_the_layer_count():
    config, loaded, total = with_layers(preset_config("gpt-oss-20b"), 3)
    assert (loaded, total, config.num_hidden_layers) == (3, 24, 3)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]


def test_a_preset_too_big_for_host_memory_says_which_layers_fit(monkeypatch):
    monkeypatch.setattr("workloads.presets.host_memory_bytes", lambda: 16 * 2**30)
    with pytest.raises(BadInput, match=r"'mixtral-8x7b' with 32 layers needs .* use --layers K with K <= \d+"):
        load_model("mixtral-8x7b", dtype=torch.bfloat16)


def test_unknown_preset_name_suggests_the_close_one():
    with pytest.raises(BadInput, match="did you mean 'mixtral-8x7b'"):
        load_model("mixtral-8x7")


def test_model_info_prints_expert_bytes_without_building():
    from workloads.cli import model_group
    result = CliRunner().invoke(model_group, ["info", "qwen3-30b-a3b", "--layers", "2", "--no-build"])
    assert result.exit_code == 0, result.output
    assert "expert_bytes: 9437184" in result.output and "layers: 2/48" in result.output
    assert f"total_expert_bytes: {2 * 128 * 9437184}" in result.output
