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
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - a broken plug-in costs only itself, with one line naming it
        first = (str(exc).strip().splitlines() or [""])[0]
        raise BadInput(f"engine {name!r}: its plug-in {table[name]} cannot be loaded "
                       f"({type(exc).__name__}: {first})") from None
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise BadInput(f"engine {name!r} points to {table[name]}, which is not an Engine subclass")
    return cls


def create(name: str, **options) -> Engine:
    return engine_class(name)(**options)


def check_options(name: str, options: dict) -> dict:
    """The options as the engine's Options class coerces them (so "off" and false name the same cell), or
    BadInput naming the bad one; nothing is loaded."""
    from dataclasses import asdict

    from .base import make_options
    coerced = asdict(make_options(name, engine_class(name).Options, options))
    return {k: coerced[k] for k in options}


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
