"""Real-ESRGAN super-resolution: the RRDBNet generator, and a tiled upscale of video frames.

Why not spandrel, which loads this architecture and many others from a state dict: spandrel
imports torchvision at import time, and torchvision's wheels on PyPI are CUDA builds that fail
to import next to the CPU build of torch that our tests and CI run on (`operator
torchvision::nms does not exist`); installed there, torchvision also breaks diffusers'
imports. The generator is small, so it is written here, from BasicSR's RRDBNet (ESRGAN, Wang
et al. 2018; Real-ESRGAN, Wang et al. 2021), with the same parameter names, so the released
RealESRGAN_x4plus.pth loads unchanged.

Weights: a plain state dict, optionally under "params_ema" or "params" as BasicSR saves it,
read with torch.load(weights_only=True) or from safetensors (weights.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Tiles of 256 input pixels with 16 of overlap: 480x720 is 2x3 tiles; at 4x a tile's largest
# activation is 64 channels x 1152^2, 170 MB in fp16, so a frame fits any GPU. Overlap hides
# the seams: each tile's border pixels, which miss their neighbours, are cut away.
TILE = 256
TILE_OVERLAP = 16


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, growth, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + growth, growth, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * growth, growth, 3, 1, 1)
        self.conv4 = nn.Conv2d(features + 3 * growth, growth, 3, 1, 1)
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """scale 4 as released (RealESRGAN_x4plus: 64 features, 23 blocks, growth 32).

    scale 2 and 1 models see the frame pixel-unshuffled (12 or 48 input channels), as in BasicSR.
    """

    def __init__(self, features: int = 64, blocks: int = 23, growth: int = 32, scale: int = 4):
        super().__init__()
        self.scale = scale
        in_channels = 3 * (4 // scale) ** 2
        self.conv_first = nn.Conv2d(in_channels, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale < 4:
            x = F.pixel_unshuffle(x, 4 // self.scale)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def rrdbnet_for(state: dict[str, torch.Tensor]) -> RRDBNet:
    """An RRDBNet shaped as the state dict says (features, blocks, growth, scale)."""
    for key in ("conv_first.weight", "body.0.rdb1.conv1.weight"):
        if key not in state:
            raise ValueError(f"it has no {key!r}: not an RRDBNet (Real-ESRGAN) state dict")
    first = state["conv_first.weight"]
    blocks = len({key.split(".")[1] for key in state if key.startswith("body.")})
    scale = {3: 4, 12: 2, 48: 1}.get(first.shape[1])
    if scale is None:
        raise ValueError(f"conv_first takes {first.shape[1]} channels: not an RRDBNet of 3x3 RGB")
    growth = state["body.0.rdb1.conv1.weight"].shape[0]
    return RRDBNet(features=first.shape[0], blocks=blocks, growth=growth, scale=scale)


def upscaled_size(height: int, width: int, factor: int) -> tuple[int, int]:
    return height * factor, width * factor


def upscale(
    model: RRDBNet,
    frames: np.ndarray,
    factor: int,
    device: torch.device,
    dtype: torch.dtype,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
    on_frame: Callable[[int, int], None] = lambda done, total: None,
) -> Iterator[np.ndarray]:
    """(F, H, W, 3) frames (uint8, or floats in [0, 1]) -> F (H*factor, W*factor, 3) uint8
    frames, each made when it is asked for.

    The model's own scale (4 for RealESRGAN_x4plus) is brought to `factor` by an area resize,
    which averages whole blocks of pixels (no aliasing). Frame by frame, tile by tile: a Cog
    cancel lands between tiles.
    """
    count, height, width = frames.shape[:3]
    size = upscaled_size(height, width, factor)
    for index in range(count):
        upscaled = _upscaled_frame(model, frames[index], size, device, dtype, tile, overlap)
        on_frame(index + 1, count)
        yield upscaled


def _upscaled_frame(
    model: RRDBNet,
    frame: np.ndarray,
    size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    tile: int,
    overlap: int,
) -> np.ndarray:
    """One frame upscaled to `size`, on the host. Its device tensors are gone on return, so
    none stays on the GPU while the encoder has the frame, nor in a cancel's traceback."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).to(device)
    image = image.float() / 255.0 if frame.dtype == np.uint8 else image.float()
    image = image.permute(2, 0, 1).unsqueeze(0).to(dtype)
    result = upscale_tiled(model, image, tile, overlap).float()
    if result.shape[-2:] != size:
        result = F.interpolate(result, size=size, mode="area")
    pixels = torch.round(result.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return pixels[0].permute(1, 2, 0).cpu().numpy()


def upscale_tiled(model: RRDBNet, image: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """model(image), computed tile by tile: each tile sees `overlap` pixels of its
    neighbours on every side, and only its own part of the output is kept."""
    _, channels, height, width = image.shape
    scale = model.scale
    out = image.new_zeros((1, channels, height * scale, width * scale))
    with torch.inference_mode():
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
                y1, x1 = min(bottom + overlap, height), min(right + overlap, width)
                result = model(image[:, :, y0:y1, x0:x1])
                inner = result[
                    :,
                    :,
                    (top - y0) * scale : (bottom - y0) * scale,
                    (left - x0) * scale : (right - x0) * scale,
                ]
                out[:, :, top * scale : bottom * scale, left * scale : right * scale] = inner
    return out


def tiles_per_frame(height: int, width: int, tile: int = TILE) -> int:
    return math.ceil(height / tile) * math.ceil(width / tile)
