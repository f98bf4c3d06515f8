"""Train the project's own MoE checkpoints offline, so routing, hit rates and acceptance are learned.

A byte-level BPE tokenizer and a transformers MoE causal LM (Mixtral; Qwen2-MoE with a shared expert; Qwen3-MoE,
whose MoE layers can sit in every k-th layer with dense MLPs between, as in NLLB-MoE) are trained from a text
corpus (default: the Python standard library), then saved with save_pretrained next to `training.json`
(held-out loss, perplexity, unigram baseline, routing statistics and skew, weights hash).
`trained_checkpoint("tiny")` caches the result per machine, trained at most once. Recipes with
trainer="deterministic" train through workloads/deterministic.py and give the same weights run after run.
It is over 500 lines because the recipes, the data pipeline, the training loop and the checkpoint cache are one
unit: a recipe change must change its cache key, its data and its loop together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.errors import BadInput
from engines.paths import cache_dir

from .corpus import NAMED_CORPORA, Corpus, Doc, load_corpus
from .deterministic import (balance_loss, deterministic_algorithms, lm_loss, prepare_cuda_determinism,
                            use_deterministic_kernels)

EOS = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when training changes in a way that should retrain cached checkpoints


@dataclass(frozen=True)
class TrainPreset:
    """A model size and the training recipe that goes with it."""

    description: str
    arch: str = "mixtral"  # "mixtral" | "qwen2_moe" (adds a shared expert) | "qwen3_moe"
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256  # of one routed expert
    shared_intermediate_size: int = 256  # qwen2_moe only
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    experts: int = 8
    top_k: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    warmup: int = 40
    aux_coef: float = 0.02  # weight of the load-balancing loss
    weight_decay: float = 0.1
    eval_windows: int = 64  # held-out windows of seq_len tokens
    tokenizer_chars: int = 4_000_000  # training text the BPE sees
    device: str = "cpu"  # where it is meant to train
    # On CPU one thread: deterministic, and unlike two it does not collapse when another process shares the cores
    # (measured on 2 shared cores: 1 thread 1.3 s/step, 2 threads 20 s/step).
    cpu_threads: int = 1
    save_dtype: str = "float32"
    # Added after format 1; at their defaults they stay out of the cache key (see checkpoint_key).
    moe_every: int = 1  # MoE in layers k-1, 2k-1, ... (every k-th, as NLLB-MoE), a dense MLP in the others
    dense_intermediate_size: int = 0  # of the dense MLP of the non-MoE layers; 0: as the architecture's default
    # "transformers": transformers' loss, attention and experts loop, the path tiny is trained with (and small was,
    # until 2026-12-08; not bit-reproducible on a GPU); "deterministic": workloads/deterministic.py, the same
    # weights every run.
    trainer: str = "transformers"
    corpus: str = "stdlib"  # a name of corpus.NAMED_CORPORA; `train(corpus=...)` overrides it
    # The balance loss over each MoE layer's tokens ("per-layer", Switch and GShard) or over all layers' tokens
    # together ("pooled", transformers' own); None: the trainer's (transformers pools, deterministic is per layer).
    balance: str | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise BadInput(f"architecture {self.arch!r}: allowed {', '.join(ARCHS)}")
        if self.trainer not in TRAINERS:
            raise BadInput(f"trainer {self.trainer!r}: allowed {', '.join(TRAINERS)}")
        if self.balance not in BALANCES:
            raise BadInput(f"balance {self.balance!r}: allowed {', '.join(map(str, BALANCES))}")
        if self.trainer == "transformers" and self.balance == "per-layer":
            raise BadInput("balance 'per-layer' needs trainer 'deterministic' (transformers pools the layers)")
        if self.corpus not in NAMED_CORPORA:
            raise BadInput(f"corpus {self.corpus!r}: a recipe names one of {', '.join(NAMED_CORPORA)}")
        if not 1 <= self.top_k <= self.experts:
            raise BadInput(f"top_k={self.top_k}: must be between 1 and experts={self.experts}")
        if self.steps < 1:
            raise BadInput(f"steps={self.steps}: must be at least 1")
        if self.moe_every < 1 or self.layers % self.moe_every:
            raise BadInput(f"moe_every={self.moe_every}: must divide layers={self.layers}, so that every "
                           f"{self.moe_every}th layer is MoE up to the last")
        if self.moe_every > 1 and self.arch == "mixtral":
            raise BadInput(f"moe_every={self.moe_every}: the mixtral family has MoE in every layer; "
                           "use arch qwen3_moe or qwen2_moe")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise BadInput(f"heads={self.heads}, kv_heads={self.kv_heads}: heads must divide "
                           f"hidden_size={self.hidden_size} and kv_heads must divide heads")

    def model_config(self):
        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.layers,
                      num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                      num_experts_per_tok=self.top_k, max_position_embeddings=max(2048, self.seq_len),
                      tie_word_embeddings=False, router_aux_loss_coef=self.aux_coef, output_router_logits=False,
                      bos_token_id=None, eos_token_id=0, pad_token_id=0)
        if self.arch == "mixtral":
            from transformers import MixtralConfig
            return MixtralConfig(intermediate_size=self.intermediate_size, num_local_experts=self.experts, **common)
        if self.arch == "qwen3_moe":
            from transformers import Qwen3MoeConfig
            return Qwen3MoeConfig(intermediate_size=self.dense_intermediate_size or self.intermediate_size,
                                  moe_intermediate_size=self.intermediate_size, num_experts=self.experts,
                                  decoder_sparse_step=self.moe_every, norm_topk_prob=True,
                                  head_dim=self.hidden_size // self.heads, **common)
        from transformers import Qwen2MoeConfig
        return Qwen2MoeConfig(intermediate_size=self.dense_intermediate_size or self.shared_intermediate_size,
                              moe_intermediate_size=self.intermediate_size,
                              shared_expert_intermediate_size=self.shared_intermediate_size,
                              num_experts=self.experts, decoder_sparse_step=self.moe_every, norm_topk_prob=True,
                              **common)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers: every moe_every-th, counting from one (transformers' decoder_sparse_step)."""
        return [i for i in range(self.layers) if (i + 1) % self.moe_every == 0]

    def expert_bytes(self) -> int:
        """One routed expert (gate, up and down projections) in save_dtype."""
        return 3 * self.hidden_size * self.intermediate_size * getattr(torch, self.save_dtype).itemsize


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
TRAINERS = ("transformers", "deterministic")
BALANCES = (None, "per-layer", "pooled")

TRAIN_PRESETS: dict[str, TrainPreset] = {
    # ~3.7M parameters; ~1.2M tokens at ~8k tokens/s on two CPU cores: about 3 minutes with the tokenizer.
    "tiny": TrainPreset("4 layers, 8 experts top-2, hidden 128, BPE 2048; trains on 2 CPU cores in ~3 min"),
    # Experts of 3*2048*8960 bf16 = 110 MB each (copying one costs ~2 ms at 54.5 GB/s, more than its compute at
    # batch 1); ~1.8B parameters, ~0.5B active. Measured on one H200 with the transformers trainer: 600 steps (9.8M
    # tokens) in 142 s at 69k tokens/s, 161 s with tokenizer, evaluation and saving; held-out loss 2.09 against a
    # unigram 6.70. That trainer is not bit-reproducible, and its checkpoints differed by machine enough to move
    # SpecMoE's acceptance at batch 16 from 0.33 to 0.55 (results/h200/acceptance/README.md, s4 and s5), so since
    # 2026-12-08 `small` trains deterministically, with transformers' pooled balance loss as before (its routing
    # skew, 0.59-0.61, is what the acceptance results were measured on). Estimated ~3.5 min on one H100 (mixtral-like,
    # about the same FLOPs per step on the same trainer, took 0.31 s a step there); not yet measured.
    "small": TrainPreset("4 layers, 8 experts top-2, hidden 2048, expert 110 MB in bf16, BPE 8192; one H200 ~3 min",
                         vocab_size=8192, hidden_size=2048, intermediate_size=8960, shared_intermediate_size=8960,
                         layers=4, heads=16, kv_heads=8, experts=8, top_k=2, seq_len=512, batch_size=32, steps=600,
                         lr=6e-4, warmup=50, eval_windows=128, tokenizer_chars=20_000_000, device="cuda",
                         save_dtype="bfloat16", trainer="deterministic", balance="pooled"),
    # The paper's best case, NLLB-MoE: MoE in every 4th layer, many experts, skewed routing. Qwen3-MoE family
    # (no shared expert; decoder_sparse_step=4 puts MoE in layers 3, 7, 11). Experts 3*1024*4096 bf16 = 25 MB
    # (NLLB's are 67 MB: 2*2048*8192, no gate). 2.58B parameters, 235M active; 1.49 GFLOP per token trained.
    # A weak balance loss: scaled down on the CPU (64 experts, hidden 128) aux_coef 0 sent 99.9% of the picks to
    # a quarter of the experts, 0.0003 gave a skew of 0.83-0.88 (NLLB-MoE: 0.84), 0.001 0.74, 0.01 0.51
    # (workloads/README.md). Estimated 45-95 s of training on one H200 (against small's measured 214 TFLOP/s
    # per step, times up to 2 for its smaller matmuls and 64-expert loop).
    "nllb-like": TrainPreset("12 layers, MoE in every 4th (3), 64 experts top-2, hidden 1024, expert 25 MB in bf16, "
                             "weak balance loss (skewed routing); one H200 ~2 min",
                             arch="qwen3_moe", vocab_size=8192, hidden_size=1024, intermediate_size=4096,
                             dense_intermediate_size=4096, layers=12, heads=16, kv_heads=8, experts=64, top_k=2,
                             moe_every=4, seq_len=512, batch_size=32, steps=400, lr=1e-3, warmup=50,
                             aux_coef=0.0003, eval_windows=128, tokenizer_chars=20_000_000, device="cuda",
                             save_dtype="bfloat16", trainer="deterministic", corpus="code"),
    # Mixtral-8x7B's pattern at a trainable size: every layer MoE, 8 experts top-2, balanced routing (a per-layer
    # balance loss; scaled down on the CPU it gave a skew of 0.36, Mixtral's is 0.32). Experts 3*2048*4096 bf16
    # = 50 MB; 1.74B parameters, 520M active (small: 508M), 3.22 GFLOP per token trained. Estimated 75-90 s of
    # training on one H200 (small's measured rate; no per-expert select_backward copies, eager attention).
    "mixtral-like": TrainPreset("8 layers, all MoE, 8 experts top-2, hidden 2048, expert 50 MB in bf16, balanced "
                                "routing; one H200 ~2 min",
                                vocab_size=8192, hidden_size=2048, intermediate_size=4096, layers=8, heads=16,
                                kv_heads=8, experts=8, top_k=2, seq_len=512, batch_size=32, steps=300, lr=6e-4,
                                warmup=50, aux_coef=0.02, eval_windows=128, tokenizer_chars=20_000_000,
                                device="cuda", save_dtype="bfloat16", trainer="deterministic", corpus="code"),
}


def get_preset(name: str, **overrides) -> TrainPreset:
    if name not in TRAIN_PRESETS:
        from .models import did_you_mean
        raise BadInput(f"unknown training preset {name!r}{did_you_mean(name, TRAIN_PRESETS)}; "
                       f"allowed: {', '.join(TRAIN_PRESETS)}")
    known = {f.name for f in dataclasses.fields(TrainPreset)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise BadInput(f"training preset has no setting {bad[0]!r}; settings: {', '.join(sorted(known))}")
    return dataclasses.replace(TRAIN_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def parse_settings(items: tuple[str, ...] | list[str]) -> dict:
    """KEY=VALUE strings (`model train --set`) as preset overrides, each value read as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(TrainPreset)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise BadInput(f"--set {item!r}: write KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        kind = {"int": int, "float": float, "str": str}.get(str(fields[key].type), str)
        try:
            out[key] = kind(text.replace("_", "")) if kind in (int, float) else text
        except ValueError:
            raise BadInput(f"--set {item!r}: {key} takes {'a whole number' if kind is int else 'a number'}") from None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Data: tokenizer, token streams, batches.
# ----------------------------------------------------------------------------------------------------------------


def train_tokenizer(docs: list[Doc], vocab_size: int, max_chars: int):
    """A byte-level BPE (GPT-2 style) trained on the first max_chars of the training documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts():
        seen = 0
        for d in docs:
            if seen >= max_chars:
                return
            seen += len(d.text)
            yield d.text

    tok.train_from_iterator(texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=1 << 20)


def encode(tokenizer, docs: list[Doc], max_tokens: int | None = None) -> torch.Tensor:
    """Documents as one token stream, each followed by EOS; stops once max_tokens are reached. [N] int64."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    fast = tokenizer.backend_tokenizer
    for start in range(0, len(docs), 64):
        for enc in fast.encode_batch([d.text for d in docs[start:start + 64]], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] of a token stream."""
    n = stream.numel() // seq_len
    if n == 0:
        raise BadInput(f"the corpus gives {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


def shuffled(docs: list[Doc], seed: int) -> list[Doc]:
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [docs[i] for i in order]


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    path: Path
    metrics: dict = field(default_factory=dict)


def lr_at(step: int, p: TrainPreset) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    frac = (step - p.warmup) / max(1, p.steps - p.warmup)
    return p.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(preset: str | TrainPreset = "tiny", corpus: str | Path | Corpus | None = None, out: str | Path | None = None,
          seed: int = 0, device: str | None = None, progress: bool = True, time_limit_s: float | None = None,
          **overrides) -> TrainResult:
    """Train a checkpoint and save it (model, tokenizer, training.json) to `out`. Returns its metrics.

    `overrides` replace fields of the preset (e.g. steps=5, hidden_size=64 for a quick check). `time_limit_s` is a
    safety net for a rented machine: training stops after that long (the result then depends on the machine's
    speed, and training.json says at which step it stopped)."""
    p = preset if isinstance(preset, TrainPreset) else get_preset(preset, **overrides)
    cublas_before_cuda = prepare_cuda_determinism() if p.trainer == "deterministic" else None
    dev = torch.device(device or p.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"preset needs a CUDA GPU (device {str(dev)!r}) and none is available; train it on a GPU "
                       "machine or pass device='cpu' with smaller sizes")
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus or p.corpus)
    out = Path(out) if out else default_out_dir(p, seed, corpus)
    t_begin = time.perf_counter()
    torch.manual_seed(seed)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(p.cpu_threads)
    try:
        return _train(p, corpus, out, seed, dev, progress, t_begin, time_limit_s, cublas_before_cuda)
    finally:
        torch.set_num_threads(threads_before)


def _train(p: TrainPreset, corpus: Corpus, out: Path, seed: int, dev: torch.device, progress: bool,
           t_begin: float, time_limit_s: float | None, cublas_before_cuda: bool | None) -> TrainResult:
    train_docs, held_docs = corpus.split()
    if not held_docs:  # a tiny corpus: hold out its last document so the held-out loss still exists
        train_docs, held_docs = train_docs[:-1], train_docs[-1:]
    if not train_docs:
        raise BadInput(f"corpus {corpus.name!r} has {len(corpus.docs)} document(s); training needs at least two")
    train_docs = shuffled(train_docs, seed)
    _log(progress, f"corpus {corpus.name}: {len(train_docs)} train docs, {len(held_docs)} held-out docs, "
                   f"{corpus.chars / 1e6:.1f}M chars")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, p.vocab_size, p.tokenizer_chars)
    t_tok = time.perf_counter() - t0
    needed = p.steps * p.tokens_per_step
    train_stream = encode(tokenizer, train_docs, max_tokens=needed + p.seq_len)
    held_stream = encode(tokenizer, held_docs, max_tokens=p.eval_windows * p.seq_len)
    train_w, held_w = windows(train_stream, p.seq_len), windows(held_stream, p.seq_len)
    _log(progress, f"tokenizer: BPE {len(tokenizer)} in {t_tok:.1f}s; {train_stream.numel()} train tokens "
                   f"({needed / train_stream.numel():.2f} epochs), {held_w.numel()} held-out tokens")

    config = p.model_config()
    config.vocab_size = len(tokenizer)
    model = _build(config, seed, dev, p.trainer).train()
    built = moe_layer_indices(model)
    if built != p.moe_layers:  # transformers decides the layer pattern from the config: check it did as asked
        raise RuntimeError(f"transformers built MoE in layers {built}; the recipe asks for {p.moe_layers}")
    mode = deterministic_algorithms() if p.trainer == "deterministic" else contextlib.nullcontext()
    with mode:
        losses, steps_done, train_s = _fit(model, train_w, p, seed, dev, progress, t_begin, time_limit_s)
        metrics = evaluate(model, held_w, train_stream, p, dev)
    if steps_done < p.steps:
        metrics["stopped_early_at_step"] = steps_done
    if dev.type == "cuda":
        metrics["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    metrics.update(preset=dataclasses.asdict(p), seed=seed, device=str(dev),
                   device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   torch_threads=torch.get_num_threads(), corpus=corpus.name, corpus_fingerprint=corpus.fingerprint,
                   train_docs=len(train_docs), heldout_docs=len(held_docs),
                   train_tokens_seen=steps_done * p.tokens_per_step,
                   train_tokens_distinct=int(train_stream.numel()), heldout_tokens=int(held_w.numel()),
                   train_seconds=round(train_s, 1), train_tokens_per_s=round(steps_done * p.tokens_per_step / train_s),
                   tokenizer_seconds=round(t_tok, 1), params=sum(q.numel() for q in model.parameters()),
                   moe_layers=p.moe_layers, expert_bytes=p.expert_bytes(),
                   loss_curve=losses, format_version=FORMAT_VERSION,
                   torch_version=torch.__version__, transformers_version=_tf_version())
    if p.trainer == "deterministic":
        metrics["determinism"] = dict(
            torch_deterministic_algorithms=True, cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            cublas_config_set_before_cuda_started=cublas_before_cuda,
            kernels="workloads/deterministic.py: experts by stable sort and permutation gathers, eager attention, "
                    f"cross-entropy as logsumexp minus target logit, {p.balance or 'per-layer'} balance loss")
    _save(model, tokenizer, metrics, out, p)
    metrics["weights_sha256"] = weights_fingerprint(out)
    metrics["wall_seconds"] = round(time.perf_counter() - t_begin, 1)
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _log(progress, summary(metrics))
    return TrainResult(out, metrics)


def _fit(model, train_w: torch.Tensor, p: TrainPreset, seed: int, dev: torch.device, progress: bool,
         t_begin: float, time_limit_s: float | None) -> tuple[list, int, float]:
    """The optimisation loop. Batches come in a fixed order (a seeded permutation of the windows per epoch).
    Returns the loss curve [(step, LM loss)], the steps done and the seconds they took."""
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, betas=(0.9, 0.95),
                            **({"fused": True} if dev.type == "cuda" else {}))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(train_w.shape[0], generator=gen)
    cursor, losses, steps_done = 0, [], 0
    bar = _bar(p.steps, progress)
    _sync(dev)
    t_train = time.perf_counter()
    for step in range(p.steps):
        if time_limit_s is not None and time.perf_counter() - t_begin > time_limit_s:
            _log(progress, f"time limit {time_limit_s:.0f}s reached: stopping after {step} of {p.steps} steps")
            break
        if cursor + p.batch_size > len(order):  # next epoch
            order, cursor = torch.randperm(train_w.shape[0], generator=gen), 0
        x = train_w[order[cursor:cursor + p.batch_size]].to(dev, non_blocking=True)  # [B, T]
        cursor += p.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p)
        with autocast:
            loss, lm, aux = _step_loss(model, x, p)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == p.steps - 1:
            lm_value = lm.item()  # .item() syncs, so tokens/s is honest
            losses.append((step, round(lm_value, 4)))
            rate = (step + 1) * p.tokens_per_step / (time.perf_counter() - t_train)
            bar.set_postfix(loss=f"{lm_value:.3f}", aux="-" if aux is None else f"{aux.item():.3f}",
                            tok_s=f"{rate:,.0f}")
        bar.update(1)
        steps_done = step + 1
    _sync(dev)
    train_s = time.perf_counter() - t_train
    bar.close()
    return losses, steps_done, train_s


def _step_loss(model, x: torch.Tensor, p: TrainPreset):
    """(loss to minimise, LM loss, balance loss or None) of one batch x [B, T], by the recipe's trainer."""
    if p.trainer == "deterministic":
        res = model(input_ids=x, output_router_logits=p.aux_coef > 0)
        lm = lm_loss(res.logits, x)
        if p.aux_coef == 0:
            return lm, lm, None
        aux = balance_loss(res.router_logits, p.top_k, pooled=p.balance == "pooled")
        return lm + p.aux_coef * aux, lm, aux
    res = model(input_ids=x, labels=x, output_router_logits=True)  # loss = LM loss + coef * balance (pooled)
    return res.loss, res.loss - p.aux_coef * res.aux_loss, res.aux_loss


@torch.no_grad()
def evaluate(model, held_w: torch.Tensor, train_stream: torch.Tensor, p: TrainPreset, dev) -> dict:
    """Held-out LM loss (no balance term), the unigram baseline of the tokenizer, and routing statistics."""
    model.eval()
    V = model.config.vocab_size
    E = p.experts
    usage = None  # [L, E] routed slots (top-k picks) per expert, L = MoE layers
    router_entropy = None  # [L] sum over tokens of the router distribution's entropy
    total_loss, total_tokens = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    for start in range(0, held_w.shape[0], 8):
        x = held_w[start:start + 8].to(dev)
        with autocast:
            out = model(input_ids=x, output_router_logits=True)
            loss = lm_loss(out.logits, x)
        n = x.shape[0] * (x.shape[1] - 1)
        total_loss += loss.item() * n
        total_tokens += n
        logits = torch.stack([r.float().reshape(-1, E) for r in out.router_logits])  # [L, N, E]
        top = logits.topk(p.top_k, dim=-1).indices.cpu()  # [L, N, K]
        counts = torch.stack([torch.bincount(t.reshape(-1), minlength=E) for t in top]).double()  # [L, E]
        probs = logits.softmax(-1)
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1).sum(-1).cpu()  # [L]
        usage = counts if usage is None else usage + counts
        router_entropy = ent if router_entropy is None else router_entropy + ent
    held_loss = total_loss / total_tokens

    # Unigram baseline: held-out targets scored by token frequencies of the training stream (add-one smoothed).
    freq = torch.bincount(train_stream, minlength=V).double() + 1
    logp = (freq / freq.sum()).log()
    targets = held_w[:, 1:].reshape(-1)
    unigram = -logp[targets].mean().item()

    share = usage / usage.sum(-1, keepdim=True)  # [L, E]
    usage_entropy = -(share * share.clamp_min(1e-12).log()).sum(-1)
    n_tokens = held_w.numel()
    share_rows = [[round(v, 4) for v in row] for row in share.tolist()]
    return dict(heldout_loss=round(held_loss, 4), heldout_perplexity=round(math.exp(held_loss), 2),
                unigram_loss=round(unigram, 4), unigram_perplexity=round(math.exp(unigram), 2),
                expert_usage_entropy=[round(v, 4) for v in usage_entropy.tolist()],
                router_entropy_per_token=[round(v / n_tokens, 4) for v in router_entropy.tolist()],
                entropy_max=round(math.log(E), 4),
                expert_usage_share=share_rows, **routing_stats(share.tolist()))


SKEW_DEFINITION = (
    "routing_skew: the share of a layer's routed token slots (every token's top-k picks) that go to its hottest "
    "ceil(E/4) experts, over the held-out tokens, averaged over the MoE layers; 0.25 for uniform routing, 1.0 when "
    "a quarter of the experts take every pick. Our reading of the paper's skew (NLLB-MoE 0.84, Mixtral 0.32, "
    "Llama-4-Scout 0.59), whose definition we do not have: it puts Mixtral, trained with a balance loss, just "
    "above the 0.25 floor, where 1 - H/ln E and the Gini coefficient stay well below 0.32 (a balance-trained "
    "mixtral-like scaled down on a CPU: 0.36 by this definition, Gini 0.17, 1 - H/ln E 0.03; both are recorded "
    "as routing_gini and routing_entropy_skew).")


def routing_stats(share: list[list[float]]) -> dict:
    """Skew and the hottest experts of each MoE layer from its usage shares [L][E] (summing to 1 per layer)."""
    skew, hottest, gini, entropy_skew = [], [], [], []
    for row in share:
        E = len(row)
        ranked = sorted(range(E), key=lambda e: -row[e])  # hottest first; ties by expert id
        hot = ranked[:math.ceil(E / 4)]
        skew.append(round(sum(row[e] for e in hot), 4))
        hottest.append([[e, round(row[e], 4)] for e in hot])
        ascending = sorted(row)
        gini.append(round(sum((2 * i - E + 1) * v for i, v in enumerate(ascending)) / E, 4))
        entropy = -sum(v * math.log(v) for v in row if v > 0)
        entropy_skew.append(round(1 - entropy / math.log(E), 4) if E > 1 else 0.0)
    return dict(routing_skew=round(sum(skew) / len(skew), 4), routing_skew_per_layer=skew,
                routing_skew_definition=SKEW_DEFINITION, hottest_experts=hottest, routing_gini=gini,
                routing_entropy_skew=entropy_skew)


ROUTING_KEYS = ("routing_skew", "routing_skew_per_layer", "routing_skew_definition", "hottest_experts",
                "routing_gini", "routing_entropy_skew")


def routing_of(m: dict) -> dict:
    """The routing statistics of a training.json; computed from its usage shares if it predates them."""
    if "routing_skew" in m:
        return {k: m[k] for k in ROUTING_KEYS}
    return routing_stats(m["expert_usage_share"])


def summary(m: dict) -> str:
    r = routing_of(m)
    lines = [f"held-out loss {m['heldout_loss']:.3f} (perplexity {m['heldout_perplexity']:.1f}) vs unigram baseline "
             f"{m['unigram_loss']:.3f} (perplexity {m['unigram_perplexity']:.1f})",
             f"training: {m['train_tokens_seen']:,} tokens in {m['train_seconds']:.0f}s, "
             f"{m['train_tokens_per_s']:,} tokens/s on {m['device_name']}",
             f"routing skew (share of picks on the hottest quarter of experts; uniform 0.25): {r['routing_skew']:.3f};"
             " per MoE layer " + " ".join(f"{v:.3f}" for v in r["routing_skew_per_layer"]),
             f"expert usage entropy per layer (max {m['entropy_max']:.3f}): "
             + " ".join(f"{v:.3f}" for v in m["expert_usage_entropy"]),
             "router entropy per token per layer (uniform routing = max): "
             + " ".join(f"{v:.3f}" for v in m["router_entropy_per_token"])]
    if "weights_sha256" in m:
        lines.append(f"weights_sha256 {m['weights_sha256']}")
    return "\n".join(lines)


def _build(config, seed: int, dev: torch.device, trainer: str) -> torch.nn.Module:
    """fp32 master weights, initialised on the device (HF init of GBs of experts is slow on a CPU). The
    deterministic trainer runs the kernels of workloads/deterministic.py. Otherwise, on CUDA, the experts run as
    transformers' per-expert loop of F.linear, which autocast turns into bf16 matmuls; grouped_mm would receive
    fp32 weights there."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    extra = {"attn_implementation": "eager"} if trainer == "deterministic" else {}
    with dev:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    if trainer == "deterministic":
        use_deterministic_kernels(model)
    elif dev.type == "cuda":
        model.set_experts_implementation("eager")
    return model


def moe_layer_indices(model: torch.nn.Module) -> list[int]:
    """Indices of the decoder layers that hold an experts module."""
    from engines.runtime import find_experts_modules
    return [i for i, layer in enumerate(model.model.layers) if find_experts_modules(layer)]


def weights_fingerprint(checkpoint: Path) -> str:
    """sha256 over the checkpoint's weight files (names and bytes, in name order): the same recipe and seed can
    give other weights on another GPU or run (GPU training is not bit-reproducible), and this tells them apart."""
    h = hashlib.sha256()
    for f in sorted(checkpoint.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _save(model, tokenizer, metrics: dict, out: Path, p: TrainPreset) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(getattr(torch, p.save_dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The per-machine cache: trained once, found by a hash of everything that determines the weights.
# ----------------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    return cache_dir() / "models"


# Recipe fields added after format 1: at their defaults they are left out of the key, so the checkpoints cached
# before they existed keep their keys.
ADDED_AFTER_V1 = ("moe_every", "dense_intermediate_size", "trainer", "corpus", "balance")


def checkpoint_key(p: TrainPreset, seed: int, corpus: Corpus) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainPreset)}
    recipe = {k: v for k, v in dataclasses.asdict(p).items()
              if k != "description"  # words do not retrain
              and not (k in ADDED_AFTER_V1 and v == defaults[k])}
    blob = json.dumps([recipe, seed, corpus.fingerprint, FORMAT_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_out_dir(p: TrainPreset, seed: int, corpus: Corpus) -> Path:
    name = next((k for k, v in TRAIN_PRESETS.items() if v == p), "custom")
    return cache_root() / f"{name}-{checkpoint_key(p, seed, corpus)}"


def cached_checkpoint(name: str, seed: int = 0, corpus: Corpus | None = None) -> Path:
    """Where the cached checkpoint of a preset would be (it may not exist yet)."""
    p = get_preset(name)
    return default_out_dir(p, seed, corpus or load_corpus(p.corpus))


def trained_checkpoint(name: str, seed: int = 0, progress: bool = True) -> Path:
    """The cached checkpoint of a preset, trained now if missing. Two processes asking at once train it once:
    a file lock serialises them and the checkpoint appears by an atomic rename of a finished directory."""
    from filelock import FileLock
    p = get_preset(name)
    corpus = load_corpus(p.corpus)
    final = default_out_dir(p, seed, corpus)
    if (final / "training.json").is_file():
        return final
    if p.device == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"model {name!r} is not trained on this machine yet and training it needs a CUDA GPU; "
                       f"run `specmoe-bench model train --preset {name}` on a GPU machine, or use 'tiny'")
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "training.json").is_file():  # another process finished it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        _log(progress, f"training {name!r} once for this machine into {final}")
        try:
            train(p, corpus, tmp, seed=seed, progress=progress)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------------------


class _NoBar:
    def set_postfix(self, **kw):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total: int, progress: bool):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="train", unit="step", file=sys.stderr, mininterval=1.0)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _tf_version() -> str:
    import transformers
    return transformers.__version__
