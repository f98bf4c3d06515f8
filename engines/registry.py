"""Engine registry: the built-in engines plus any a package registers under the entry-point group
`specmoe_bench.engines` (name = "module:Class"). Entries load lazily, so a broken plug-in costs only itself."""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points

from .base import Engine
from .errors import BadInput

ENTRY_POINT_GROUP = "specmoe_bench.engines"

BUILTIN: dict[str, str] = {
    "resident": "engines.baselines:ResidentEngine",
    "offload": "engines.baselines:OffloadEngine",
    "overlap": "engines.baselines:OverlapEngine",
    "caching": "engines.baselines:CachingEngine",
    "lru": "engines.baselines:LRUEngine",
    "nospec": "engines.specmoe:NoSpecEngine",
    "specmoe": "engines.specmoe:SpecMoEEngine",
    "accelerate": "engines.accelerate_peer:AccelerateEngine",
}


def available() -> dict[str, str]:
    """name -> "module:Class" for every engine this installation knows, built-ins first."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def engine_class(name: str) -> type[Engine]:
    table = available()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BadInput(f"unknown engine {name!r}{hint}; available engines: {', '.join(table)}")
    module_name, _, attr = table[name].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise BadInput(f"engine {name!r} points to {table[name]}, which is not an Engine subclass")
    return cls


def create(name: str, **options) -> Engine:
    return engine_class(name)(**options)


def parse_engine_list(text: str) -> list[str]:
    """'specmoe,offload' -> validated names, in order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BadInput(f"--engines {text!r}: give at least one engine name")
    table = available()
    for n in names:
        if n not in table:
            engine_class(n)  # raises the "did you mean" error
    return names
