"""``python -m qlora_kernels.train CONFIG.yaml [key=value ...]`` is ``qlora-kernels train``."""

import sys

from ..cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
