"""Forward passes shared by the actor, the reference model and tests."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift RoPE: [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                    packed: bool = False, share_prompts: bool = True) -> torch.Tensor:
    """Logits that predict the last `response_len` tokens of each row: [B, T, V]. A causal LM computes its LM
    head only there. `packed`: no padding computed (training/packing.py; the model must use varlen attention),
    and with `share_prompts` rows with the same prompt compute it once; rows without a response token in a
    column get zeros there."""
    if packed:
        from m2flow.training.packing import packed_response_logits

        return packed_response_logits(model, input_ids, attention_mask, response_len, share_prompts)
    keep = {"logits_to_keep": response_len + 1} if hasattr(model, "lm_head") else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **keep,
    )
    width = out.logits.shape[1]  # response_len + 1 with an LM head's logits_to_keep, else the whole row
    return out.logits[:, width - response_len - 1 : width - 1, :].float()


def response_token_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                         temperature: float, packed: bool = False,
                         share_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy), each [B, T] float32, of the last `response_len` tokens of each row, through the
    model's LeanLMHead (training/token_stats.py): logprobs under logits / temperature, entropy of the raw
    logits, without ever holding all the logits. 0 where a row has no response token in a column when packed."""
    from m2flow.training.token_stats import lean_head

    head = lean_head(model)
    width, T = input_ids.shape[1], response_len
    if packed:
        from m2flow.training.packing import pack, packed_forward

        p = pack(input_ids, attention_mask, T, share_prompts)
        head.request = (p.targets, temperature)
        stats = packed_forward(model, p)[0]  # [K, 2]
        out = stats[p.slot.clamp(min=0).to(stats.device)] * (p.slot >= 0).to(stats.device).unsqueeze(-1)
    else:
        targets = torch.nn.functional.pad(input_ids[:, width - T:], (0, 1))  # the last kept position: no target
        head.request = (targets, temperature)
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                    logits_to_keep=T + 1).logits[:, :T]
    return out[..., 0], out[..., 1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: logits [B, T, V], tokens [B, T] -> [B, T]. Temperature 0
    (greedy) uses the raw logits, as the rollout engine reports them."""
    if temperature not in (0, 1):
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def batch_logprobs(model, batch, temperature: float, micro_batch_size: int, max_tokens: int = 0,
                   share_prompts: bool = True) -> torch.Tensor:
    """Logprobs of a RolloutBatch's response tokens, micro-batched (packed with `max_tokens` > 0, computing a
    shared prompt once with `share_prompts`); 0 off the response mask: [B, T]. On N trainer ranks each computes
    its share of the rows and the shares are summed."""
    from m2flow.training.data_parallel import rank_micro_batches, world
    from m2flow.training.packing import micro_batches
    from m2flow.training.token_stats import lean_head

    rank, size = world()
    out = torch.zeros_like(batch.response_mask)  # on the host, where the batch is
    device = next(model.parameters()).device
    split = lambda b: micro_batches(b, micro_batch_size, max_tokens, share_prompts)  # noqa: E731
    for rows, mb, real in rank_micro_batches(batch, split, rank, size):
        mb, T = mb.to(device), mb.response_mask.shape[1]
        if lean_head(model) is not None:
            logprobs = response_token_stats(model, mb.input_ids, mb.attention_mask, T, temperature, max_tokens > 0,
                                            share_prompts)[0]
        else:
            logits = response_logits(model, mb.input_ids, mb.attention_mask, T, max_tokens > 0, share_prompts)
            logprobs = token_logprobs(logits, mb.input_ids[:, mb.prompt_width :], temperature)
        if real:  # (a dummy pass only keeps FSDP2's collectives paired across ranks)
            out[rows] = logprobs.to(out.device, out.dtype)
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(out)  # every row was computed by exactly one rank
    return out * batch.response_mask
