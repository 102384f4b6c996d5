"""Forward passes shared by the actor, the reference model and tests."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift RoPE: [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Logits that predict the last `response_len` tokens of each row: [B, T, V]."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    width = input_ids.shape[1]
    return out.logits[:, width - response_len - 1 : width - 1, :].float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: logits [B, T, V], tokens [B, T] -> [B, T]. Temperature 0
    (greedy) uses the raw logits, as the rollout engine reports them."""
    if temperature not in (0, 1):
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def batch_logprobs(model, batch, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """Logprobs of a RolloutBatch's response tokens, micro-batched; 0 off the response mask: [B, T]."""
    out = [
        token_logprobs(response_logits(model, mb.input_ids, mb.attention_mask, mb.response_mask.shape[1]),
                       mb.input_ids[:, mb.prompt_width :], temperature)
        for mb in batch.split(micro_batch_size)
    ]
    return torch.cat(out) * batch.response_mask
