"""The deterministic training path: an experts forward, the losses and the torch settings under which one recipe
and seed give the same weights bit for bit, run after run, on one GPU model (and on the CPU).

What would otherwise differ between two runs on a GPU, and what is used instead:
- transformers' eager experts loop combines expert outputs with `index_add_` and gathers tokens with advanced
  indexing, whose backward accumulates with atomics: here tokens are sorted by expert once (a stable sort) and
  moved by permutations whose backward is the inverse permutation, a plain gather; the k picks of a token are
  summed in a fixed order. The fp32 expert weights are split with `unbind`, not indexed per expert, so the
  backward stacks E gradients once instead of adding E zero-filled copies of the whole tensor.
- the cross-entropy of transformers goes through NLLLoss, which torch lists as having no deterministic CUDA
  implementation: here it is logsumexp minus the target logit (a gather, deterministic in torch's mode).
- SDPA picks flash, memory-efficient or cuDNN kernels by shape and GPU, some with atomics in their backward:
  the model trains with eager attention (matmul, softmax, matmul; cuBLAS is deterministic with a fixed
  workspace, CUBLAS_WORKSPACE_CONFIG=:4096:8, set before CUDA starts).
- torch.use_deterministic_algorithms(True) (strict, not warn-only) for everything else: an operation without a
  deterministic form raises instead of silently differing.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

EXPERTS_IMPLEMENTATION = "specmoe_bench_deterministic_train"
CUBLAS_WORKSPACE = ":4096:8"


def prepare_cuda_determinism() -> bool:
    """Set CUBLAS_WORKSPACE_CONFIG unless the user set one. True if CUDA had not started yet in this process, so
    that cuBLAS reads it; False if it may have started without it (then cuBLAS may not be deterministic)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    return not torch.cuda.is_initialized()


@contextlib.contextmanager
def deterministic_algorithms():
    """torch's deterministic mode (strict) and deterministic cuDNN for the block; the previous settings after.
    The mode also fills every new allocation (torch.utils.deterministic.fill_uninitialized_memory, on by default):
    one more write per tensor, kept so that a kernel that reads memory it did not write cannot differ by run."""
    import torch.utils.deterministic as tud
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, tud.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    tud.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]
        tud.fill_uninitialized_memory = before[4]


class _Permute(torch.autograd.Function):
    """x[perm] for a permutation `perm` whose inverse is `inverse`. Autograd would scatter-add the gradient of a
    gather; for a permutation the gradient is the inverse gather, with no atomics."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of one MoE layer (fused gate_up_proj [E, 2I, H], down_proj [E, H, I], gated, no bias) over
    N tokens, each routed to K experts. One host sync per layer (the group sizes)."""
    N, H = hidden_states.shape  # N = tokens, H = hidden
    K = top_k_index.shape[-1]  # K = experts per token; S = N * K routed slots, token-major
    expert_of_slot = top_k_index.reshape(-1)  # [S]
    order = torch.argsort(expert_of_slot, stable=True)  # [S] slots grouped by expert, in token order within one
    inverse = torch.argsort(order)  # [S]
    sizes = torch.bincount(expert_of_slot, minlength=module.num_experts).tolist()  # [E] slots per expert
    slots = hidden_states.unsqueeze(1).expand(N, K, H).reshape(N * K, H)  # [S, H]; backward sums the K copies
    grouped = _Permute.apply(slots, order, inverse)  # [S, H] grouped by expert
    gate_up, down = module.gate_up_proj.unbind(0), module.down_proj.unbind(0)  # E x [2I, H], E x [H, I]
    outs = [F.linear(module._apply_gate(F.linear(x, gate_up[e])), down[e])  # [n_e, H]
            for e, x in enumerate(grouped.split(sizes)) if sizes[e]]
    out = _Permute.apply(torch.cat(outs), inverse, order)  # [S, H] back in slot order
    out = out.to(hidden_states.dtype).view(N, K, H) * top_k_weights.to(hidden_states.dtype).unsqueeze(-1)
    return out.sum(1)  # [N, H]: the K picks of a token summed in pick order


def check_supported(model: nn.Module) -> None:
    """The experts forward above covers gated, non-transposed experts without bias (Mixtral, Qwen2/3-MoE)."""
    from engines.runtime import find_experts_modules
    for name, m in find_experts_modules(model):
        if m.is_transposed or getattr(m, "has_bias", False) or not m.has_gate:
            raise NotImplementedError(f"{name}: the deterministic trainer covers gated experts stored [E, 2I, H] "
                                      "without bias")


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over B x (T-1) positions in fp32, as transformers' causal-LM loss (without
    ignored labels), written without NLLLoss. logits [B, T, V], ids [B, T]."""
    logits = logits[:, :-1].float()  # [B, T-1, V]
    target = ids[:, 1:].unsqueeze(-1)  # [B, T-1, 1]
    return (logits.logsumexp(-1) - logits.gather(-1, target).squeeze(-1)).mean()


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, pooled: bool = False) -> torch.Tensor:
    """The load-balancing loss of transformers' load_balancing_loss_func (E * sum over picks and experts of
    f * P; `top_k` when balanced), by default per MoE layer and averaged over layers, as Switch and GShard apply
    it; `pooled`: over the tokens of all layers together, as transformers does, which leaves single layers free
    to concentrate (the routing `small` was trained with)."""
    losses = []
    for logits in ((torch.cat(router_logits),) if pooled else router_logits):  # each [N, E]
        probs = logits.float().softmax(-1)
        E = probs.shape[-1]
        picked = F.one_hot(probs.topk(top_k, dim=-1).indices, E).float()  # [N, K, E]
        losses.append(E * (picked.mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def use_deterministic_kernels(model: nn.Module) -> None:
    """Route the model's experts through experts_forward (build it with attn_implementation="eager")."""
    check_supported(model)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


_register()
