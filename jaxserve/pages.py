"""Host-side KV page allocator: a free list with reference counts, per page group.

Knows nothing about requests; the scheduler decides who owns which pages. With data
parallelism each dp group owns one contiguous range of page ids (its devices hold them).
The prefix cache marks the pages it holds (`set_cached`), so the allocator can keep, in O(1)
per reference change, the count of cached pages no request holds (what eviction can free).
"""

from __future__ import annotations


class OutOfPagesError(RuntimeError):
    """Asked for more pages than are free."""


class PageAllocator:
    """Hands out page ids in [0, num_pages); a page is free again when its ref count hits 0.

    `num_groups` splits the ids into equal contiguous ranges: group g owns
    [g * pages_per_group, (g + 1) * pages_per_group) and `alloc(n, g)` stays inside it.
    """

    def __init__(self, num_pages: int, num_groups: int = 1):
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages} must be >= 1")
        if num_groups < 1 or num_pages % num_groups:
            raise ValueError(f"num_pages={num_pages} does not split into {num_groups} groups")
        self.num_pages = num_pages
        self.pages_per_group = num_pages // num_groups
        # Pop from the end: low page ids first, which keeps tests readable.
        n = self.pages_per_group
        self._free_lists = [list(range((g + 1) * n - 1, g * n - 1, -1)) for g in range(num_groups)]
        self._refs = [0] * num_pages
        self._cached = [False] * num_pages  # held by the prefix cache
        self._cache_only = [0] * num_groups  # cached pages with no other holder, per group

    @property
    def _free(self) -> list[int]:
        """Every free page id (all groups), for checks."""
        return [p for free in self._free_lists for p in free]

    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self._free_lists)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def num_free_in(self, group: int) -> int:
        return len(self._free_lists[group])

    def group_of(self, page: int) -> int:
        return page // self.pages_per_group

    def alloc(self, n: int, group: int = 0) -> list[int]:
        free = self._free_lists[group]
        if n > len(free):
            raise OutOfPagesError(f"asked for {n} pages, {len(free)} free")
        pages = [free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        """Add a reference (a second owner, e.g. the prefix cache)."""
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} is free; cannot retain it")
            if self._cached[p] and self._refs[p] == 1:
                self._cache_only[self.group_of(p)] -= 1
            self._refs[p] += 1

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} freed twice")
            if self._cached[p] and self._refs[p] == 1:
                raise ValueError(f"page {p}: the cache must unmark it (set_cached) first")
            self._refs[p] -= 1
            if self._cached[p] and self._refs[p] == 1:
                self._cache_only[self.group_of(p)] += 1  # only the cache holds it now
            if self._refs[p] == 0:
                self._free_lists[self.group_of(p)].append(p)

    def set_cached(self, page: int, cached: bool) -> None:
        """The prefix cache took (or dropped) one of its references to `page`."""
        if self._cached[page] != cached and self._refs[page] == 1:
            self._cache_only[self.group_of(page)] += 1 if cached else -1
        self._cached[page] = cached

    def num_cache_only(self, group: int | None = None) -> int:
        """Pages marked cached that nothing else holds (of one group, or all)."""
        return sum(self._cache_only) if group is None else self._cache_only[group]


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)
