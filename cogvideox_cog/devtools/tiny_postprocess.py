"""Tiny random RIFE and Real-ESRGAN models, saved as the released files are laid out.

The same architectures as the releases, narrower: the RIFE file is a state dict with DDP's
"module." prefix, as Practical-RIFE's flownet.pkl; the Real-ESRGAN file holds it under
"params_ema", as RealESRGAN_x4plus.pth. Loading them takes the released files' path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..postprocess.rife import IFNet
from ..postprocess.rrdbnet import RRDBNet

TINY_RIFE_WIDTHS = (16, 16, 8, 8, 8)
TINY_RRDB = {"features": 8, "blocks": 1, "growth": 4, "scale": 4}


def tiny_ifnet(seed: int = 0) -> IFNet:
    torch.manual_seed(seed)
    return IFNet(TINY_RIFE_WIDTHS).eval()


def tiny_rrdbnet(seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    return RRDBNet(**TINY_RRDB).eval()


def save_tiny_rife(path: Path) -> Path:
    state = {f"module.{key}": value for key, value in tiny_ifnet().state_dict().items()}
    torch.save(state, path)
    return path


def save_tiny_realesrgan(path: Path) -> Path:
    torch.save({"params_ema": tiny_rrdbnet().state_dict()}, path)
    return path
