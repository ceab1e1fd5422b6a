"""Triton kernels and their launchers (no module or HF logic here).

Imported lazily by the op registry, so that ``import qlora_kernels`` works without triton.
"""
