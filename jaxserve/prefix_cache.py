"""Prefix cache: full KV pages keyed by the tokens they hold and every token before them.

A chain of page keys works like a radix tree cut at page boundaries (vLLM's block hashes):
`match` walks it from the first page, `insert` adds a finished request's full pages, and
`evict` frees least-recently-used pages that no running request holds. With dp groups
(`PageAllocator.num_groups`) each group has its own chains: a match only returns pages of
the group it asks for, since a request's pages must live where its slot is.
"""

from __future__ import annotations

import array
import collections
import hashlib

from jaxserve.pages import PageAllocator

# (digest of every token before the page, the page's tokens): exact on the page's tokens and
# sha256 over the prefix, so no crafted prompt can collide with another user's cached KV
# (vLLM moved from Python's hash() to sha256 after CVE-2025-25183).
PageKey = tuple[bytes, tuple[int, ...]]


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self._pages: collections.OrderedDict[PageKey, int] = collections.OrderedDict()  # LRU
        # Counted by the scheduler at admission (not per refused try), for /metrics:
        self.hits = 0  # tokens served from the cache
        self.queries = 0  # tokens of the requests admitted while the cache is on

    @property
    def num_pages(self) -> int:
        return len(self._pages)

    def _keys(self, tokens: list[int], num_pages: int, group: int = 0, salt: bytes = b""):
        # The chain's root names the dp group and the salt (a LoRA adapter's load: the same
        # tokens give other K/V under another adapter); group 0 without salt: b"", as before.
        parent = (b"" if group == 0 else b"dp%d" % group) + (b"|" + salt if salt else b"")
        ps = self.page_size
        for i in range(num_pages):
            page = tuple(tokens[i * ps : (i + 1) * ps])
            yield (parent, page)
            parent = hashlib.sha256(parent + array.array("q", page).tobytes()).digest()

    def match(
        self, tokens: list[int], max_pages: int, group: int = 0, salt: bytes = b""
    ) -> list[int]:
        """Pages holding the longest cached prefix of `tokens` (at most `max_pages`)."""
        pages = []
        num_pages = min(max_pages, len(tokens) // self.page_size)
        for key in self._keys(tokens, num_pages, group, salt):
            page = self._pages.get(key)
            if page is None:
                break
            self._pages.move_to_end(key)
            pages.append(page)
        return pages

    def peek(self, tokens: list[int], max_pages: int, group: int = 0, salt: bytes = b"") -> int:
        """Length in pages of the cached prefix, without touching LRU order or stats."""
        n = 0
        num_pages = min(max_pages, len(tokens) // self.page_size)
        for key in self._keys(tokens, num_pages, group, salt):
            if key not in self._pages:
                break
            n += 1
        return n

    def insert(self, tokens: list[int], pages: list[int], salt: bytes = b"") -> None:
        """Cache the full pages among `pages`, whose K/V hold `tokens` (same order)."""
        group = self.allocator.group_of(pages[0]) if pages else 0
        keys = self._keys(tokens, len(tokens) // self.page_size, group, salt)
        for key, page in zip(keys, pages, strict=False):
            if key in self._pages:
                self._pages.move_to_end(key)
                continue
            self.allocator.retain([page])
            self.allocator.set_cached(page, True)
            self._pages[key] = page

    def num_evictable(self, group: int | None = None) -> int:
        """Cached pages only the cache holds (of one dp group, or all); O(1), the allocator
        keeps the count."""
        return self.allocator.num_cache_only(group)

    def evict(self, num_pages: int, group: int | None = None) -> int:
        """Free up to `num_pages` least-recently-used pages that only the cache holds."""
        victims = []
        for key, page in self._pages.items() if num_pages > 0 else ():
            if group is not None and self.allocator.group_of(page) != group:
                continue
            if self.allocator.ref_count(page) == 1:
                victims.append(key)
                if len(victims) >= num_pages:
                    break
        for key in victims:
            self._drop(self._pages.pop(key))
        return len(victims)

    def clear(self) -> None:
        """Drop every cached page (pages still used by requests stay theirs)."""
        for page in self._pages.values():
            self._drop(page)
        self._pages.clear()

    def _drop(self, page: int) -> None:
        self.allocator.set_cached(page, False)
        self.allocator.free([page])
