"""The benchmark matrix: a TOML file whose axes (engines x models x batch sizes x hardware x workloads) expand into
cells, with include/exclude rules and per-engine options. Validation is strict and every error names file and key.

    [matrix]
    engines = ["resident", "offload", "lru"]
    models = ["tiny"]
    batch_sizes = [1, 4, 16]
    hardware = ["cpu"]
    workloads = ["synthetic-ids"]        # optional
    [settings]                            # optional; CellConfig fields shared by every cell
    max_new_tokens = 32
    process_per = "model"                 # cells of one model share a process ("cell": a process each, default)
    [engines.lru]                         # options of one engine
    capacity = "50%"
    [models."mixtral-8x7b"]               # settings for one model (model_layers, dtype, prompt_len, ...)
    model_layers = 4
    [[exclude]]                           # drop cells matching every key given (a list matches any of its values)
    engine = "resident"
    hardware = "cuda:budget=24GiB"
    [[include]]                           # add cells (every axis key given; lists expand)
    engine = "lru"
    model = "tiny"
    batch_size = 64
    hardware = "cpu"
    options = { capacity = "25%" }        # optional: engine options of these cells, over [engines.lru]
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engines.errors import BadInput

from .schema import PROCESS_PER, CellConfig, type_name
from .schema import check_setting as schema_check_setting

AXES = {"engines": "engine", "models": "model", "batch_sizes": "batch_size", "hardware": "hardware",
        "workloads": "workload"}  # [matrix] key -> CellConfig field
DEFAULT_WORKLOAD = "synthetic-ids"
# [settings] keys: CellConfig fields that are not axes (engine options come from [engines.NAME])
SETTINGS = {f.name: f for f in dataclasses.fields(CellConfig)
            if f.name not in set(AXES.values()) | {"engine_options"}}
MATRICES_DIR = Path(__file__).resolve().parent.parent / "matrices"


@dataclass
class Matrix:
    cells: list[CellConfig]
    source: str  # the file, or "compare" for an ad-hoc matrix
    text: str = ""  # the TOML as written, stored in run.json


def check_setting(where: str, key: str, value):
    """Validate one [settings] value (schema.check_setting's rules); returns it converted."""
    if key not in SETTINGS:
        raise BadInput(f"{where}: unknown key {key!r}; allowed: {', '.join(SETTINGS)}")
    try:
        return schema_check_setting(key, value)
    except BadInput as exc:
        raise BadInput(f"{where}: {exc}") from None


def _check_axis(where: str, key: str, values) -> list:
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise BadInput(f"{where}: {key} is empty; give at least one value")
    out = []
    for v in values:
        if key == "batch_sizes":
            if isinstance(v, bool) or not isinstance(v, int):
                raise BadInput(f"{where}: batch_sizes must hold whole numbers, got {type_name(v)} {v!r}")
            if v < 1:
                raise BadInput(f"{where}: batch size {v} must be at least 1")
        elif not isinstance(v, str) or not v.strip():
            raise BadInput(f"{where}: {key} must hold non-empty strings, got {type_name(v)} {v!r}")
        if v in out:
            raise BadInput(f"{where}: {key} lists {v!r} twice")
        out.append(v)
    return out


def _rule(where: str, rule, include: bool) -> dict[str, list]:
    if not isinstance(rule, dict):
        raise BadInput(f"{where}: must be a table like {{ engine = \"lru\", batch_size = 1 }}")
    out = {}
    by_field = {v: k for k, v in AXES.items()}
    rule = dict(rule)
    if include and "options" in rule:
        options = rule.pop("options")
        if not isinstance(options, dict):
            raise BadInput(f"{where}.options: must be a table of engine options, like {{ gamma = 4 }}")
        out["options"] = options
    for key, value in rule.items():
        if key not in by_field:
            raise BadInput(f"{where}: unknown key {key!r}; allowed: {', '.join(by_field)}")
        out[key] = _check_axis(f"{where}.{key}", by_field[key], value)
    if not set(out) - {"options"}:
        raise BadInput(f"{where}: empty rule; name at least one of {', '.join(by_field)}")
    if include:
        missing = [k for k in ("engine", "model", "batch_size", "hardware") if k not in out]
        if missing:
            raise BadInput(f"{where}: an include names a whole cell; missing {', '.join(missing)}")
    return out


def _matches(cell: CellConfig, rule: dict[str, list]) -> bool:
    return all(getattr(cell, key) in values for key, values in rule.items())


def only(cells: list[CellConfig], specs: tuple[str, ...] | list[str]) -> list[CellConfig]:
    """Keep the cells matching every `AXIS=V1,V2` spec (`run --only model=small`). Raises BadInput naming a bad spec
    or a value the matrix does not have."""
    by_field = {v: k for k, v in AXES.items()}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or key not in by_field or not values.strip():
            raise BadInput(f"--only {spec!r}: use AXIS=VALUE[,VALUE...] with AXIS one of {', '.join(by_field)}")
        wanted = [v.strip() for v in values.split(",")]
        values_had = sorted({getattr(c, key) for c in cells})  # batch sizes in numeric order
        have = {str(v) for v in values_had}
        unknown = [v for v in wanted if v not in have]
        if unknown:
            raise BadInput(f"--only {spec!r}: the matrix has no {key} {', '.join(map(repr, unknown))}; "
                           f"it has: {', '.join(map(str, values_had))}")
        cells = [c for c in cells if str(getattr(c, key)) in wanted]
    return cells


def parse(text: str, source: str, check_hardware: bool = True, check_names: bool = True) -> Matrix:
    """Parse and validate a matrix; raises BadInput naming `source` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{source}: TOML syntax error: {exc}") from None
    allowed_top = {"matrix", "settings", "engines", "models", "include", "exclude"}
    for key in data:
        if key not in allowed_top:
            raise BadInput(f"{source}: unknown top-level key {key!r}; allowed: {', '.join(sorted(allowed_top))}")
    axes = _axes(source, data.get("matrix"))
    settings = {k: check_setting(f"{source}: [settings]", k, v) for k, v in _table(source, data, "settings").items()}
    model_settings, engine_options = {}, {}
    for name, table in _table(source, data, "models").items():
        if not isinstance(table, dict):
            raise BadInput(f"{source}: [models] {name!r} must be a table of settings")
        model_settings[name] = {k: check_setting(f"{source}: [models.{name!r}]", k, v) for k, v in table.items()}
    for name, table in _table(source, data, "engines").items():
        if not isinstance(table, dict):
            raise BadInput(f"{source}: [engines] {name!r} must be a table of that engine's options")
        engine_options[name] = table

    def make(engine, model, batch_size, hardware, workload, options=None):
        kw = dict(settings)
        kw.update(model_settings.get(model, {}))
        try:
            return CellConfig(engine=engine, model=model, batch_size=batch_size, hardware=hardware,
                              workload=workload, engine_options={**engine_options.get(engine, {}), **(options or {})},
                              **kw)
        except BadInput as exc:
            raise BadInput(f"{source}: [engines.{engine}]: {exc}") from None

    cells = _expand(source, data, axes, make)
    for name in model_settings:
        if all(c.model != name for c in cells):
            raise BadInput(f"{source}: [models.{name!r}] names a model that no cell uses")
    for name in engine_options:
        if all(c.engine != name for c in cells):
            raise BadInput(f"{source}: [engines.{name}] names an engine that no cell uses")
    if check_names:
        validate_cells(cells, source, check_hardware=check_hardware)
    return Matrix(cells=cells, source=source, text=text)


def _axes(source: str, m) -> dict[str, list]:
    if not isinstance(m, dict):
        raise BadInput(f"{source}: missing [matrix] table with engines, models, batch_sizes, hardware")
    for key in m:
        if key not in AXES:
            raise BadInput(f"{source}: [matrix] unknown key {key!r}; allowed: {', '.join(AXES)}")
    axes = {}
    for key in AXES:
        if key in m:
            axes[key] = _check_axis(f"{source}: [matrix]", key, m[key])
        elif key == "workloads":
            axes[key] = [DEFAULT_WORKLOAD]
        else:
            raise BadInput(f"{source}: [matrix] missing key {key!r}")
    return axes


def _expand(source: str, data: dict, axes: dict[str, list], make) -> list[CellConfig]:
    """The product of the axes, less the [[exclude]] rules, plus the [[include]] cells."""
    rules = {}
    for kind in ("include", "exclude"):
        value = data.get(kind, [])
        if not isinstance(value, list):
            raise BadInput(f"{source}: {kind} must be an array of tables: write [[{kind}]]")
        rules[kind] = [_rule(f"{source}: [[{kind}]] #{i + 1}", r, kind == "include") for i, r in enumerate(value)]
    cells = [make(*combo) for combo in itertools.product(*(axes[k] for k in AXES))]
    cells = [c for c in cells if not any(_matches(c, r) for r in rules["exclude"])]
    for rule in rules["include"]:
        values = [rule.get(AXES[k], axes[k] if k == "workloads" else None) for k in AXES]
        for combo in itertools.product(*values):
            cell = make(*combo, options=rule.get("options"))
            if all(c.key() != cell.key() for c in cells):
                cells.append(cell)
    if not cells:
        raise BadInput(f"{source}: the exclude rules remove every cell")
    return cells


def _table(source: str, data: dict, key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise BadInput(f"{source}: {key} must be a table: write [{key}]")
    return value


def load(path: str | Path, check_hardware: bool = True) -> Matrix:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such matrix file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read the matrix file ({exc})") from None
    return parse(text, str(path), check_hardware=check_hardware)


def default_matrix_path() -> Path:
    """gpu.toml on a machine with CUDA, cpu.toml otherwise."""
    import torch
    return MATRICES_DIR / ("gpu.toml" if torch.cuda.is_available() else "cpu.toml")


def validate_cells(cells: list[CellConfig], source: str, check_hardware: bool = True) -> None:
    """Every engine and its options, model (with its layers and dtype), hardware and workload must be valid before
    anything is measured; engine options are replaced by the values their engine's Options class coerced them to,
    so that a cell has one key however its options were spelled. Each distinct value is checked once."""
    from .imports import no_collection
    with no_collection():  # its imports: the engines, transformers and each model family's modules
        _validate(cells, source, check_hardware)


def _validate(cells: list[CellConfig], source: str, check_hardware: bool) -> None:
    from engines import registry
    from engines.hardware import HardwareProfile
    from workloads.models import check_cache_fits, check_model
    from workloads.prompts import check_calibration, check_workload

    checked: dict = {}

    def once(kind, value, check):
        k = (kind, json.dumps(value, sort_keys=True, default=str))
        if k not in checked:
            try:
                checked[k] = check(*value)
            except BadInput as exc:
                raise BadInput(f"{source}: {exc}") from None
        return checked[k]

    for c in cells:
        c.engine_options = once("engine", (c.engine, c.engine_options), registry.check_options)
        config = once("model", (c.model, c.model_layers, c.dtype), check_model)
        hardware = once("hardware", (c.hardware,), lambda v: HardwareProfile.parse(v, check_available=check_hardware))
        tokens = c.prompt_len + c.max_new_tokens
        once("cache", (c.model, c.model_layers, c.dtype, tokens, c.batch_size, c.hardware),
             lambda *_: check_cache_fits(c.model, config, c.dtype, tokens, c.batch_size, hardware, check_hardware))
        if hardware.host == "disk" and not registry.engine_class(c.engine).serves_disk:
            raise BadInput(f"{source}: engine {c.engine!r} cannot serve experts from the disk tier ({c.hardware!r}): "
                           "it runs as it ships, from host memory; host=disk is for the project's runtime engines")
        once("workload", (c.workload,), check_workload)
        once("calibration", (c.calibration, c.workload), check_calibration)
