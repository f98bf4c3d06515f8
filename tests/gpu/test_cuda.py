"""Runs on a CUDA machine only (the H200 benchmark machine): engines on the GPU in bfloat16 against `resident`."""
from __future__ import annotations

import random

import pytest
import torch

from engines import registry
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from harness.equivalence import check_engine, reference
from workloads.models import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the H200 machine)")

ENGINES = [("offload", {}), ("overlap", {}), ("caching", {}), ("lru", {"capacity": "50%"}), ("nospec", {}),
           ("specmoe", {"gamma": 4, "adaptive": False})]


@pytest.mark.parametrize("model", ["tiny-mixtral-random", "tiny-qwen2moe-random"])
def test_bf16_engines_agree_with_resident_on_cuda(model, capsys):
    hw = HardwareProfile.parse("cuda")
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 128) for _ in range(rng.randrange(1, 24))] for _ in range(8)]
    settings = SamplingSettings(max_new_tokens=16)
    ref = registry.create("resident")
    ref.load(load_model(model, dtype=torch.bfloat16), hw)
    ref_tokens, ref_logits = reference(ref, prompts, settings)
    for name, options in ENGINES:
        engine = registry.create(name, **options)
        engine.load(load_model(model, dtype=torch.bfloat16), hw)
        engine.prepare(prompts, settings, calibration=lambda: _prompts(8, seed=99))
        eq = check_engine(engine, prompts, settings, ref_tokens, ref_logits)
        with capsys.disabled():
            print(f"\n{model} {name}: exact={eq.exact_match_rate:.3f} top1={eq.teacher_forced_top1:.4f} "
                  f"max|dlogit|={eq.max_abs_logit_diff:.3g} first_divergence={eq.first_divergence}")
        assert eq.teacher_forced_top1 >= 0.99
        engine.close()


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, 128) for _ in range(rng.randrange(1, 24))] for _ in range(n)]


@pytest.mark.parametrize("model", ["tiny-mixtral-random", "tiny-qwen2moe-random"])
def test_specmoe_in_float32_on_cuda_matches_resident_to_rounding(model, capsys):
    """Settles whether specmoe's bf16 disagreements on CUDA (results/h200/README.md) are rounding: in float32 with
    TF32 off, a batch of 16 with ragged acceptance must give resident's logits to float32 rounding."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hw = HardwareProfile.parse("cuda")
    prompts, settings = _prompts(16, seed=1), SamplingSettings(max_new_tokens=24)
    ref = registry.create("resident")
    ref.load(load_model(model, dtype=torch.float32), hw)
    ref_tokens, ref_logits = reference(ref, prompts, settings)
    engine = registry.create("specmoe", gamma=4, adaptive=False, draft_experts=2)
    engine.load(load_model(model, dtype=torch.float32), hw)
    eq = check_engine(engine, prompts, settings, ref_tokens, ref_logits)
    with capsys.disabled():
        print(f"\n{model} specmoe float32: exact={eq.exact_match_rate:.3f} top1={eq.teacher_forced_top1:.4f} "
              f"max|dlogit|={eq.max_abs_logit_diff:.3g}")
    assert eq.max_abs_logit_diff < 1e-3
    assert eq.teacher_forced_top1 >= 0.999


@pytest.mark.parametrize("gamma", [4, "auto"])
def test_specmoe_prefetch_on_cuda(gamma, capsys):
    """Draft-guided prefetch's CUDA path (the drafts' routing noted inside the draft graphs, copies on the copy
    stream while the drafts replay): resident's logits to float32 rounding, prefetched bytes = used + wasted, and at
    a fixed gamma fewer copies of verification's own than without prefetch."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hw, model = HardwareProfile.parse("cuda"), "tiny-mixtral-random"
    prompts, settings = _prompts(16, seed=2), SamplingSettings(max_new_tokens=24)
    ref = registry.create("resident")
    ref.load(load_model(model, dtype=torch.float32), hw)
    ref_tokens, ref_logits = reference(ref, prompts, settings)
    verify = {}
    for prefetch in ("none", "draft"):
        engine = registry.create("specmoe", gamma=gamma, draft_experts=2, prefetch=prefetch,
                                 adaptive=gamma == "auto")
        engine.load(load_model(model, dtype=torch.float32), hw)
        stats = [engine.generate(prompts, settings).stats for _ in range(2)][-1]
        eq = check_engine(engine, prompts, settings, ref_tokens, ref_logits)
        with capsys.disabled():
            print(f"\nspecmoe gamma={gamma} prefetch={prefetch}: top1={eq.teacher_forced_top1:.4f} "
                  f"verify_h2d={stats['verify_h2d_bytes']} prefetch_h2d={stats.get('prefetch_h2d_bytes')} "
                  f"wasted={stats.get('prefetch_wasted_bytes')} steps={stats['steps_by_gamma']}")
        assert eq.max_abs_logit_diff < 1e-3 and eq.teacher_forced_top1 >= 0.999
        if prefetch == "draft":
            assert stats["prefetch_h2d_bytes"] == stats["prefetch_used_bytes"] + stats["prefetch_wasted_bytes"]
        verify[prefetch] = stats["verify_h2d_bytes"]
        engine.close()
    if gamma != "auto":  # auto's choices follow the timings, so its two runs need not draft alike
        assert verify["draft"] < verify["none"]


def _hf_logits(model, prompts, continuations, device):
    from engines.runtime import teacher_forcing_batch
    ids, mask, pos = teacher_forcing_batch(prompts, continuations, device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return logits[:, -len(continuations[0]):, :].float().cpu()


def _top1(a, b):
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item(), (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("model", ["tiny-mixtral-random", "tiny-qwen2moe-random"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_accelerate_offload_agrees_with_resident_on_cuda(model, dtype, capsys):
    """transformers + accelerate with half the experts allowed on the device, scored by teacher forcing.
    Printed beside it: transformers' own forward with every weight on the GPU, so that a gap to `resident` can be
    told apart: from accelerate's offload (accelerate vs transformers on the GPU) or from kernels (transformers on
    the GPU vs resident). Both must agree in top-1 at 0.99 or more, in bf16 and in float32 (TF32 off)."""
    from harness.equivalence import teacher_forcing_inputs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    prompts, settings = _prompts(8), SamplingSettings(max_new_tokens=16)
    ref = registry.create("resident")
    ref.load(load_model(model, dtype=dtype), HardwareProfile.parse("cuda"))
    ref_tokens, ref_logits = reference(ref, prompts, settings)
    ref.close()
    conts = teacher_forcing_inputs(prompts, ref_tokens)
    native = load_model(model, dtype=dtype).model.to("cuda")
    native_logits = _hf_logits(native, prompts, conts, torch.device("cuda"))
    impl = getattr(native.config, "_experts_implementation", None)
    del native
    engine = registry.create("accelerate")
    engine.load(load_model(model, dtype=dtype), HardwareProfile.parse("cuda:budget=50%"))
    devices = sorted({str(p.device) for p in engine.model.parameters()})
    eq = check_engine(engine, prompts, settings, ref_tokens, ref_logits)
    acc_logits = engine.teacher_forced_logits(prompts, conts)
    engine.close()
    (n_top1, n_diff), (a_top1, a_diff) = _top1(native_logits, ref_logits), _top1(acc_logits, native_logits)
    with capsys.disabled():
        print(f"\n{model} {dtype} accelerate: weights on {devices}; vs resident: exact={eq.exact_match_rate:.3f} "
              f"top1={eq.teacher_forced_top1:.4f} max|dlogit|={eq.max_abs_logit_diff:.3g}\n"
              f"  transformers on the GPU (experts implementation {impl!r}) vs resident: top1={n_top1:.4f} "
              f"max|dlogit|={n_diff:.3g}\n  accelerate vs transformers on the GPU: top1={a_top1:.4f} "
              f"max|dlogit|={a_diff:.3g}")
    assert a_top1 >= 0.99  # the offload itself
    assert eq.teacher_forced_top1 >= 0.99
    if dtype == torch.float32:
        assert eq.max_abs_logit_diff < 1e-3


@pytest.mark.parametrize("transposed", [False, True])
def test_few_pair_expert_kernel_matches_float64(transposed):
    """engines/gemv.py against a float64 product on random shapes (odd sizes too): bf16 rounding only, a pair with
    the sentinel slot adds nothing, the down form sums each token's pairs weighted."""
    from engines import gemv
    g = torch.Generator(device="cuda").manual_seed(0)
    for S, K, N, P, pairs in [(8, 2048, 17920, 2, 1), (8, 8960, 2048, 2, 2), (5, 200, 70, 4, 2), (32, 4096, 1024, 3, 1),
                              (3, 64, 8, 1, 1)]:
        w = torch.randn((S, K, N) if transposed else (S, N, K), dtype=torch.bfloat16, device="cuda", generator=g)
        wt = w if transposed else w.transpose(-2, -1)
        slot = torch.randint(0, S, (P,), device="cuda", generator=g)
        if P > 2:
            slot[1] = S
        x = torch.randn((P, K), dtype=torch.bfloat16, device="cuda", generator=g)  # a row per pair
        scale = torch.rand(P, device="cuda", generator=g) if pairs > 1 else None
        y = gemv.pairs_gemv(x, wt, slot, pairs=pairs, scale=scale)
        ref = torch.zeros((P // pairs, N), dtype=torch.float64, device="cuda")
        for p in range(P):
            if slot[p] < S:
                ref[p // pairs] += (1.0 if scale is None else float(scale[p])) * (x[p].double() @ wt[slot[p]].double())
        assert torch.isfinite(y).all()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_few_pair_layer_agrees_with_the_grouped_product(monkeypatch):
    """A Mixtral layer's experts at batch 1 and 2 (top-2: the kernel's pairs) against the grouped GEMM that serves
    more pairs, in bf16: the same routing, outputs within bf16 rounding, the same experts_read."""
    from engines import experts
    g = torch.Generator(device="cuda").manual_seed(1)
    S, H, I = 8, 1024, 2048
    module = type("M", (), dict(has_gate=True, is_transposed=False, _apply_gate=staticmethod(
        lambda h: torch.nn.functional.silu(h[:, :I]) * h[:, I:])))()
    pool = {"gate_up_proj": torch.randn(S, 2 * I, H, dtype=torch.bfloat16, device="cuda", generator=g) / 32,
            "down_proj": torch.randn(S, H, I, dtype=torch.bfloat16, device="cuda", generator=g) / 45}
    table = torch.arange(S, device="cuda")
    for N in (1, 2):
        hidden = torch.randn((N, H), dtype=torch.bfloat16, device="cuda", generator=g)
        index = torch.stack([torch.randperm(S, device="cuda", generator=g)[:2] for _ in range(N)])
        weights = torch.softmax(torch.randn((N, 2), device="cuda", generator=g), -1)
        active = torch.ones(N, dtype=torch.bool, device="cuda")
        outs = []
        for pairs_max in (experts.gemv.PAIRS_MAX, 0):  # the kernel, then the grouped GEMM
            monkeypatch.setattr(experts.gemv, "PAIRS_MAX", pairs_max)
            counters = experts.ExpertCounters("cuda")
            outs.append((experts.run_experts(module, pool, table, hidden, index, weights, active, counters),
                         counters.read()["experts_read"]))
            monkeypatch.undo()
        (a, read_a), (b, read_b) = outs
        assert read_a == read_b == len(set(index.flatten().tolist()))
        assert float((a.double() - b.double()).norm() / b.double().norm()) < 1e-2


def test_experts_staged_behind_their_copies_equal_one_pass_to_the_bit():
    """A layer whose copies land while it computes (engines/experts.Stages, as the runtime builds it for an
    offloaded layer): each stage waits for its copy's event on the compute stream; the output equals one pass over
    the landed pool bit for bit in bf16 through torch._grouped_mm, at 256 tokens top-2."""
    from engines import experts
    g = torch.Generator(device="cuda").manual_seed(2)
    S, H, I, N, K = 8, 1024, 2048, 256, 2
    module = type("M", (), dict(has_gate=True, is_transposed=False, _apply_gate=staticmethod(
        lambda h: torch.nn.functional.silu(h[:, :I]) * h[:, I:])))()
    host = {"gate_up_proj": (torch.randn(S, 2 * I, H, dtype=torch.bfloat16) / 32).pin_memory(),
            "down_proj": (torch.randn(S, H, I, dtype=torch.bfloat16) / 45).pin_memory()}
    table = torch.arange(S, device="cuda")
    hidden = torch.randn((N, H), dtype=torch.bfloat16, device="cuda", generator=g)
    index = torch.stack([torch.randperm(S, device="cuda", generator=g)[:K] for _ in range(N)])
    weights = torch.softmax(torch.randn((N, K), device="cuda", generator=g), -1)
    active = torch.rand(N, device="cuda", generator=g) > 0.1
    landed = {name: t.cuda() for name, t in host.items()}
    one_pass = experts.run_experts(module, landed, table, hidden, index, weights, active,
                                   experts.ExpertCounters("cuda"))
    pool = {name: torch.zeros_like(t) for name, t in landed.items()}
    pool["gate_up_proj"][:2].copy_(landed["gate_up_proj"][:2])  # slots 0-1 already there: stage 0
    pool["down_proj"][:2].copy_(landed["down_proj"][:2])
    copy, events = torch.cuda.Stream(), [None]
    copy.wait_stream(torch.cuda.current_stream())
    for slot in range(2, S):
        with torch.cuda.stream(copy):
            for name, t in host.items():
                pool[name][slot].copy_(t[slot], non_blocking=True)
            events.append(torch.cuda.Event())
            events[-1].record(copy)
    stage_of = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, -1], device="cuda")
    stage = stage_of[table[index]][active]  # the runtime counts each stage's routed pairs on the host
    sizes = [int((stage == j).sum()) for j in range(len(events))]
    staged = experts.run_experts(module, pool, table, hidden, index, weights, active, experts.ExpertCounters("cuda"),
                                 stages=experts.Stages(stage_of, events, sizes))
    assert torch.equal(staged, one_pass)


@pytest.mark.parametrize("name", ["offload", "specmoe"])
def test_the_disk_tier_on_cuda_gives_the_tokens_and_bytes_of_host_memory(name, tmp_path):
    """host=disk on the GPU: reads into the pinned staging ring, copies on the copy stream (a buffer is reused only
    once its copy has run); the same tokens and counted bytes as from pinned host memory, every copy a read."""
    prompts, settings = _prompts(16, seed=3), SamplingSettings(max_new_tokens=16)
    out = {}
    for spec in ("cuda:budget=25%", f"cuda:budget=25%:host=disk@{tmp_path}"):
        engine = registry.create(name, **({"gamma": 4, "adaptive": False} if name == "specmoe" else {}))
        engine.load(load_model("tiny-mixtral-random", dtype=torch.bfloat16), HardwareProfile.parse(spec))
        disk = engine.runtime.store.disk
        before = disk.bytes_read if disk else 0
        gen = engine.generate(prompts, settings)
        out[spec] = (gen.tokens, gen.stats["h2d_bytes"], (disk.bytes_read - before) if disk else None)
        engine.close()
    (tokens, h2d, _), (disk_tokens, disk_h2d, read) = out.values()
    assert disk_tokens == tokens and disk_h2d == h2d > 0 and read == h2d
