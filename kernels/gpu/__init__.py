"""Pallas attention kernels lowered through Triton for NVIDIA GPUs.

Both ops also run on CPU with `interpret=True`; the contract is in `kernels.reference`.
"""

from kernels.gpu.decode import paged_attention
from kernels.gpu.extend import extend_attention

__all__ = ["extend_attention", "paged_attention"]
