"""LPIPS (Zhang et al. 2018, AlexNet trunk, v0.1 linear layers) between synthetic images and their
nearest real images, with the AlexNet weights taken from a local file and never downloaded.

:func:`lpips_status` says whether the weights are here and, if not, how to get them; the scores
are computed only where they are (the report then says why LPIPS is missing). The definition is in
:mod:`synthaug.evaluation.quality`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from synthaug.progress import progress_bar

__all__ = ["ALEXNET_WEIGHTS_FILE", "LPIPS_MIN_SIDE", "find_lpips_backbone", "lpips_status"]

#: torchvision's file name of the ImageNet AlexNet weights LPIPS(net="alex") uses
ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
_ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_WEIGHTS_FILE
#: images with a shorter side are enlarged bilinearly to it before LPIPS
LPIPS_MIN_SIDE = 64


def find_lpips_backbone(path: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """The AlexNet ImageNet weights file LPIPS needs, without downloading anything.

    Args:
        path: an explicit weights file (a torchvision ``alexnet`` state dict); must exist.

    Returns:
        ``path``, else ``torch.hub.get_dir()/checkpoints/alexnet-owt-*.pth`` when present, else
        ``None``.

    Raises:
        FileNotFoundError: ``path`` was given and is not a file.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights {p} do not exist; give torchvision's {ALEXNET_WEIGHTS_FILE}")
        return p
    import torch

    found = sorted((Path(torch.hub.get_dir()) / "checkpoints").glob("alexnet-owt-*.pth"))
    return found[0] if found else None


def _lpips_missing_reason() -> str:
    import torch

    where = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"torchvision's ImageNet AlexNet weights ({ALEXNET_WEIGHTS_FILE}) are not in {where} and no "
        f"backbone file was given. On a machine with internet run `python -c \"import torchvision; "
        f"torchvision.models.alexnet(weights='IMAGENET1K_V1')\"` (or download {_ALEXNET_URL}), then "
        f"copy the file to {where} or pass it with --lpips-backbone PATH (lpips_backbone=PATH)"
    )


def lpips_status(backbone: Optional[Union[str, os.PathLike]] = None) -> Tuple[Optional[Path], Optional[str]]:
    """Whether LPIPS can be computed here, without downloading anything.

    Args:
        backbone: explicit AlexNet weights file (see :func:`find_lpips_backbone`).

    Returns:
        ``(weights path, None)`` when it can, ``(None, reason)`` when not; the reason says how to
        get the weights.
    """
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    found = find_lpips_backbone(backbone)
    return (found, None) if found is not None else (None, _lpips_missing_reason())


def _build_lpips(backbone: Path):
    """``lpips.LPIPS(net="alex")`` with its trunk loaded from ``backbone`` (no download): the
    model is built with a random trunk (``pnet_rand=True``, which only skips torchvision's
    download), then the trunk's five conv layers get the file's ``features.*`` weights, strictly."""
    import lpips
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for lpips' `pretrained=` call
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    try:
        state = torch.load(backbone, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"LPIPS backbone {backbone} cannot be read as a torch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    trunk = {}
    for key in model.net.state_dict():
        src = "features." + key.split(".", 1)[1]  # slice<k>.<i>.weight -> features.<i>.weight
        if src not in state:
            raise ValueError(f"LPIPS backbone {backbone} lacks {src}; it must be torchvision's alexnet state dict ({ALEXNET_WEIGHTS_FILE})")
        trunk[key] = state[src]
    try:
        model.net.load_state_dict(trunk, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"LPIPS backbone {backbone} does not fit AlexNet: {exc}") from None
    return model.eval()


def lpips_scores(a: np.ndarray, b: np.ndarray, backbone: Path, *, progress: bool, batch: int = 32) -> np.ndarray:
    """LPIPS of each pair ``(a[i], b[i])`` of uint8 N×H×W×C arrays (C = 1 or 3): float64 (N,)."""
    import torch
    import torch.nn.functional as F

    model = _build_lpips(backbone)

    def prep(z: np.ndarray) -> "torch.Tensor":
        t = torch.from_numpy(np.ascontiguousarray(z)).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        h, w = t.shape[2:]
        if min(h, w) < LPIPS_MIN_SIDE:
            s = LPIPS_MIN_SIDE / min(h, w)
            t = F.interpolate(t, size=(max(LPIPS_MIN_SIDE, round(h * s)), max(LPIPS_MIN_SIDE, round(w * s))), mode="bilinear", align_corners=False)
        return t

    out = np.empty(len(a))
    with torch.no_grad():
        for s in progress_bar(range(0, len(a), batch), desc="LPIPS", unit="batch", disable=not progress, dynamic_ncols=True):
            out[s : s + batch] = model(prep(a[s : s + batch]), prep(b[s : s + batch])).flatten().double().numpy()
    return out
