"""Continuous batching: which sequences run in the next step.

Waiting sequences are prefilled first (as many as the token and sequence budgets and free blocks
allow; a sequence with the same tokens as one already in the step, such as another sample of the same
prompt, forks it and costs no tokens); otherwise every running sequence decodes one token. When a decode
step has no free block for a sequence, the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the waiting queue, to be recomputed (prompt and tokens generated so far) when
blocks are free again.
"""

from __future__ import annotations

from collections import deque

from m2flow.rollout.block_manager import BlockManager
from m2flow.rollout.sequence import Sequence, Status


class Batcher:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # by id, oldest first (removal without a scan)
        self.num_preemptions = 0

    def check_fits(self, seq: Sequence, max_len: int) -> None:
        """Raises unless `seq` can grow to `max_len` tokens (prompt + response) in the whole cache."""
        need = -(-max_len // self.blocks.block_size)
        if need > len(self.blocks.blocks):
            raise ValueError(f"a sequence of up to {max_len} tokens needs {need} KV blocks but the cache has only "
                             f"{len(self.blocks.blocks)}: raise rollout.engine.kv_cache_gb or shorten prompts / responses")

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort_all(self) -> None:
        """Drops every queued and running sequence and frees its blocks (after an interrupted step). Cached
        prefixes are forgotten too: an interrupted prefill may have registered blocks it never wrote."""
        for seq in self.running.values():
            self.blocks.free(seq)
        self.running.clear()
        self.waiting.clear()
        self.blocks.reset_prefix_cache()

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences of the next step, whether it is a prefill step)."""
        scheduled, num_tokens = [], 0
        computed: dict[tuple[int, ...], Sequence] = {}  # the sequences this step computes, by their tokens
        while self.waiting and len(self.running) + len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            seq.fork_of = computed.get(tuple(seq.token_ids)) if self.blocks.prefix_caching else None
            if seq.fork_of is not None:  # e.g. another sample of the same prompt: copies its KV, costs no tokens
                if self.blocks.num_free < self.blocks.fork_blocks_needed(seq):
                    break
                self.blocks.fork(seq, seq.fork_of)
            else:
                cached = self.blocks.cached_prefix(seq)
                new_tokens = len(seq) - len(cached) * self.blocks.block_size
                if not self.blocks.can_allocate(seq) or (scheduled and num_tokens + new_tokens > self.max_num_batched_tokens):
                    break
                self.blocks.allocate(seq, cached)
                num_tokens += new_tokens
                computed[tuple(seq.token_ids)] = seq
            seq.status = Status.RUNNING
            scheduled.append(self.waiting.popleft())
        if scheduled:
            self.running.update((s.id, s) for s in scheduled)
            return scheduled, True

        for seq in list(self.running.values()):
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room for an older sequence
            while not self.blocks.can_append(seq):
                victim = next(reversed(self.running.values()))
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                scheduled.append(seq)
        return scheduled, False

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.id]
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.blocks.free(seq)
        del self.running[seq.id]
