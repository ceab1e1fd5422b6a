"""The op registry: every kernel op of the package, declared once (schema, fake, dispatch).

Importing this package registers ``torch.ops.qlora_kernels.*``.
"""

from . import nf4, nf4_grouped, swiglu  # noqa: F401  (register the NF4 and SwiGLU ops)
from ._dispatch import BACKENDS, ENV_VAR, forced_backend, status
from .adamw import adamw8bit_step_, adamw_step_  # noqa: F401  (registers the AdamW ops)

__all__ = ["BACKENDS", "ENV_VAR", "forced_backend", "status"]
