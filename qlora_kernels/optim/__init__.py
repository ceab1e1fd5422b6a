"""Optimizers: ``PagedAdamW`` (fused multi-tensor AdamW with paged fp32 or 8-bit states)."""

from .paged_adamw import PagedAdamW

__all__ = ["PagedAdamW"]
