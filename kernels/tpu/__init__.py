"""Pallas attention kernels lowered through Mosaic for TPUs.

Both ops also run on CPU with `interpret=True` (the TPU simulator); contract in `kernels.reference`.
"""

from kernels.tpu.decode import paged_attention
from kernels.tpu.extend import extend_attention

__all__ = ["extend_attention", "paged_attention"]
