"""Fair profiling: `caching` and `specmoe`'s hot-global profile on a calibration set that is not the measured
prompts (the workload's calibration split by default), the cell records which prompts they used, and the old
behaviour is the explicit option profile=oracle. A plug-in whose prepare takes no calibration still works."""
import pytest

from engines.base import Engine, RuntimeEngine, prepare_engine
from harness.cell import measure_cell
from harness.schema import CellConfig

PROFILERS = [("caching", {}), ("specmoe", {"draft_policy": "hot-global", "adaptive": False})]


def profiled_prompts(monkeypatch) -> list:
    """The prompts of every profiling pass (RuntimeEngine.record_routing) made from here on."""
    seen = []
    original = RuntimeEngine.record_routing

    def spy(self, prompts, settings):
        seen.append([list(p) for p in prompts])
        return original(self, prompts, settings)

    monkeypatch.setattr(RuntimeEngine, "record_routing", spy)
    return seen


def cell(engine, options, **settings):
    return CellConfig(engine=engine, engine_options=options, model="tiny-mixtral-random", workload="code-heldout",
                      batch_size=4, prompt_len=16, max_new_tokens=4, hardware="cpu", warmup=0, min_iterations=1,
                      **settings)


@pytest.mark.parametrize("engine,options", PROFILERS)
def test_the_profiling_pass_does_not_see_the_measured_prompts(engine, options, monkeypatch):
    seen = profiled_prompts(monkeypatch)
    result = measure_cell(cell(engine, options), save_outputs=True)
    assert result.status == "ok" and result.valid, result.error or result.invalid_reason
    measured = {tuple(p) for p in result.outputs["prompts"]}
    assert len(seen) == 1 and len(seen[0]) == len(measured)
    assert not {tuple(p) for p in seen[0]} & measured  # none of the measured prompts was profiled on
    assert result.workload_info["calibration"]["split"] == "calibration"
    assert result.workload_info["calibration"]["windows"] == "halfway between the measured windows"
    assert result.engine_stats["profiled_on"] == "calibration"


@pytest.mark.parametrize("engine,options", PROFILERS)
def test_profile_oracle_profiles_on_the_measured_prompts_and_says_so(engine, options, monkeypatch):
    seen = profiled_prompts(monkeypatch)
    result = measure_cell(cell(engine, dict(options, profile="oracle")), save_outputs=True)
    assert result.status == "ok", result.error
    assert seen == [result.outputs["prompts"]]
    assert result.engine_stats["profiled_on"] == "oracle: the measured prompts"
    assert "calibration" not in result.workload_info


def test_another_workload_as_the_calibration_set(monkeypatch):
    seen = profiled_prompts(monkeypatch)
    result = measure_cell(cell("caching", {}, calibration="docs-heldout"))
    assert result.status == "ok", result.error
    assert result.workload_info["calibration"]["workload"] == "docs-heldout" and len(seen[0]) == 4
    assert "cal-docs-heldout" in result.config.key()


def test_a_plugin_prepare_without_calibration_is_still_called():
    class OldPlugin(Engine):
        name = "old"

        def prepare(self, prompts, settings):
            self.prepared = (prompts, settings)

    class NewPlugin(Engine):
        name = "new"

        def prepare(self, prompts, settings, calibration=None):
            self.calibrated = calibration()

    old, new = OldPlugin(), NewPlugin()
    prepare_engine(old, [[1]], "s", lambda: [[2]])
    prepare_engine(new, [[1]], "s", lambda: [[2]])
    assert old.prepared == ([[1]], "s") and new.calibrated == [[2]]
