"""The product runs Ray Train V2 on its own (not through tests/conftest.py), .[dev] declares what the
suite imports, and the lock file (requirements/constraints.txt) pins every dependency inside
pyproject.toml's ranges."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipelines.versions import NOT_INSTALLED, TRACKED, mismatched_versions, resolved_versions

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "constraints.txt"
LOCK_SCRIPT = REPO / "requirements" / "lock.sh"


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def direct_requirements() -> list[Requirement]:
    """The project's dependencies and its dev extra (what CI installs)."""
    return [Requirement(r) for r in project()["dependencies"] + project()["optional-dependencies"]["dev"]]


def lock_pins(text: str) -> dict[str, str]:
    """``{canonical name: version}`` of a lock file's ``name==version`` lines; anything else that is not
    a comment (a range, a URL, an option, a name twice) is an error, since the file must pin exactly."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} pinned twice"
        pins[name] = match[2]
    return pins


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return lock_pins(LOCK.read_text())

PROBE = """
import pipelines.train_loop
from pipelines import cli
from ray.train.v2._internal.constants import is_v2_enabled
from pipelines.train_loop import TorchTrainer
print(is_v2_enabled(), TorchTrainer.__module__)
try:
    cli.init_ray(None) if {init} else None
except ValueError as exc:
    print("refused:", exc)
"""


def _probe(env_value, init=False):
    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_V2_ENABLED"}
    if env_value is not None:
        env["RAY_TRAIN_V2_ENABLED"] = env_value
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(init=init)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_product_selects_train_v2_without_the_test_conftest():
    out = _probe(None)
    enabled, trainer_module = out.split()[:2]
    assert enabled == "True"
    assert trainer_module.startswith("ray.train.v2."), out


def test_a_disabled_train_v2_is_refused_before_ray_starts():
    out = _probe("0", init=True)
    assert "refused: these pipelines need Ray Train V2" in out, out


def test_pinned_ray_has_train_v2_by_default_and_dev_declares_the_suites_imports():
    import ray
    from packaging.version import Version

    ray_req = next(Requirement(d) for d in project()["dependencies"] if d.startswith("ray["))
    assert ">=2.60" in str(ray_req.specifier)
    assert Version(ray.__version__) >= Version("2.60")
    dev = {Requirement(d).name for d in project()["optional-dependencies"]["dev"]}
    assert {"pytest", "optuna", "boto3", "transformers", "jsonschema", "scikit-learn",
            "moto", "mkdocs", "mkdocs-material"} <= dev
    assert "server" in next(Requirement(d) for d in project()["optional-dependencies"]["dev"]
                            if d.startswith("moto")).extras


def test_the_lock_pins_every_direct_dependency_inside_pyprojects_range(pins):
    outside = {}
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in {LOCK.name}: run requirements/lock.sh"
        if not req.specifier.contains(pins[name], prereleases=True):
            outside[str(req)] = pins[name]
    assert outside == {}, f"pins outside pyproject.toml's ranges (run requirements/lock.sh): {outside}"


def test_the_lock_pins_the_build_backend_inside_its_range(pins):
    """.ci/run builds the project with --build-constraint on the lock: setuptools is in it only because
    torch needs it, so a lock without it would leave the build backend free without a word."""
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    for req in map(Requirement, build_system["requires"]):
        assert req.specifier.contains(pins.get(canonicalize_name(req.name), "0")), f"{req}: not pinned in range"


def test_the_lock_holds_what_lock_sh_holds(pins):
    """torch and torchvision are the releases CI's pip takes from local disk, ray the cluster's client's:
    the pins requirements/lock.sh holds must be the lock's (an edit of HELD without a re-run fails)."""
    held = re.search(r"^HELD=\((.*)\)$", LOCK_SCRIPT.read_text(), re.M)[1].split()
    assert {"torch", "torchvision", "ray"} <= {Requirement(h).name for h in held}
    for requirement in map(Requirement, held):
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), requirement
    assert (pins["torch"], pins["torchvision"], pins["ray"]) == ("2.14.1", "0.29.1", "2.60.0")


def test_lock_pins_rejects_a_loose_or_doubled_line():
    assert lock_pins("# header\nRay==2.60.0\nmkdocs_material==9.8.2  # via\n") == {
        "ray": "2.60.0", "mkdocs-material": "9.8.2"}
    for bad in ("ray>=2.60\n", "ray==2.60.0\nray==2.60.1\n", "-e .\n"):
        with pytest.raises(AssertionError):
            lock_pins(bad)


def test_resolved_versions_are_the_installed_distributions():
    versions = resolved_versions()
    assert list(versions) == ["python", *TRACKED]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    for name in TRACKED:
        assert versions[name] == metadata.version(name)
    assert resolved_versions(["no-such-distribution-xyz"])["no-such-distribution-xyz"] == NOT_INSTALLED


def test_mismatched_versions_names_only_what_differs():
    here = resolved_versions()
    assert mismatched_versions(here) == {}
    drifted = {**here, "torch": here["torch"] + "+cpu", "python": "3.10.0", "no-such-distribution-xyz": "1.0"}
    assert mismatched_versions(drifted) == {
        "torch": (here["torch"] + "+cpu", here["torch"]),
        "python": ("3.10.0", here["python"]),
        "no-such-distribution-xyz": ("1.0", NOT_INSTALLED),
    }


@pytest.mark.skipif(not os.environ.get("EMOTION_RAY_INSTALLED_FROM_LOCK"),
                    reason="set by .ci/run, which installs with -c requirements/constraints.txt")
def test_ci_runs_the_locked_versions(pins):
    assert mismatched_versions({name: pins[name] for name in TRACKED}) == {}
