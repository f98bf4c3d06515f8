"""The external peer: transformers `from_pretrained(device_map=..., max_memory=...)` offload through accelerate,
run as it ships (its own generate loop). Host-to-device bytes are not counted by this engine: they are absent."""
from __future__ import annotations

import tempfile
import time

import torch

from .base import Engine
from .errors import EngineUnavailable
from .hardware import HardwareProfile, layer_bytes
from .runtime import Generation, SamplingSettings, left_pad, teacher_forcing_batch


class AccelerateEngine(Engine):
    name = "accelerate"
    summary = "transformers + accelerate device_map offload, run as it ships"

    def load(self, model, hardware: HardwareProfile) -> None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise EngineUnavailable("accelerate is not installed (pip install accelerate)") from None
        if not hardware.is_cuda:
            raise EngineUnavailable("accelerate offload needs a CUDA device: on cpu every weight already sits in "
                                    "host memory, so there is nothing to offload")
        from transformers import AutoModelForCausalLM
        self.loaded = model
        self._tmp = tempfile.TemporaryDirectory(prefix="smb-accel-")
        model.model.save_pretrained(self._tmp.name)
        dtype = next(model.model.parameters()).dtype
        max_memory = None
        if hardware.has_budget:
            experts = sum(p.nbytes for n, p in model.model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
            non_expert = sum(p.nbytes for p in model.model.parameters()) - experts
            budget = hardware.expert_budget(non_expert, model.layers_loaded, model.layers_total,
                                            layer_bytes(model.model) - experts, experts)
            max_memory = {int(hardware.device.split(":")[1]): non_expert + budget, "cpu": 2 ** 40}
        self.model = AutoModelForCausalLM.from_pretrained(self._tmp.name, dtype=dtype, device_map="auto",
                                                          max_memory=max_memory, trust_remote_code=False).eval()
        self.device = torch.device(hardware.device)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> Generation:
        ids, mask = left_pad(prompts, self.device)
        B, L = ids.shape
        stamps: list[float] = []

        def stamp(input_ids, scores):  # a logits processor runs once per generated position
            torch.cuda.synchronize(self.device)
            stamps.append(time.perf_counter())
            return scores

        torch.manual_seed(settings.seed)
        t_start = time.perf_counter()
        out = self.model.generate(
            input_ids=ids, attention_mask=mask,
            max_new_tokens=settings.max_new_tokens, min_new_tokens=0 if settings.eos_token_id else settings.max_new_tokens,
            do_sample=not settings.greedy, temperature=settings.temperature or None,
            top_p=settings.top_p if not settings.greedy else None, eos_token_id=settings.eos_token_id,
            pad_token_id=0, logits_processor=[stamp])
        torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        tokens = []
        for row in out[:, L:].tolist():
            if settings.eos_token_id is not None and settings.eos_token_id in row:
                row = row[: row.index(settings.eos_token_id) + 1]
            tokens.append(row)
        return Generation(tokens=tokens, prompt_lens=[len(p) for p in prompts], t_start=t_start,
                          t_first=stamps[0] if stamps else t_end, step_times=stamps[1:],
                          step_tokens=[B] * len(stamps[1:]), t_end=t_end, stats={},
                          step_rows=None if settings.eos_token_id is not None else [B] * len(stamps[1:]))

    def teacher_forced_logits(self, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """One forward of the dispatched model over prompt + continuation (left-padded, positions from the mask, as
        `generate` computes them); the logits at the continuation positions, [B, C, V] float32 on the CPU. The
        inputs go where transformers' `generate` puts them: the device of the model's first weights, which is the
        CPU when device_map placed the embeddings there."""
        ids, mask, pos = teacher_forcing_batch(prompts, continuations, self.model.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        return logits[:, -len(continuations[0]):, :].float().cpu()

    def close(self) -> None:
        self.model = None
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
