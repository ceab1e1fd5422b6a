"""The dependency ranges are the ones tested (docs/COMPATIBILITY.md): pyproject's lower bounds are the floors of
qlora_kernels._compat.TESTED, and outside the table's
ranges the import warns once per package, naming the package, its version and the tested range."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from qlora_kernels import _compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_versions(monkeypatch):
    """Installed versions as the test says (None: not installed), and a process that has warned about nothing."""
    versions: dict[str, str | None] = {}
    monkeypatch.setattr(_compat, "_installed_version", lambda package: versions.get(package))
    monkeypatch.setattr(_compat, "_warned", set())
    return versions


def _caught(calls: int = 2) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            _compat.warn_untested_versions()
    assert all(issubclass(w.category, _compat.UntestedVersionWarning) for w in caught)
    assert issubclass(_compat.UntestedVersionWarning, UserWarning)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("package", sorted(_compat.TESTED))
@pytest.mark.parametrize("side", ["below", "above"])
def test_outside_the_range_warns_once_naming_package_version_and_range(fake_versions, package, side):
    floor, newest = _compat.TESTED[package]
    release = [int(p) for p in newest.split(".")]
    version = "0.0.1" if side == "below" else ".".join(map(str, [release[0], release[1] + 1, 0]))
    fake_versions[package] = version
    messages = _caught(calls=3)
    assert len(messages) == 1, messages
    assert f"{package} {version}" in messages[0]
    assert f"tested range: {package} {floor} to {newest}" in messages[0]
    assert ("older than" if side == "below" else "newer than") in messages[0]


def test_inside_the_range_and_not_installed_say_nothing(fake_versions):
    for package, (floor, newest) in _compat.TESTED.items():
        for version in (floor, newest, newest + "+cu130", newest + ".post1"):
            assert _compat.untested_reason(package, version) is None, (package, version)
        fake_versions[package] = newest + "+local"
    assert _caught() == []
    fake_versions.clear()  # nothing installed: nothing to say
    assert _caught() == []


VERSION_CASES = [
    ("torch", "2.14.1+cu130", False),  # a local build tag is its release
    ("torch", "2.14.1.dev20261201", True),  # a nightly before the floor (2.14.1 is both floor and newest)
    ("transformers", "5.25.0.dev20261201", False),  # a nightly of the newest tested: its release numbers
    ("torch", "2.15.0.dev20261201+cu130", True),
    ("torch", "2.14.0+cpu", True),
    ("transformers", "5.0.0.dev0", True),  # below the floor
    ("transformers", "5.23.0.dev0", True),  # a pre-release of the floor comes before it
    ("transformers", "5.23.0rc1", True),
    ("transformers", "5.23.1", False),
    ("transformers", "5.22.2", True),
    ("transformers", "5.25.0.dev0", False),
    ("transformers", "5.26.0.dev0", True),
    ("transformers", "6.0", True),
    ("peft", "0.20", False),
    ("peft", "0.19.1", True),
    ("safetensors", "0.8.0.post1", False),
    ("not-in-the-table", "0.0.1", False),
]


@pytest.mark.parametrize("parser", ["packaging", "fallback"])
@pytest.mark.parametrize(("package", "version", "outside"), VERSION_CASES)
def test_version_strings(monkeypatch, parser, package, version, outside):
    if parser == "packaging":
        pytest.importorskip("packaging.version")
    else:  # as without packaging installed (it comes with transformers, not with torch)
        monkeypatch.setitem(sys.modules, "packaging.version", None)
    assert (_compat.untested_reason(package, version) is not None) == outside


def test_the_fallback_parser():
    assert _compat._parse_fallback("5.0.0.dev0") == ((5, 0, 0), 0)
    assert _compat._parse_fallback("2.14.1+cu130") == ((2, 14, 1), 1)
    assert _compat._parse_fallback("0.8.0.post1") == ((0, 8, 0), 2)
    assert _compat._parse_fallback("5.23.0rc1") == ((5, 23, 0), 0)
    with pytest.raises(ValueError):
        _compat._parse_fallback("not a version")


def _pyproject_floors() -> dict[str, list[str]]:
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    floors: dict[str, list[str]] = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*(.*)$", req)
        name, spec = m.group(1).lower(), m.group(2)
        lower = re.search(r">=\s*([^,;\s]+)", spec)
        if lower:
            floors.setdefault(name, []).append(lower.group(1))
    return floors


def test_pyproject_floors_are_the_tested_floors():
    floors = _pyproject_floors()
    for package, (floor, _) in _compat.TESTED.items():
        assert package in floors, f"pyproject.toml has no lower bound for {package} (tested from {floor})"
        for bound in floors[package]:
            assert bound == floor, f"pyproject.toml says {package}>={bound}; the suite was run on {floor}"


def _run(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-W", "always::UserWarning", "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_the_import_warns_once_about_an_untested_install(tmp_path):
    """End to end: a distribution that says it is trl 1.0.0 (found first on the path; trl is not imported) makes
    ``import qlora_kernels`` warn once, however often the check runs."""
    dist = tmp_path / "trl-1.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: trl\nVersion: 1.0.0\n")
    code = ("import importlib.metadata as m; assert m.version('trl') == '1.0.0'\n"
            "import qlora_kernels, qlora_kernels.hf\n"
            "from qlora_kernels import _compat\n"
            "assert _compat.warn_untested_versions() == []\n")
    path = os.pathsep.join([str(tmp_path), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p])
    proc = _run(code, {"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    # Only trl's: the registry may have served a release of another package newer than the table (the next
    # test covers those), and that warning is right there too.
    lines = [line for line in proc.stderr.splitlines() if "UntestedVersionWarning" in line and " trl " in line]
    assert len(lines) == 1, proc.stderr
    floor, newest = _compat.TESTED["trl"]
    assert "trl 1.0.0" in lines[0] and f"tested range: trl {floor} to {newest}" in lines[0]


def test_the_import_warns_exactly_about_the_untested_packages_installed_here():
    """Silent on the tested versions; on a machine whose registry served a newer release, one warning for it and
    nothing for the rest (the suite still runs: a newer release is untested, not refused)."""
    expected = set()
    for package in _compat.TESTED:
        version = _compat._installed_version(package)
        if version is not None and _compat.untested_reason(package, version) is not None:
            expected.add(package)
    proc = subprocess.run([sys.executable, "-W", "always::UserWarning", "-c", "import qlora_kernels, qlora_kernels.hf"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warned = {m.group(1) for m in re.finditer(r"UntestedVersionWarning: qlora_kernels was not tested with (\S+) ",
                                              proc.stderr)}
    assert warned == expected, proc.stderr
