"""``python -m qlora_kernels ...`` is the ``qlora-kernels`` command line."""

from .cli import main

raise SystemExit(main())
