"""Host-side KV page allocator: a free list with reference counts.

Knows nothing about requests; the scheduler decides who owns which pages.
"""

from __future__ import annotations


class OutOfPagesError(RuntimeError):
    """Asked for more pages than are free."""


class PageAllocator:
    """Hands out page ids in [0, num_pages); a page is free again when its ref count hits 0."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages} must be >= 1")
        self.num_pages = num_pages
        # Pop from the end: low page ids first, which keeps tests readable.
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        """Add a reference (a second owner, e.g. the prefix cache)."""
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} is free; cannot retain it")
            self._refs[p] += 1

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} freed twice")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)
