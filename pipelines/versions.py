"""The versions of the libraries a run's numbers depend on, as installed in this process's environment.

A run is reproducible only with the same torch, torchvision, timm, ray and mlflow (CI and the cluster
install them from requirements/constraints.txt, the lock file). ``resolved_versions`` reads them so the
tracking code can record them with every MLflow run; ``mismatched_versions`` compares them with another
process's (the driver's, or the lock file's pins), so a cluster whose nodes drifted can be told apart.

The versions come from the installed distributions' metadata (``importlib.metadata``): nothing here
imports torch or ray, so reading them costs milliseconds and works where importing them would fail.
"""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Iterable, Mapping

# The distributions whose versions change a run's results or its records (PyPI names).
TRACKED = ("torch", "torchvision", "timm", "ray", "mlflow")
NOT_INSTALLED = "not installed"


def resolved_versions(packages: Iterable[str] = TRACKED) -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.14.1", ...}``: the interpreter's version and each package's
    installed version, exactly as its metadata states it (local labels such as ``+cpu`` included, since
    a CPU and a CUDA build differ); ``NOT_INSTALLED`` for a package this environment lacks."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def mismatched_versions(reference: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{name: (reference version, this process's version)}`` for each entry of ``reference`` (a
    ``resolved_versions()`` from elsewhere, or any ``{name: version}``; ``"python"`` means the
    interpreter) that differs here; empty when everything matches. Versions compare as exact strings:
    ``2.14.1`` and ``2.14.1+cpu`` are different builds."""
    here = resolved_versions(name for name in reference if name != "python")
    return {name: (wanted, here[name]) for name, wanted in reference.items() if here[name] != wanted}


def version_params() -> dict[str, str]:
    """The resolved versions as MLflow params (``version.torch``, ...): every run the project starts logs them."""
    return {f"version.{name}": version for name, version in resolved_versions().items()}
