"""Clips tagged with any transfer, primaries and matrix, for tests of how colours are read."""

from __future__ import annotations

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace

H, W = 48, 64  # each patch is a 16-pixel column, whole chroma blocks of 4:2:0


def write_clip(path, signals, trc, primaries=ColorPrimaries.BT2020, colorspace=None) -> str:
    """A lossless 10-bit clip whose frames are columns of the given R'G'B' signals (0..1),
    tagged with trc, primaries and a BT.2020 (or given) matrix, limited range."""
    colorspace = colorspace if colorspace is not None else Colorspace.BT2020
    rgb = np.zeros((H, W, 3), np.uint16)
    for index, signal in enumerate(signals):
        rgb[:, 16 * index : 16 * (index + 1)] = np.round(np.clip(signal, 0, 1) * 65535)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p10le"
        context = stream.codec_context
        context.color_trc, context.color_primaries = trc, primaries
        context.colorspace, context.color_range = colorspace, ColorRange.MPEG
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le").reformat(
                format="yuv420p10le", dst_colorspace=colorspace, dst_color_range=ColorRange.MPEG
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:  # the tags reached the file, or the test is moot
        frame = next(container.decode(video=0))
        assert (frame.color_trc, frame.color_primaries) == (trc, primaries)
        assert (frame.colorspace, frame.format.name) == (colorspace, "yuv420p10le")
    return str(path)
