"""The reference rollout backend: transformers `generate` with a KV cache.

Prompts are left-padded into batches; logprobs of the sampled tokens are recomputed from the raw logits
that `generate` returns, scaled by the temperature (see `Sample`).
"""

from __future__ import annotations

from typing import Iterable

import torch

from m2flow.rollout.types import Sample, SamplingParams


def left_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as one left-padded batch on `device`: (input_ids [B, W], attention_mask [B, W])."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.policy_version = 0
        self.device = next(model.parameters()).device

    def part_bytes(self) -> dict[str, float]:
        """Context switching's parts (scheduler/context.py): only "weights" (transformers' cache lives per call)."""
        return {"weights": float(sum(t.numel() * t.element_size() for t in (*self.model.parameters(),
                                                                             *self.model.buffers())))}

    def onload(self, parts: set[str]) -> None:
        if "weights" in parts:
            self.model.to(self.device)

    def offload(self, parts: set[str]) -> None:
        if "weights" in parts and self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     policy_version: int) -> None:
        """In-place weight update by parameter name, from a dict or a stream of (name, tensor) pairs (the
        buckets of a weight sync), copied one at a time. Every weight must come (a tied lm_head.weight may be
        left out); an unknown name or a shape mismatch raises."""
        params = self.model.state_dict()  # views of the parameters
        loaded, unexpected = set(), []
        for name, tensor in weights.items() if isinstance(weights, dict) else weights:
            if name not in params:
                unexpected.append(name)
                continue
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
            loaded.add(name)
        missing = [k for k in params if k not in loaded and k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"weight update does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.policy_version = policy_version

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Sample]:
        """Samples `params.n` responses per prompt; returns them prompt-major (all of prompt 0 first)."""
        if params.stop_strings:
            raise ValueError("stop_strings are supported by the m2flow rollout backend, not by hf")
        tok = self.tokenizer
        stops = sorted({tok.eos_token_id, *params.stop_token_ids})
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        requests = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(params.n)]
        samples: list[Sample] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            if params.seed is not None:
                torch.manual_seed(params.seed + start)
            samples += self._generate_batch(chunk, params, stops)
        return samples

    def _generate_batch(self, chunk, params: SamplingParams, stops: list[int]) -> list[Sample]:
        pad = self.tokenizer.pad_token_id
        input_ids, attention_mask = left_pad([ids for _, ids in chunk], pad, next(self.model.parameters()).device)
        width = input_ids.shape[1]
        greedy = params.temperature == 0
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else (params.top_k or 0),
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.max_new_tokens if params.ignore_eos else None,
            eos_token_id=stops,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_tokens = out.sequences[:, width:]  # [B, T]
        logits = torch.stack(out.logits, dim=1).float()  # [B, T, V] raw logits
        if not greedy:
            logits = logits / params.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row, (prompt_index, ids) in enumerate(chunk):
            tokens = new_tokens[row].tolist()
            finish = "length"
            for t, token in enumerate([] if params.ignore_eos else tokens):
                if token in stops:
                    tokens, finish = tokens[: t + 1], "stop"
                    break
            samples.append(
                Sample(
                    prompt_index=prompt_index,
                    prompt_ids=list(ids),
                    token_ids=tokens,
                    logprobs=logprobs[row, : len(tokens)].tolist(),
                    finish_reason=finish,
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    policy_version=self.policy_version,
                )
            )
        return samples
