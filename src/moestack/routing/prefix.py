"""Prompt-prefix hashing and an approximate, router-side index of which replica holds which prefix.

The prompt is cut into blocks of ``block_chars`` characters; block *i*'s hash covers blocks 0..i
(chained), so a matching hash at position *i* means the whole prefix up to *i* matches. The index
remembers, per block hash, the replicas a request with that prefix was sent to (bounded LRU): a
replica that prefilled the prefix recently probably still has it in its KV prefix cache.

The text hashed is the prompt behind its tenant's cache salt (:func:`salted`): vLLM's prefix cache
shares blocks only within one ``cache_salt``, so equal prompts of two tenants share no cache and
are not routed together either (which would also let one tenant's traffic place another's).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

SALT_SEPARATOR = "\x1d"


def salted(text: str, salt: str | None) -> str:
    """The routing text of a prompt: ``salt`` (the tenant's cache salt) ahead of it, so every
    block hash of it differs between tenants and matches within one; no salt, the prompt."""
    return f"{salt}{SALT_SEPARATOR}{text}" if salt else text


def block_hashes(text: str, block_chars: int) -> tuple[int, ...]:
    """Chained hashes of the whole blocks of ``text`` (a shorter text counts as one block)."""
    n_blocks = max(1, len(text) // block_chars) if text else 0
    out, prev = [], b""
    for i in range(n_blocks):
        digest = hashlib.blake2b(prev + text[i * block_chars:(i + 1) * block_chars].encode(),
                                 digest_size=8).digest()
        out.append(int.from_bytes(digest, "big"))
        prev = digest
    return tuple(out)


class PrefixIndex:
    """Block hash -> replicas that were sent that prefix; least recently used blocks evicted."""

    def __init__(self, capacity_blocks: int):
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def insert(self, blocks: Sequence[int], replica_id: str) -> int:
        """Record that ``replica_id`` was sent ``blocks``; returns how many leading blocks it
        held already (what :meth:`match` would have said for it alone)."""
        held, leading = 0, True
        for b in blocks:
            holders = self._blocks.get(b)
            if holders is None:
                leading = False
                self._blocks[b] = {replica_id}
            else:
                leading = leading and replica_id in holders
                held += leading
                holders.add(replica_id)
                self._blocks.move_to_end(b)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
        return held

    def match(self, blocks: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """Per candidate: how many leading blocks of ``blocks`` it holds."""
        alive = set(candidates)
        counts = dict.fromkeys(alive, 0)
        for b in blocks:
            alive &= self._blocks.get(b, set())
            if not alive:
                break
            for r in alive:
                counts[r] += 1
        return counts

    def forget(self, replica_id: str) -> None:
        """Drop a replica that went away (its cache went with it)."""
        for b in [b for b, holders in self._blocks.items() if replica_id in holders]:
            holders = self._blocks[b]
            holders.discard(replica_id)
            if not holders:
                del self._blocks[b]
