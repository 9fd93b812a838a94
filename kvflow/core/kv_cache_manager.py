"""Per-request block tables on top of the BlockPool, with automatic prefix caching."""
from __future__ import annotations

from dataclasses import dataclass

from kvflow.core.block_hash import extend_block_hashes
from kvflow.core.block_pool import BlockPool, KVCacheBlock
from kvflow.request import Request


_NO_BLOCKS: list = []  # shared, never mutated


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    queries: int = 0   # prompt tokens looked up
    hits: int = 0      # of those, served from cache
    resets: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _update_hashes(self, request: Request) -> None:
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of `request`, as (blocks, number of tokens they hold).

        At least one token is always left to compute: the model must run on the last token to
        produce logits. Requests that want prompt logprobs bypass the cache (their logits are
        needed for every prompt position)."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        self.stats.queries += request.num_tokens
        self.stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] = (),
                       cache: bool = True) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens of `request` after its computed ones
        (plus `new_computed_blocks`, prefix hits being adopted now). Returns the newly allocated
        blocks, or None (nothing changed) when the pool cannot supply them. cache=False: do not
        register the blocks in the prefix cache yet (their KV is loaded from elsewhere and may
        never arrive; a later allocation registers them)."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        if blocks is not None and not new_computed_blocks:
            # Fast path (every decode step but one per block): the tokens fit the last block.
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(blocks) * self.block_size:
                if self.enable_caching and total // self.block_size > self.num_cached_blocks.get(rid, 0):
                    self._cache_full_blocks(request, blocks, total)
                return _NO_BLOCKS
        if blocks is None:
            blocks = self.req_to_blocks[rid] = []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need = cdiv(total, self.block_size) - len(blocks) - len(new_computed_blocks)
        # Hits on free blocks leave the free queue when adopted, shrinking what is available.
        revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - revived:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(need, 0))
        blocks.extend(new_blocks)
        if self.enable_caching and cache:
            self._cache_full_blocks(request, blocks, total)
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Register blocks that will be full of known tokens once this step's KV is written.
        (Layers write all new KV before attending, so a later request in the same step may
        already hit them.)"""
        start = self.num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens, request.num_tokens) // self.block_size
        if end <= start:
            return
        self._update_hashes(request)
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = end

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        ok = self.pool.reset_prefix_cache()
        if ok:
            self.stats.resets += 1
        return ok
