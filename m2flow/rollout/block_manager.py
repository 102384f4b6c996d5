"""Fixed-size KV blocks with reference counts and hash-keyed prefix reuse.

A full block is identified by the hash of its tokens chained with the hash of the block before it, so
two sequences that start with the same tokens (requests sharing a system prompt, or a GRPO group's
prompt across calls) point at the same physical blocks. The block of a sequence's last token is never
taken from the cache, so a sequence has at least one query to produce its next-token logits. The
exception are forks: sequences with the same tokens as one prefilled in the same step (the n samples of
a prompt) share all its full blocks and get a copy of its partial last block and its logits, so the
prompt is computed once. Freed blocks keep their hash until reused, so a later request can still hit them.
"""

from __future__ import annotations

from collections import deque

from m2flow.rollout.sequence import Sequence


def block_hash(tokens: list[int], prefix_hash: int) -> int:
    return hash((prefix_hash, tuple(tokens)))


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.id, self.ref_count, self.hash, self.token_ids = block_id, 0, -1, []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def reset_prefix_cache(self) -> None:
        """Forget every block's contents (after a weight update or after the KV memory was freed)."""
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash, block.token_ids = -1, []

    def _take(self) -> Block:
        block = self.blocks[self.free_ids.popleft()]
        if block.hash != -1 and self.hash_to_block.get(block.hash) == block.id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        return block

    def _register(self, block: Block, tokens: list[int], h: int) -> None:
        if self.prefix_caching:
            block.hash, block.token_ids = h, list(tokens)
            self.hash_to_block[h] = block.id

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= seq.num_blocks(self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks that hold a prefix of `seq` (never the block of its last token)."""
        if not self.prefix_caching:
            return []
        bs, h, hits = self.block_size, -1, []
        for i in range((len(seq) - 1) // bs):
            tokens = seq.block_tokens(i, bs)
            h = block_hash(tokens, h)
            block_id = self.hash_to_block.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, cached: list[int] | None = None) -> None:
        """Block table for all of `seq`'s tokens, reusing cached full blocks of its prefix (`cached`, if the
        caller has just looked them up with `cached_prefix`). Full blocks are registered for reuse at once:
        sequences in the same prefill step read them after this one writes."""
        assert not seq.block_table
        bs = self.block_size
        for block_id in self.cached_prefix(seq) if cached is None else cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:  # a freed block still holding this prefix: take it back
                self.free_ids.remove(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = len(seq.block_table) * bs
        h = self.blocks[seq.block_table[-1]].hash if seq.block_table else -1
        for i in range(len(seq.block_table), seq.num_blocks(bs)):
            block = self._take()
            tokens = seq.block_tokens(i, bs)
            if len(tokens) == bs and (i == 0 or h != -1):
                h = block_hash(tokens, h)
                self._register(block, tokens, h)
            else:
                h = -1
            seq.block_table.append(block.id)

    def fork_blocks_needed(self, seq: Sequence) -> int:
        """Blocks `fork` takes: one for a partial last block, none if the tokens end on a block boundary."""
        return 1 if len(seq) % self.block_size else 0

    def fork(self, seq: Sequence, source: Sequence) -> None:
        """Block table of `seq`, whose tokens equal those of `source` (allocated in the same prefill step):
        `source`'s full blocks are shared; a partial last block gets a block of its own, which the model
        runner fills with a copy of `source`'s once that is written (the next tokens of the two differ)."""
        assert not seq.block_table and seq.token_ids == source.token_ids
        full = len(seq) // self.block_size
        for block_id in source.block_table[:full]:
            self.blocks[block_id].ref_count += 1
            seq.block_table.append(block_id)
        if self.fork_blocks_needed(seq):
            seq.block_table.append(self._take().id)
        seq.num_cached_tokens = seq.num_computed_tokens = source.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(block_id)
        seq.block_table, seq.num_cached_tokens, seq.num_computed_tokens = [], 0, 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether the slot for `seq`'s newest token exists or a free block can hold it."""
        return len(seq.block_table) >= seq.num_blocks(self.block_size) or self.num_free >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Makes room for `seq`'s newest token (called once per decode step, before the forward)."""
        if len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take().id)

    def on_block_filled(self, seq: Sequence) -> None:
        """Registers the just-completed last block of `seq` for prefix reuse (its KV is now written)."""
        bs = self.block_size
        i = len(seq) // bs - 1
        if len(seq) % bs == 0 and i >= 0 and self.prefix_caching:
            prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
            if i > 0 and prev == -1:
                return  # an earlier block was never registered (cache reset since): no valid chain
            tokens = seq.block_tokens(i, bs)
            self._register(self.blocks[seq.block_table[i]], tokens, block_hash(tokens, prev))
