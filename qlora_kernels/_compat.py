"""The dependency versions the test suite has passed on, and a warning when an installed one is outside them.

``TESTED`` maps a package to (floor, newest tested): the floor is the lowest release the whole suite passed
on (pyproject.toml's lower bound says the same; tests/test_dependency_range.py checks they agree), the newest
the latest release the suite passed on. How and when they were measured: docs/COMPATIBILITY.md.

On import (``qlora_kernels.hf`` imports this module, and ``import qlora_kernels`` imports that) every
installed package of the table is looked up with :mod:`importlib.metadata`, nothing is imported, and
one :class:`UntestedVersionWarning` per package and process names a version below the floor or above the
newest tested. The upper check looks at the release numbers only (``2.14.1+cu130`` is 2.14.1, and so is
``2.14.1.dev0`` when 2.14.1 is the newest). Upper bounds are not pinned: a newer release installs and runs;
it only was not tested.
"""

from __future__ import annotations

import re
import warnings
from importlib import metadata

TESTED_ON = "2026-12-07"

# package: (floor, newest tested). Keep the floors equal to pyproject.toml's lower bounds.
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.14.1", "2.14.1"),
    "transformers": ("5.23.0", "5.25.0"),
    "peft": ("0.20.0", "0.22.0"),
    "trl": ("1.16.0", "1.16.0"),
    "safetensors": ("0.8.0", "0.8.0"),
}


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the versions the test suite has passed on."""


_warned: set[str] = set()

_VERSION = re.compile(r"^\s*v?(\d+(?:\.\d+)*)(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview|dev|post)[-_.]?(\d*))?", re.I)


def _parse_fallback(version: str) -> tuple[tuple[int, ...], int]:
    """(release, stage) without ``packaging``: stage 0 for a pre/dev release, 1 for a final one, 2 for a
    post release; a local tag (``+cu130``) and anything after the first suffix are ignored."""
    m = _VERSION.match(version)
    if not m:
        raise ValueError(f"cannot read the version {version!r}")
    release = tuple(int(p) for p in m.group(1).split("."))
    suffix = (m.group(2) or "").lower()
    return release, (2 if suffix == "post" else 0 if suffix else 1)


def _pad(release: tuple[int, ...], n: int = 3) -> tuple[int, ...]:
    return release + (0,) * max(0, n - len(release))


def _below(version: str, floor: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        Version = None
    if Version is not None:
        try:
            return Version(version) < Version(floor)
        except InvalidVersion:
            pass
    (r, s), (fr, fs) = _parse_fallback(version), _parse_fallback(floor)
    n = max(len(r), len(fr))
    return (_pad(r, n), s) < (_pad(fr, n), fs)


def _release_above(version: str, newest: str) -> bool:
    r, nr = _parse_fallback(version)[0], _parse_fallback(newest)[0]
    n = max(len(r), len(nr))
    return _pad(r, n) > _pad(nr, n)


def untested_reason(package: str, version: str) -> str | None:
    """Why ``version`` of ``package`` is outside the tested range, or None when it is inside (or not in the table)."""
    if package not in TESTED:
        return None
    floor, newest = TESTED[package]
    if _below(version, floor):
        where = f"older than the oldest tested, {floor}"
    elif _release_above(version, newest):
        where = f"newer than the newest tested, {newest}"
    else:
        return None
    return (f"qlora_kernels was not tested with {package} {version} ({where}; tested range: {package} {floor} to "
            f"{newest}, see docs/COMPATIBILITY.md). It may work; if it does not, install a version in that range.")


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def warn_untested_versions() -> list[str]:
    """Warn (:class:`UntestedVersionWarning`, once per package and process) for every installed package of
    ``TESTED`` outside its tested range; returns the messages of the warnings issued by this call."""
    issued = []
    for package in TESTED:
        if package in _warned:
            continue
        version = _installed_version(package)
        if version is None:
            continue
        try:
            reason = untested_reason(package, version)
        except ValueError:  # a version string neither parser reads: nothing to say about it
            continue
        if reason is not None:
            _warned.add(package)
            warnings.warn(reason, UntestedVersionWarning, stacklevel=2)
            issued.append(reason)
    return issued


warn_untested_versions()
