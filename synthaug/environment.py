"""The versions of Python and of the libraries synthaug uses, and the devices torch sees: the
environment block of bug reports (``synthaug env``) and of every benchmark's JSON."""

from __future__ import annotations

import importlib
import os
from importlib import metadata
import platform
import sys
from typing import Any, Dict, Iterable, Optional

__all__ = ["collect_env", "package_versions"]

_PACKAGES = ["synthaug", "torch", "torchvision", "diffusers", "peft", "transformers", "lmdb", "numpy", "PIL", "lpips", "xformers"]


def _version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__})"
    return str(getattr(module, "__version__", None) or package_versions([name]).get(name) or "installed")


def package_versions(names: Iterable[str]) -> Dict[str, Optional[str]]:
    """Installed distribution versions by package name (``None``: not installed), read from the
    package metadata without importing anything: cheap enough for every report."""
    out: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect_env() -> Dict[str, Any]:
    """Versions of Python and the libraries synthaug uses, CUDA and xformers availability."""
    info: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for name in _PACKAGES:
        info["pillow" if name == "PIL" else name] = _version(name)
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except Exception as exc:
        info["cuda_available"] = f"unknown ({exc})"
    info["xformers_available"] = not info["xformers"].startswith("not available")
    return info
