"""The `model` command group (train, info) and the rows that `specmoe-bench list models|workloads` prints."""
from __future__ import annotations

import json

import click

from engines.errors import BadInput
from engines.hardware import format_bytes


def _usage(exc: BadInput) -> click.UsageError:
    return click.UsageError(str(exc))


@click.group("model")
def model_group():
    """Train the project's MoE checkpoints and inspect models."""


@model_group.command("train")
@click.option("--preset", default="tiny", show_default=True,
              help="tiny (2 CPU cores, ~3 min), small, nllb-like or mixtral-like (one H200, 2-3 min each); "
                   "`specmoe-bench list models` describes them")
@click.option("--corpus", default=None, help="stdlib or code (it and the sources of torch and transformers), a folder "
              "of text files, a .txt, or a .json/.jsonl/.parquet/.csv file with a 'text' column; default: the "
              "preset's")
@click.option("--out", default=None,
              help="output directory; default: the per-machine cache that --model PRESET uses")
@click.option("--arch", default=None, type=click.Choice(["mixtral", "qwen2_moe", "qwen3_moe"]),
              help="model family (qwen2_moe adds a shared expert; qwen2_moe and qwen3_moe allow moe_every > 1)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", default=None, type=int, help="override the preset's optimizer steps")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="override any recipe setting, e.g. --set hidden_size=64 --set moe_every=2; repeatable")
@click.option("--device", default=None, help="cpu or cuda; default: the preset's (tiny: cpu, the others: cuda)")
@click.option("--time-limit", "time_limit", default=None, type=float,
              help="stop training after this many seconds (a safety net on a rented machine; the result then "
                   "depends on the machine's speed and training.json records the step)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train_cmd(preset, corpus, out, arch, seed, steps, settings, device, time_limit, quiet):
    """Train a MoE causal LM and its byte-level BPE tokenizer; save them with training.json (held-out loss,
    perplexity, unigram baseline, routing skew and the hottest experts per layer, weights_sha256)."""
    from .train import cached_checkpoint, get_preset, parse_settings, summary, train, trained_checkpoint
    try:
        overrides = parse_settings(settings)
        overrides.update({k: v for k, v in dict(arch=arch, steps=steps).items() if v is not None})
        get_preset(preset, **overrides)  # a bad recipe fails here, before any data is read
        default_run = (corpus, out, device, time_limit) == (None,) * 4 and seed == 0 and not overrides
        if default_run:  # the exact checkpoint --model PRESET loads: train into the cache (once, locked)
            cached = cached_checkpoint(preset)
            already = (cached / "training.json").is_file()
            path = cached if already else trained_checkpoint(preset, progress=not quiet)
            if already:
                click.echo(f"already trained: {cached}")
            metrics = json.loads((path / "training.json").read_text())
        else:
            already = False
            result = train(preset, corpus=corpus, out=out, seed=seed, device=device, progress=not quiet,
                           time_limit_s=time_limit, **overrides)
            path, metrics = result.path, result.metrics
    except BadInput as exc:
        raise _usage(exc) from None
    if already or quiet:  # a training run with progress has printed its summary already
        click.echo(summary(metrics))
    if "stopped_early_at_step" in metrics:
        click.echo(f"stopped by --time-limit after {metrics['stopped_early_at_step']} steps")
    click.echo(f"saved: {path}")


@model_group.command("info")
@click.argument("name")
@click.option("--layers", default=None, type=int, help="build only the first K decoder layers")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--build/--no-build", default=True, show_default=True,
              help="build the weights (checks the model loads) or only compute the shapes of a preset")
def info_cmd(name, layers, dtype, build):
    """Per-expert and total expert bytes of a model (presets: also the full public model)."""
    import torch

    from .models import load_model
    from .presets import PRESETS, preset_config, shape_report, with_layers
    dt = getattr(torch, dtype)
    try:
        if name in PRESETS and not build:
            config, loaded, total = with_layers(preset_config(name), layers)
            row = dict(name=name, source="synthetic", layers=f"{loaded}/{total}", **shape_report(config).bytes(dt))
        else:
            m = load_model(name, dtype=dt, layers=layers)
            from engines.runtime import find_experts_modules
            experts = find_experts_modules(m.model)
            if not experts:
                raise BadInput(f"model {name!r} has no MoE layers with fused experts")
            per = [sum(p.nbytes for p in mod.parameters(recurse=False)
                       if p.dim() >= 2 and p.shape[0] == mod.num_experts) for _, mod in experts]
            row = dict(name=name, source=m.source, layers=f"{m.layers_loaded}/{m.layers_total}",
                       moe_layers=len(experts), experts_per_layer=experts[0][1].num_experts,
                       expert_bytes=per[0] // experts[0][1].num_experts, total_expert_bytes=sum(per),
                       non_expert_bytes=sum(p.nbytes for p in m.model.parameters()) - sum(per))
            row.update({k: v for k, v in m.notes.items() if k not in row})  # a preset's notes repeat its bytes
            row.update(_routing_rows(m.notes.get("checkpoint")))
    except BadInput as exc:
        raise _usage(exc) from None
    for key, value in row.items():
        click.echo(f"{key}: {value}")


def _routing_rows(checkpoint: str | None) -> dict:
    """Routing statistics of a checkpoint this project trained (its training.json), as `model info` rows."""
    from pathlib import Path

    from .train import routing_of
    info = Path(checkpoint) / "training.json" if checkpoint else None
    if info is None or not info.is_file():
        return {}
    r = routing_of(json.loads(info.read_text()))
    hottest = ["; ".join(f"{e}:{share:.3f}" for e, share in layer[:4]) for layer in r["hottest_experts"]]
    return dict(routing_skew=r["routing_skew"], routing_skew_per_layer=r["routing_skew_per_layer"],
                hottest_experts_per_layer=" | ".join(hottest), routing_skew_definition=r["routing_skew_definition"])


def list_models_rows() -> list[dict]:
    """One row per built-in model name: name, source, description, sizes (expert bytes in bf16 for presets)."""
    from .models import SYNTHETIC, TRAINED
    from .presets import PRESETS, preset_config, shape_report
    from .corpus import load_corpus
    from .train import TRAIN_PRESETS, default_out_dir
    rows = []
    for name in TRAINED:
        p = TRAIN_PRESETS[name]
        trained = (default_out_dir(p, 0, load_corpus(p.corpus)) / "training.json").is_file()
        status = "cached on this machine" if trained else ("trains on first use" if p.device == "cpu" else
                                                           f"train on a GPU: specmoe-bench model train --preset {name}")
        moe = f"{p.layers} layers" if p.moe_every == 1 else f"{p.layers} layers, MoE in {len(p.moe_layers)}"
        rows.append(dict(name=name, source="trained", description=p.description,
                         sizes=f"{moe} x {p.experts} experts top-{p.top_k}, "
                               f"expert {format_bytes(p.expert_bytes())} "
                               f"({p.save_dtype}); {status}"))
    for name, (factory, description) in SYNTHETIC.items():
        r = shape_report(factory())
        rows.append(dict(name=name, source="synthetic", description=description,
                         sizes=f"{r.moe_layers} layers x {r.experts_per_layer} experts, "
                               f"expert {format_bytes(r.bytes(_f32())['expert_bytes'])} (float32)"))
    for name, preset in PRESETS.items():
        r = shape_report(preset_config(name))
        b = r.bytes()
        rows.append(dict(name=name, source="synthetic", description=preset.description,
                         sizes=f"{r.total_params / 1e9:.1f}B params; {r.moe_layers} MoE layers x {r.experts_per_layer}"
                               f" experts, expert {format_bytes(b['expert_bytes'])},"
                               f" all experts {format_bytes(b['total_expert_bytes'])}"
                               f" (bf16); use --layers K"))
    return rows


def list_workloads_rows() -> list[dict]:
    from .prompts import BUILTIN, workload_sizes
    rows = []
    for name, description in BUILTIN.items():
        s = workload_sizes(name)
        rows.append(dict(name=name, source="builtin", description=description,
                         sizes=f"{s['texts']} texts, {s['chars'] / 1e3:.0f}K chars" if s["texts"] else
                         "batch_size prompts of about prompt_len ids"))
    rows.append(dict(name="PATH.json|.jsonl|.parquet|.csv|.txt", source="file",
                     description="a local file loaded through datasets: one prompt per row of its 'text' column",
                     sizes="rows of the file"))
    rows.append(dict(name="org/name", source="hub", description="a hub dataset with a 'text' column (needs network)",
                     sizes="rows of its train split"))
    return rows


def _f32():
    import torch
    return torch.float32
