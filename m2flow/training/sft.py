"""Supervised fine-tuning on (prompt, completion) pairs: the warm start that makes the tiny base model."""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
from tqdm import tqdm


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Each pair -> (prompt + completion + EOS token ids, number of prompt tokens)."""
    out = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p + c, len(p)))
    return out


def collate(examples: list[tuple[list[int], int]], pad_token_id: int):
    """Right-padded input ids [B, L], attention mask [B, L] and labels [B, L] (-100 off the completion)."""
    L = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), L), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def sft_loss(model, input_ids, mask, labels) -> torch.Tensor:
    """Mean cross-entropy of the completion tokens of a right-padded batch. The attention mask is not passed:
    padding comes after every real token, so causal attention never lets a real token see it, and without a
    mask the attention takes its causal fast path (the same loss, about 15% faster on CPU)."""
    assert bool((mask[:, 1:] <= mask[:, :-1]).all()), "sft_loss expects right-padded rows (see collate)"
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def sft_train(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    warmup: int = 50,
    final_lr_fraction: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """AdamW with linear warmup and cosine decay to `final_lr_fraction` of `lr`; batches sampled by epochs over
    the shuffled pairs.

    `on_step(step, loss)` is called after every optimizer step (step counts from 1). Returns the losses.
    """
    examples = tokenize_pairs(tokenizer, pairs)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    model.train()
    order: list[int] = []
    batches: list[list[int]] = []
    losses = []
    bar = tqdm(range(1, steps + 1), desc="sft warm start", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if not batches:  # 8 batches at a time, grouped by length so that little padding is computed
            while len(order) < 8 * batch_size:
                order += rng.sample(range(len(examples)), len(examples))
            pool = sorted(order[: 8 * batch_size], key=lambda i: len(examples[i][0]))
            del order[: 8 * batch_size]
            batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(batches)
        batch = [examples[i] for i in batches.pop()]
        loss = sft_loss(model, *collate(batch, tokenizer.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    return losses
