"""Plain-PyTorch reference implementations: the readable oracle every kernel is tested against.

Written for reading, in fp32, with no tricks; they run on any device, so the whole package works
on a CPU without the compiled extension.
"""
