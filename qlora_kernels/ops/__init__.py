"""The op registry: every kernel op of the package, declared once (schema, fake, dispatch).

Importing this package registers ``torch.ops.qlora_kernels.*``.
"""

from . import nf4  # noqa: F401  (registers the NF4 ops)
from ._dispatch import BACKENDS, ENV_VAR, forced_backend, status

__all__ = ["BACKENDS", "ENV_VAR", "forced_backend", "status"]
