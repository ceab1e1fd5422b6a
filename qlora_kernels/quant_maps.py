"""The fixed code tables of the formats we share with bitsandbytes.

* ``NF4_CODE``: the 16 NormalFloat4 values (QLoRA paper), index = 4-bit code, sorted ascending.
* ``dynamic_map()``: bitsandbytes' signed 8-bit "dynamic" map used to double-quantize the
  per-block absmax constants (256 sorted values, -0.99296875 ... 1.0, a single zero at 127).

Both tables are exact fp32 values; tests check them against bitsandbytes itself.
"""

from __future__ import annotations

import functools

import torch

NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: The code of 0.0: what pads an odd tail and what an all-zero block quantizes to.
NF4_ZERO_CODE = 7

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Block size of the second (double) quantization of absmax, fixed by bitsandbytes.
NESTED_BLOCKSIZE = 256


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table as an fp32 tensor of 16 values on ``device``."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def _dynamic_map_values(signed: bool) -> tuple[float, ...]:
    # bitsandbytes' dynamic type with 7 exponent bits over 8 bits: for exponent i = 0..6 the decade
    # 10^(i-6) holds the midpoints of an even split of [0.1, 1] into 2^i parts (signed; mirrored
    # for the negative side) or 2^(i+1) parts (unsigned: the sign bit goes to the fraction); then
    # 0 and 1.0. All in fp32 arithmetic, as bitsandbytes computes it (the exact bits depend on it).
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        parts = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (i - 6) * mids).tolist()
        if signed:
            values += (-(10.0 ** (i - 6)) * mids).tolist()
    if len(values) != 256:
        raise AssertionError(f"a dynamic map has 256 values; built {len(values)}")
    return tuple(sorted(values))


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map: fp32 ``[256]``, sorted, -0.99296875 ... 1.0
    (``create_dynamic_map(signed=True)``): double quantization of absmax, 8-bit AdamW's first moment."""
    return torch.tensor(_dynamic_map_values(True), dtype=torch.float32, device=device)


def unsigned_dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' unsigned 8-bit dynamic map (``create_dynamic_map(signed=False)``): fp32 ``[256]``,
    sorted, 0.0 ... 1.0; the code table of 8-bit AdamW's second moment."""
    return torch.tensor(_dynamic_map_values(False), dtype=torch.float32, device=device)
