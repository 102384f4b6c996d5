"""One request being generated: its tokens, KV block table and sampling state."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class SeqParams:
    """The sampling settings a sequence carries (one generate call's SamplingParams, plus its own seed)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    seed: int  # 0 <= seed < 2**32; drives this sequence's sampling noise


@dataclass(eq=False)  # identity, not field-by-field equality (queues remove sequences by identity)
class Sequence:
    id: int
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int
    params: SeqParams
    prompt_index: int = 0  # which prompt of its generate call
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # leading tokens whose KV is already in the cache (prefix hits)
    num_computed_tokens: int = 0  # leading tokens whose KV this sequence has written or reused
    # in a prefill step: a sequence of the same step with the same tokens whose KV and next-token logits this
    # one copies instead of computing them (set by the batcher; None when it computes its own)
    fork_of: Sequence | None = None
    logprobs: list[float] = field(default_factory=list)  # of each generated token
    finish_reason: str = ""

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]
