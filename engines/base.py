"""The engine plug-in API: load a model onto a hardware profile, generate for a batch, close.

A third-party engine subclasses `Engine` (or `RuntimeEngine` to reuse the shared runtime with its own
ExpertPolicy) and registers it under the entry-point group `specmoe_bench.engines` in its own package.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from .errors import BadInput
from .hardware import HardwareProfile, layer_bytes
from .runtime import ExpertPolicy, Generation, ModelInfo, ModelRuntime, SamplingSettings


@dataclass
class NoOptions:
    """This engine takes no options."""


PROFILES = ("calibration", "oracle")


def profile_field(what: str):
    """The `profile` option of an engine that runs a profiling pass (`what` names the pass)."""
    return field(default="calibration", metadata={
        "help": f"the prompts {what} profiles on: calibration (a set that is not the measured prompts: the "
                "workload's calibration split, or the cell's calibration setting) or oracle (the measured prompts "
                "themselves: an oracle no deployed system has)"})


def check_profile(engine: str, value: str) -> None:
    if value not in PROFILES:
        raise BadInput(f"{engine} profile={value!r}; allowed: {', '.join(PROFILES)}")


_FLAGS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def make_options(engine: str, cls: type, given: dict):
    """The engine's options object: unknown names refused, each value coerced to its field's type (text from a
    command line, or a matrix value of another plain type) or refused with one line naming it, then the class's
    own __post_init__ checks the values. The one place engine options are checked, before any cell starts."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise BadInput(f"engine {engine!r} has no option {unknown[0]!r}; its options: {allowed}")
    return cls(**{name: _coerce(engine, name, fields[name], value) for name, value in given.items()})


def _coerce(engine: str, name: str, f: dataclasses.Field, value):
    words = f.metadata.get("words")
    if words:  # a whole number or one of a few words (gamma = 4 or auto)
        return _whole_or_word(engine, name, value, words)
    kind = type(f.default) if f.default is not dataclasses.MISSING and f.default is not None else \
        {"int": int, "float": float, "bool": bool}.get(str(f.type), str)
    bad = BadInput(f"engine {engine!r} option {name}={value!r}: expected "
                   f"{'true or false' if kind is bool else 'a whole number' if kind is int else 'a number' if kind is float else 'a string or a number'}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _FLAGS:
            return _FLAGS[value.strip().lower()]
        raise bad
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad
    if kind is str:
        return str(value)
    try:
        number = kind(value)
    except ValueError:
        raise bad from None
    if kind is int and isinstance(value, float) and value != number:
        raise bad
    return number


def _whole_or_word(engine: str, name: str, value, words: tuple[str, ...]):
    if isinstance(value, str) and value.strip() in words:
        return value.strip()
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadInput(f"engine {engine!r} option {name}={value!r}: expected a whole number or {' or '.join(words)}")


class Engine:
    """Base class of every engine. Subclasses set `name`, `summary` and, if they take options, `Options`
    (a dataclass whose fields carry defaults, `metadata={"help": ...}`, and validation in __post_init__)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    serves_disk: ClassVar[bool] = False  # whether it can serve experts from the disk tier (hardware host=disk)

    def __init__(self, **options):
        self.options = make_options(self.name, self.Options, options)

    @classmethod
    def option_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls.Options)}

    def load(self, model, hardware: HardwareProfile) -> None:
        """Take a workloads.models.LoadedModel onto the hardware. Called once per cell."""
        raise NotImplementedError

    def prepare(self, prompts: list[list[int]], settings: SamplingSettings,
                calibration: Callable[[], list[list[int]]] | None = None) -> None:
        """Untimed work before measurement (a profiling pass, a routing trace). `calibration`, where given: returns
        prompts that are not the measured ones, for a profiling pass (loaded on the first call; it raises BadInput
        where the workload has no calibration set). Default: nothing. An engine whose prepare takes only
        (prompts, settings), as plug-ins written before calibration existed do, is called that way."""

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> Generation:
        raise NotImplementedError

    def teacher_forced_logits(self, prompts: list[list[int]], continuations: list[list[int]]):
        """Logits [B, C, V] (float32, CPU) at each continuation position, the continuation fed in; None when the
        engine cannot score a given continuation (then teacher-forced metrics are absent)."""
        return None

    @property
    def model_info(self) -> ModelInfo | None:
        return None

    def setup_stats(self) -> dict:
        """What loading and preparing cost (bytes copied to keep experts resident), outside the measured runs."""
        return {}

    def close(self) -> None:
        """Release device memory."""


def prepare_engine(engine: Engine, prompts, settings, calibration: Callable[[], list[list[int]]]) -> None:
    """engine.prepare, with the calibration set where its prepare takes one (see Engine.prepare)."""
    if "calibration" in inspect.signature(engine.prepare).parameters:
        engine.prepare(prompts, settings, calibration=calibration)
    else:
        engine.prepare(prompts, settings)


class RuntimeEngine(Engine):
    """An engine built on the shared ModelRuntime: it only chooses an ExpertPolicy (and may override generate)."""

    serves_disk = True

    runtime: ModelRuntime

    def make_policy(self, hardware: HardwareProfile) -> ExpertPolicy:
        return ExpertPolicy()

    def load(self, model, hardware: HardwareProfile) -> None:
        self.hardware = hardware
        self.loaded = model
        self.runtime = ModelRuntime(model.model, hardware.device, disk_dir=hardware.disk_dir)
        store = self.runtime.store
        self.expert_budget = hardware.expert_budget(self.runtime.non_expert_bytes, model.layers_loaded,
                                                    model.layers_total, layer_bytes(self.runtime.model),
                                                    store.total_bytes)
        if self.expert_budget is not None and self.expert_budget < store.expert_bytes:
            raise BadInput(f"hardware {hardware.spec!r}: the expert budget ({self.expert_budget} bytes after the "
                           f"non-expert weights) holds less than one expert ({store.expert_bytes} bytes)")
        self.runtime.set_policy(self.make_policy(hardware))
        if store.disk is not None:  # setup read experts through the memory map (affinity distances)
            store.disk.drop_cache()
        self._setup = dict(setup_h2d_bytes=store.counters.h2d_bytes, resident_experts=len(store.resident),
                           expert_budget_bytes=self.expert_budget, memory_budget_bytes=hardware.memory_budget_bytes,
                           expert_budget_share=hardware.expert_share, host_tier=hardware.host)
        store.reset_counters()

    def prepare(self, prompts, settings, calibration=None) -> None:
        before = self.runtime.store.counters.h2d_bytes
        self._calibration = calibration
        self._prepare(prompts, settings)
        self._setup["prepare_h2d_bytes"] = self.runtime.store.counters.h2d_bytes - before
        self._setup["resident_experts"] = len(self.runtime.store.resident)
        self.runtime.store.reset_counters()

    def _prepare(self, prompts, settings) -> None:
        pass

    def profiling_prompts(self, prompts: list[list[int]]) -> list[list[int]]:
        """What a profiling pass runs on: the calibration prompts, or the measured ones where the engine's
        `profile` option is oracle. Recorded in setup_stats as `profiled_on`."""
        if getattr(self.options, "profile", "calibration") == "oracle":
            self._setup["profiled_on"] = "oracle: the measured prompts"
            return prompts
        if getattr(self, "_calibration", None) is None:
            raise BadInput(f"engine {self.name!r} profiles on a calibration set and none was given (prepare's "
                           "calibration); give one, or the option profile=oracle")
        self._setup["profiled_on"] = "calibration"
        return self._calibration()

    def generate(self, prompts, settings) -> Generation:
        return self.runtime.generate(prompts, settings)

    def teacher_forced_logits(self, prompts, continuations):
        return self.runtime.teacher_forced_logits(prompts, continuations)

    def record_routing(self, prompts, settings) -> list[tuple[int, int, list[int]]]:
        """Run the batch once and return the routing trace: (forward index, MoE layer, experts used)."""
        self.runtime.routing_log = []
        try:
            self.runtime.generate(prompts, settings)
            return self.runtime.routing_log
        finally:
            self.runtime.routing_log = None

    def setup_stats(self) -> dict:
        return dict(self._setup)

    @property
    def model_info(self) -> ModelInfo:
        rt, lm = self.runtime, self.loaded
        return ModelInfo(name=lm.name, source=lm.source, architecture=type(rt.model).__name__,
                         moe_layers=rt.store.num_layers, experts_per_layer=rt.store.num_experts, top_k=rt.top_k,
                         expert_bytes=rt.store.expert_bytes, total_expert_bytes=rt.store.total_bytes,
                         non_expert_bytes=rt.non_expert_bytes, layers_loaded=lm.layers_loaded,
                         layers_total=lm.layers_total, notes=dict(lm.notes))

    def close(self) -> None:
        if hasattr(self, "runtime"):
            self.runtime.release()
            del self.runtime
        import gc

        import torch
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
