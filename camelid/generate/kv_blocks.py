"""Which blocks of a paged KV cache (model/kv_cache.py's PagedKVCache) belong to which sequence, and which
prefixes the cache already holds.

A sequence is admitted with a reservation: the blocks it may ever need (its prompt and its longest reply)
beyond those of a cached prefix. Admission fails, and the caller waits, while the pool cannot promise them,
so a running sequence never finds the pool empty and is never cut short or corrupted by another.

A full block is keyed by its tokens and by the key of the block before it (and the adapter that computed it),
so a key stands for the whole prefix up to the block's end. A finished sequence's keyed blocks stay in the
cache, idle, until their space is needed; a new sequence whose tokens begin with a cached prefix takes those
blocks instead of recomputing them (a system prompt, few-shot examples, the earlier turns of a chat). Idle
blocks are reused least recently used first. The last, partial block of a sequence is never shared, so no
sequence ever writes into a block another one reads.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class Sequence:
    blocks: list[int]  # its block table
    reserved: int  # blocks it may still take from the pool
    adapter: int = 0
    cached: int = 0  # leading tokens whose keys and values came from the cache
    keys: list = field(default_factory=list)  # the key of each of its full blocks, in order, once known


@dataclass
class PoolStats:
    prefix_queries: int = 0  # tokens looked up in the cache at admission
    prefix_hits: int = 0  # of those, tokens found
    evictions: int = 0  # idle cached blocks given to another sequence


class BlockPool:
    def __init__(self, n_blocks: int, block_size: int):
        self.n_blocks, self.block_size = n_blocks, block_size
        self._free = list(range(n_blocks - 1, -1, -1))  # popped from the end: low ids first, pages touched in order
        self._refs = [0] * n_blocks
        self._content: dict[int, tuple] = {}  # a keyed block's (key of the block before, adapter, its tokens)
        self._key: dict[int, int] = {}  # block -> key
        self._by_key: dict[int, int] = {}  # key -> block
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # keyed, held by none; LRU first
        self.reserved = 0  # blocks promised to admitted sequences and not yet taken
        self.stats = PoolStats()

    # ------------------------------------------------------------ what the pool holds

    @property
    def available(self) -> int:
        """Blocks a new sequence could be promised."""
        return len(self._free) + len(self._idle) - self.reserved

    @property
    def used(self) -> int:
        """Blocks held by running sequences."""
        return self.n_blocks - len(self._free) - len(self._idle)

    @property
    def cached(self) -> int:
        """Idle blocks kept for their prefix."""
        return len(self._idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------ sequences

    def admit(self, tokens: list[int], longest: int, adapter: int = 0, reuse: bool = True,
              copies: int = 0) -> list[Sequence] | None:
        """Sequences for `tokens` that may grow to `longest` tokens (the prompt and its reply), the first
        holding the longest cached prefix of whole blocks (`reuse`) short of the last token, whose logits the
        caller still needs; `copies` more share the prompt's full blocks once it is in (see fork). None while
        the pool cannot promise what they need."""
        bs = self.block_size
        found = self._match(tokens, adapter) if reuse else []
        found = found[:(len(tokens) - 1) // bs]
        need = self.blocks_for(longest) - len(found)
        need += copies * (self.blocks_for(longest) - len(tokens) // bs)
        idle_found = sum(1 for b in found if self._refs[b] == 0)
        if reuse:
            self.stats.prefix_queries += len(tokens)
        if need + idle_found > self.available:
            return None
        if reuse:
            self.stats.prefix_hits += len(found) * bs
        for b in found:
            self._hold(b)
        first = Sequence(found, self.blocks_for(longest) - len(found), adapter, len(found) * bs,
                         [self._key[b] for b in found])
        self.reserved += need
        rest = [Sequence([], self.blocks_for(longest) - len(tokens) // bs, adapter) for _ in range(copies)]
        return [first] + rest

    def grow(self, seq: Sequence, length: int) -> list[int]:
        """Blocks enough for `length` tokens (taken from its reservation): its block table."""
        while len(seq.blocks) * self.block_size < length:
            if seq.reserved <= 0:
                raise RuntimeError("a sequence grew past the blocks it reserved")
            seq.blocks.append(self._take())
            seq.reserved -= 1
            self.reserved -= 1
        return seq.blocks

    def fork(self, seq: Sequence, into: Sequence, length: int) -> int | None:
        """`into` (an empty copy admitted with seq) shares seq's full blocks of its first `length` tokens; the
        partial block after them is a new block of into's whose contents the caller copies from the returned
        block of seq (None: there is none)."""
        full = length // self.block_size
        for b in seq.blocks[:full]:
            self._hold(b)
        into.blocks = list(seq.blocks[:full])
        into.keys = list(seq.keys[:full])
        if length % self.block_size == 0:
            return None
        self.grow(into, length)
        return seq.blocks[full]

    def commit(self, seq: Sequence, tokens: list[int]):
        """Key seq's full blocks of `tokens` (the tokens its blocks hold, in order), so later sequences can
        find them. A block whose prefix another block already holds (computed at the same time) stays unkeyed
        and is freed with its sequence."""
        bs = self.block_size
        for i in range(len(seq.keys), min(len(tokens) // bs, len(seq.blocks))):
            before = seq.keys[-1] if seq.keys else 0
            content = (before, seq.adapter, tuple(tokens[i * bs:(i + 1) * bs]))
            key = hash(content)
            block = seq.blocks[i]
            if key not in self._by_key and block not in self._key:
                self._by_key[key], self._key[block], self._content[block] = block, key, content
            elif self._by_key.get(key) != block:
                return  # a twin holds this prefix: the rest of seq's chain cannot be keyed either
            seq.keys.append(key)

    def release(self, seq: Sequence):
        """seq has finished: its keyed blocks become idle cache, the others free. The first blocks become the
        most recently used, so eviction takes a prefix's end before its start, which longer prefixes need."""
        for b in reversed(seq.blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        self.reserved -= seq.reserved
        seq.blocks, seq.reserved = [], 0

    # ------------------------------------------------------------ inside

    def _match(self, tokens: list[int], adapter: int) -> list[int]:
        bs, before, found = self.block_size, 0, []
        for i in range(len(tokens) // bs):
            content = (before, adapter, tuple(tokens[i * bs:(i + 1) * bs]))
            key = hash(content)
            block = self._by_key.get(key)
            if block is None or self._content[block] != content:  # a hash collision is a miss, never a wrong hit
                break
            found.append(block)
            before = key
        return found

    def _hold(self, block: int):
        if self._refs[block] == 0:
            self._idle.pop(block, None)
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # the least recently used idle block: its prefix is forgotten
            block, _ = self._idle.popitem(last=False)
            key = self._key.pop(block)
            del self._by_key[key], self._content[block]
            self.stats.evictions += 1
        self._refs[block] = 1
        return block
