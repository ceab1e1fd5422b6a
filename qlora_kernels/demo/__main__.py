"""``python -m qlora_kernels.demo [--steps N ...]`` is ``qlora-kernels demo``."""

import sys

from ..cli import main

raise SystemExit(main(["demo", *sys.argv[1:]]))
