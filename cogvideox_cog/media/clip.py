"""The video-to-video input: decode a clip and turn it into the frames the model takes.

The clip is resampled in time to the model's own frame rate (8 fps for 1.0, 16 for 1.5): frame
i of the result is the frame on screen at i / fps seconds from the start of the clip, so the
clip must last (num_frames - 1) / fps seconds. Of a longer clip only that beginning is used
(and decoded); a shorter one is refused with the largest frame count it can give, rather than
slowed down or looped behind the user's back. Of a clip whose codec codes each frame on its
own (ProRes, MJPEG, PNG...), only the frames picked are decoded (_pick_intra_frames).
Each frame is scaled to cover the model's resolution and centre-cropped, as the I2V image is,
at the shape players show it: stretched by its pixel aspect ratio (a DVD's 720x480 at 16:9).
Its colours are read with the matrix and range the clip is tagged with (BT.601 when untagged,
as FFmpeg does), and otherwise as they are, as upstream reads them. Asked to convert them, an
HDR clip is tone-mapped to SDR BT.709, and an SDR one with BT.2020 primaries converted to
BT.709 (colour.py), each picked frame before it is scaled, so that every clip is scaled in the
same SDR signal. The summary says which, for such a clip.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import struct
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.sidedata.sidedata import Type as SideDataType
from PIL import Image

from ..errors import InputError
from .colour import conversion, to_sdr
from .image import MAX_ASPECT_RATIO, MAX_JPEG_SCANS, fit_image, more_jpeg_scans_than_allowed

log = logging.getLogger(__name__)

FORMATS = "mp4, webm, mov or gif"
# The container formats FFmpeg may read a clip as. Not every one it knows: its playlist and
# list demuxers (ffconcat, HLS) open further files named inside the upload. Audio files
# (mp3, wav, flac, aac) are read too, to be refused as having no video track.
DEMUXERS = (
    "mov,mp4,matroska,webm,gif,avi,flv,mpegts,mpeg,ogg,asf,m4v,h264,hevc,mjpeg,mp3,wav,flac,aac"
)
# A frame larger than 4K UHD (8.3 MP) with room to spare; bigger ones would cost seconds per
# frame to decode and scale, for a video generated at 0.35-1 MP.
MAX_VIDEO_PIXELS = 16_000_000
# Only the first seconds are decoded, but a clip whose header claims hours is refused up front.
MAX_VIDEO_SECONDS = 600.0
# Frames decoded before the needed span is covered: 10 s of 161 frames at 16 fps from a
# 240 fps clip is 2,400; more points at a broken or hostile stream.
MAX_DECODED_FRAMES = 5_000
# Pixels decoded before the needed span is covered: 4K UHD at 120 fps (phones' slow motion)
# over those 10 s is 1,200 frames of 8.3 MP, 10 G; a fifth more is taken. Without it, 5,000
# frames of 16 MP fit in the limits: 500 MB of 16-bit PNG frames took 0.45 s of CPU each.
MAX_DECODED_PIXELS = 12_000_000_000
# Timestamps are rounded on the way into a container; this much slack counts as on time.
_EPSILON = 1e-3


@dataclass(frozen=True)
class VideoClip:
    frames: list[Image.Image]
    summary: str


def load_video(
    path: Path | str,
    num_frames: int,
    fps: int,
    height: int,
    width: int,
    allowed_frames: range | None = None,
    convert_colour: bool = False,
) -> VideoClip:
    """num_frames RGB frames at fps, each height x width, from the start of the clip at `path`.

    allowed_frames (the variant's frame rule) only improves the message for a clip too short.
    convert_colour: an HDR or BT.2020 clip is converted to SDR BT.709, not read as it is.
    """
    container = _open(path)
    with container:
        stream = _checked_stream(container, num_frames, fps)
        pixel_aspect = _pixel_aspect(stream)
        source_rate = _source_rate(container, stream)
        targets = [i / fps for i in range(num_frames)]
        transforms: list[Image.Transpose | None] = []
        conversions: list[str | None] = []

        def prepare(frame: av.VideoFrame) -> Image.Image:
            transforms.append(_display_transform(frame))
            conversions.append(conversion(frame))
            upright = _rgb(frame, transforms[-1], sdr=convert_colour and bool(conversions[-1]))
            turned = transforms[-1] in _SWAPS_SIDES
            return fit_image(upright, height, width, 1 / pixel_aspect if turned else pixel_aspect)

        picked, decoded, read, start, end, damage = _pick_frames(
            container, stream, targets, source_rate, prepare
        )
        header_seconds = _header_duration(container, stream)
        # Within the block: closing the container frees the stream's fields that these read.
        if len(picked) < num_frames:
            _refuse_short(stream, read, start, end, damage, num_frames, fps, allowed_frames)
        source_width, source_height = stream.codec_context.width, stream.codec_context.height
    transform = transforms[0]
    if transform in _SWAPS_SIDES:
        source_width, source_height = source_height, source_width
    turned = f", {_SAID[transform]} as its display matrix says" if transform is not None else ""
    if pixel_aspect != 1:
        turned += f", its pixels shown {pixel_aspect.numerator}:{pixel_aspect.denominator}"
    shown = header_seconds if header_seconds is not None else end - start
    rate = f"{source_rate:g} fps" if source_rate else "variable fps"
    of_read = f" of {read}" if read != decoded else ""  # the rest skipped (_pick_intra_frames)
    summary = (
        f"video: {shown:.1f} s at {rate}, {decoded}{of_read} frames decoded -> {num_frames} "
        f"frames at {fps} fps (its first {(num_frames - 1) / fps:.1f} s), "
        f"{source_width}x{source_height}{turned} -> {width}x{height} (scaled to cover, "
        f"centre-cropped)"
    )
    # Of any frame picked, not only the first: a clip spliced together may start in SDR.
    converted = next((name for name in conversions if name), None)
    if converted and convert_colour:
        summary += f"; {converted}"
    elif converted:
        summary += (
            f"; colours read as they are, as upstream reads them (convert_colour=true: {converted})"
        )
    return VideoClip(picked, summary)


def _source_rate(container, stream) -> float | None:
    """The clip's average frame rate. A raw H.264 or HEVC stream has no timestamps and its
    demuxer says 25 fps whatever the stream's own rate, which its decoder reads from it."""
    if container.format.name in ("h264", "hevc") and stream.codec_context.framerate:
        return float(stream.codec_context.framerate)
    return float(stream.average_rate) if stream.average_rate else None


def _pixel_aspect(stream) -> Fraction:
    """How many times as wide as high the clip's pixels are shown, as its container or stream
    says (a DVD's 720x480 at 16:9: 32:27, an HDV camera's 1440x1080 at 1920x1080: 4:3); 1
    where it says nothing."""
    ratio = stream.sample_aspect_ratio
    return Fraction(ratio) if ratio and ratio > 0 else Fraction(1)


def _open(path: Path | str):
    try:
        # Tags are not used; a title in Latin-1, as older cameras and tools write it, would
        # otherwise fail the whole clip on PyAV's strict UTF-8 decoding of them.
        # Opening decodes a first frame where the container does not give the stream's size
        # and format (a PNG or raw H.264 track): max_pixels refuses a far larger one there
        # too, before it is allocated, as _checked_stream does for the frames after it.
        options = {"format_whitelist": DEMUXERS, "max_pixels": str(2 * MAX_VIDEO_PIXELS)}
        return av.open(str(path), options=options, metadata_errors="replace")
    except (FileNotFoundError, IsADirectoryError) as error:
        raise InputError(
            f"video {str(path)[:100]!r} is not an http(s) URL or a data: URI of a video."
        ) from error
    except av.error.FFmpegError as error:
        needed = _mp4_cut_off_at(path)
        if needed is not None:
            raise InputError(
                f"video is damaged or truncated: it is an mp4 or mov file of "
                f"{Path(path).stat().st_size:,} bytes whose parts run to at least {needed:,}, "
                f"so its end, with the index of its frames, is missing. Send the whole file "
                f"again."
            ) from error
        picture = _image_format(path)
        if picture is not None and not picture[1]:
            raise InputError(
                f"video is a {picture[0]} image, not a video. A single picture is an image: "
                f"use the image-to-video predictor."
            ) from error
        if picture is not None:
            raise InputError(
                f"video is an animated {picture[0]} image, which is not read as a video; send "
                f"an {FORMATS} file."
            ) from error
        raise InputError(f"video could not be read as a video; send an {FORMATS} file.") from error


def _image_format(path: Path | str) -> tuple[str, bool] | None:
    """(format, animated) of an image FFmpeg's video demuxers refused (a JPEG, PNG, WebP...)
    as Pillow reads it from the header; None when Pillow cannot name it either."""
    try:
        with Image.open(path) as image:
            return image.format or "unknown", getattr(image, "n_frames", 1) > 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _mp4_cut_off_at(path: Path | str) -> int | None:
    """The least size of an mp4 or mov whose top-level boxes run past the end of the file, or
    None if it is none such. Phones and cameras write the index (the moov box) last, so a
    cut-off upload has none, and FFmpeg cannot tell it from a file of another kind."""
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        offset = 0
        while offset + 8 <= size:
            file.seek(offset)
            header = file.read(16)
            box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if offset == 0 and kind != b"ftyp":
                return None
            if box_size == 1 and len(header) == 16:  # a 64-bit size follows the type
                box_size = int.from_bytes(header[8:], "big")
            if box_size < 8:  # 0: the box runs to the end of the file, as it may
                return None
            offset += box_size
    return offset if offset > size else None


def _checked_stream(container, num_frames: int, fps: int):
    """The video track, refused from its header when its frames or its length are too big."""
    # A cover picture (an m4a's artwork) is a video stream of one frame, not a clip.
    tracks = [
        stream
        for stream in container.streams.video
        if not stream.disposition & av.stream.Disposition.attached_pic
    ]
    if not tracks:
        cover = " (only a cover picture)" if container.streams.video else ""
        raise InputError(f"video has no video track{cover}; send an {FORMATS} file.")
    stream = tracks[0]
    if stream.codec_context is None:  # a codec FFmpeg does not know, e.g. a camera's raw
        raise InputError(
            f"video is coded in a format that cannot be decoded here; re-encode it as H.264 "
            f"(or send another {FORMATS} file)."
        )
    stream.thread_type = "AUTO"
    # The header gives the first frame's size, but a stream may change size at any keyframe.
    # The decoder refuses a far larger frame before it allocates it (twice the limit leaves
    # room for the padding it adds to each row), _pick_frames one over the limit.
    stream.codec_context.options = {"max_pixels": str(2 * MAX_VIDEO_PIXELS)}
    source_width, source_height = stream.codec_context.width, stream.codec_context.height
    if source_width * source_height > MAX_VIDEO_PIXELS:
        raise InputError(
            f"video is {source_width}x{source_height} "
            f"({source_width * source_height / 1e6:.0f} MP a frame); the limit is "
            f"{MAX_VIDEO_PIXELS / 1e6:.0f} MP. Downscale it first."
        )
    if max(source_width, source_height) > MAX_ASPECT_RATIO * min(source_width, source_height):
        ratio = max(source_width, source_height) / min(source_width, source_height)
        raise InputError(
            f"video is {source_width}x{source_height}, {ratio:.1f}:1; the longer side may be "
            f"at most {MAX_ASPECT_RATIO:g} times the shorter. The video made keeps only a "
            f"centre crop at its own shape (3:2 or 16:9), so crop the part you want first."
        )
    header_seconds = _header_duration(container, stream)
    if header_seconds is not None and header_seconds > MAX_VIDEO_SECONDS:
        raise InputError(
            f"video is {header_seconds:.0f} s long; the limit is {MAX_VIDEO_SECONDS:.0f} s. "
            f"Only the first {(num_frames - 1) / fps:.1f} s are used, so trim it first."
        )
    return stream


def _refuse_short(stream, decoded, start, end, damage, num_frames, fps, allowed_frames) -> None:
    """Fewer frames than asked for: a damaged file, or a clip too short (say which)."""
    if decoded == 0:
        raise InputError(f"video has no frames that could be decoded; send an {FORMATS} file.")
    source_rate = float(stream.average_rate) if stream.average_rate else None
    frame_time = 1 / source_rate if source_rate else 0.0
    span = end - start
    # Frames missing that the video track's header promises: a cut-off upload, not a
    # short clip (the container's duration may be an audio track's, so not that).
    promised = _track_duration(stream)
    if damage is not None or (promised or 0) > span + frame_time + 0.1:
        length = f" of the {promised:.2f} s its header gives" if promised else ""
        raise InputError(
            f"video is damaged or truncated: only {decoded} frames ({span:.2f} s{length}) "
            f"could be decoded{f' ({damage})' if damage else ''}. Send the whole file "
            f"again, or re-encode it."
        )
    raise InputError(_too_short(decoded, span, num_frames, fps, allowed_frames))


def _pick_frames(container, stream, targets: list[float], source_rate: float | None, prepare):
    """For each target time, the last frame shown at or before it, as prepare(frame) made it
    (once per frame, so only model-sized pictures are held, not full source frames); decoding
    stops when done.

    Returns (frames picked, frames decoded, frames read, time of the first frame, time the
    last frame read leaves the screen, the decoding error that stopped it early or None).
    """
    if _intra_coded(stream.codec_context.codec):
        return _pick_intra_frames(container, stream, targets, source_rate, prepare)
    picked: list[Image.Image] = []
    damage: str | None = None
    decoded = pixels = 0
    start = last_time = last_shown = 0.0
    previous: av.VideoFrame | None = None
    previous_image: Image.Image | None = None

    def shown() -> Image.Image:
        nonlocal previous_image
        if previous_image is None:
            previous_image = prepare(previous)
        return previous_image

    fed = fed_pixels = 0

    def frames():
        """The decoded frames. Every packet fed counts against the limits: one before an edit
        list's start is decoded too, and its frame dropped inside FFmpeg, unseen here."""
        nonlocal fed, fed_pixels
        context = stream.codec_context
        for packet in container.demux(stream):
            if packet.size:  # not the empty one that flushes the decoder
                fed += 1
                fed_pixels += context.width * context.height
                _check_budget(fed, fed_pixels, targets[-1], f"{context.width}x{context.height}")
            yield from packet.decode()

    try:
        for frame in frames():
            time = _time(frame, decoded, source_rate)
            if decoded == 0:
                start = time
            decoded += 1
            pixels += frame.width * frame.height
            _check_frame(frame, decoded, decoded, pixels, targets[-1])
            time -= start
            # Every target before this frame's time is shown by the previous frame.
            while previous is not None and len(picked) < len(targets):
                if targets[len(picked)] < time - _EPSILON:
                    picked.append(shown())
                else:
                    break
            previous, previous_image, last_time = frame, None, time + start
            last_shown = _on_screen(frame, source_rate)
            if len(picked) == len(targets):
                break
    except av.error.FFmpegError as error:
        damage = _damage(error, decoded)
    if previous is not None and len(picked) < len(targets):
        # The last decoded frame stays on screen for its duration after its time.
        # A target at the very end of the clip (a 1 s clip for 9 frames at 8 fps) takes it too.
        end = last_time - start + last_shown
        while len(picked) < len(targets) and targets[len(picked)] < end + _EPSILON:
            picked.append(shown())
    return picked, decoded, decoded, start, last_time + last_shown, damage


def _intra_coded(codec) -> bool:
    """Whether the stream's frames may be coded each on its own: in every codec FFmpeg calls
    intra-only (MJPEG, ProRes, DNxHD, JPEG 2000...), and in PNG, whose decoder adds a frame
    to the one before only when its packet is not marked as a key frame."""
    return codec.intra_only or codec.name == "png"


# Side data that a decoder keeps for the frames after the packet that brings it.
_KEPT_SIDE_DATA = ("palette", "new_extradata", "param_change")


def _needed_later(codec, packet: av.Packet, following: av.Packet) -> bool:
    """Whether frames after `packet` need it decoded, though its own frame is not picked: a
    PNG frame that the following one is added to, a packet bringing a new palette (an AVI
    of 8-bit pictures brings one where it changes) or new parameters, or a JPEG's tables
    that the following one leaves out."""
    if not codec.intra_only and not following.is_keyframe:
        return True
    if _jpeg_tables(codec, packet) - _jpeg_tables(codec, following):
        return True
    return any(packet.has_sidedata(kind) for kind in _KEPT_SIDE_DATA)


# Markers of the tables a JPEG may leave out, to be decoded with those last defined: DQT, DHT.
_JPEG_TABLES = {0xDB, 0xC4}


def _jpeg_tables(codec, packet: av.Packet) -> set[int]:
    """The tables (of _JPEG_TABLES) an MJPEG packet defines before its picture data."""
    if codec.name != "mjpeg":
        return set()
    whole = memoryview(packet)
    # The tables come first: a prefix holds them but behind large APPn segments (EXIF).
    for size in (65536, len(whole)):
        data = bytes(whole[:size])
        at, found = 0, set()
        while (at := data.find(b"\xff", at)) != -1 and at + 4 <= len(data):
            marker = data[at + 1]
            if marker in (0xDA, 0xD9):  # the picture data, or the end
                return found
            if marker == 0xFF:  # a fill byte before a marker
                at += 1
            elif marker == 0x00 or 0xD0 <= marker <= 0xD8:  # no length follows: RSTn, SOI
                at += 2
            else:
                found |= {marker} & _JPEG_TABLES
                at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if len(data) == len(whole):
            return found
    return found


@dataclass
class _Sent:
    """A frame's packet for the decoder, which gives the frame out a few packets later."""

    packet: av.Packet
    number: int  # the frame's place in the clip, from 1
    before_ends: float  # when the frame before it leaves the screen
    before: av.Packet | None  # the packet of the frame before it, for when it is broken
    count: int = 0  # the targets it is picked for; 0 when decoded for the frame after it


def _pick_intra_frames(container, stream, targets: list[float], source_rate: float | None, prepare):
    """_pick_frames for frames coded each on their own: the same frames are picked, but only
    theirs are decoded (and a PNG frame that a later one is added to). A frame is decoded once
    the next one's time shows it is on screen at a target time.

    The frames read count against MAX_DECODED_FRAMES, those decoded against the pixels.
    Damage in a frame not decoded goes unnoticed: it is not in the video made.
    """
    context = stream.codec_context
    picked: list[Image.Image] = []
    sent: deque[_Sent] = deque()
    damage: str | None = None
    read = decoded = pixels = assigned = discarded = 0
    last_picked: tuple[int, Image.Image] | None = None  # the last frame picked, prepared
    start = last_time = last_shown = 0.0
    previous: _Sent | None = None

    def packets():
        """The clip's packets, to the end or to damage in the file."""
        nonlocal damage
        try:
            for packet in container.demux(stream):
                if packet.size:  # not the empty one after the last
                    yield packet
        except av.error.FFmpegError as error:
            damage = _damage(error, read)

    def targets_before(time: float) -> int:
        """How many targets not yet given to a frame come before `time`."""
        count = assigned
        while count < len(targets) and targets[count] < time:
            count += 1
        return count - assigned

    def take(frames: list[av.VideoFrame]) -> None:
        nonlocal decoded, pixels, last_picked
        for frame in frames:
            decoded += 1
            pixels += frame.width * frame.height
            _check_frame(frame, sent[0].number, decoded, pixels, targets[-1])
            if sent[0].count:
                last_picked = (sent[0].number, prepare(frame))
                picked.extend([last_picked[1]] * sent[0].count)
            sent.popleft()

    def shown_before(broken: _Sent) -> Image.Image | None:
        """The frame before a broken one, prepared; None where it cannot be decoded alone (a
        PNG frame added to the one before it) or is broken too."""
        if last_picked is not None and last_picked[0] == broken.number - 1:
            return last_picked[1]
        packet = broken.before
        if packet is None or not (context.codec.intra_only or packet.is_keyframe):
            return None
        context.flush_buffers()
        try:
            frames = context.decode(packet) + context.decode(None)
        except av.error.FFmpegError:
            return None
        if len(frames) != 1:
            return None
        nonlocal decoded, pixels
        decoded += 1
        pixels += frames[0].width * frames[0].height
        _check_frame(frames[0], broken.number - 1, decoded, pixels, targets[-1])
        return prepare(frames[0])

    def send(entry: _Sent, count: int) -> None:
        nonlocal assigned
        if context.codec.name == "mjpeg" and more_jpeg_scans_than_allowed(bytes(entry.packet)):
            raise InputError(
                f"video's frame {entry.number} is a progressive JPEG of over {MAX_JPEG_SCANS} "
                f"scans, which would take seconds to decode; re-encode the clip."
            )
        entry.count, assigned = count, assigned + count
        sent.append(entry)
        take(context.decode(entry.packet))

    def drain() -> None:
        """Takes the frames left in the decoder, which come out together: PyAV loses those
        before a broken one with its error (or, for invalid data, drops its error and the
        frames after it). Frames missing are decoded again one at a time, to find it."""
        with contextlib.suppress(av.error.FFmpegError):
            take(context.decode(None))
        for entry in list(sent):
            context.flush_buffers()
            take(context.decode(entry.packet) + context.decode(None))

    try:
        for packet in packets():
            if packet.is_discard:  # before an edit list's start: the decoder drops its frame
                if not context.codec.intra_only:  # but may add a PNG frame after it to it
                    discarded += 1
                    size = context.width * context.height
                    cost = pixels + discarded * size
                    shape = f"{context.width}x{context.height}"
                    _check_budget(read + discarded, cost, targets[-1], shape)
                    take(context.decode(packet))
                continue
            time = _time(packet, read, source_rate)
            if read == 0:
                start = time
            read += 1
            _check_count(read, targets[-1])
            entry = _Sent(packet, read, last_time + last_shown, previous and previous.packet)
            time -= start
            # Every target before this frame's time is shown by the previous frame.
            count = targets_before(time - _EPSILON)
            if previous and (count or _needed_later(context.codec, previous.packet, packet)):
                send(previous, count)
            previous, last_time = entry, time + start
            last_shown = _on_screen(packet, source_rate)
            if assigned == len(targets):
                break
        if previous is not None and assigned < len(targets):
            # The last frame read stays on screen for its duration after its time.
            count = targets_before(last_time - start + last_shown + _EPSILON)
            if count:
                send(previous, count)
        drain()
    except av.error.FFmpegError as error:  # the decoder's, for the first frame not given out
        first = sent[0] if sent else _Sent(None, read + 1, last_time + last_shown, None)
        damage = _damage(error, first.number - 1)
        # As when every frame is decoded: the frame before the broken one stays on screen
        # for its duration, which may reach past the broken one's time (a Matroska block's).
        end = first.before_ends - start + _EPSILON
        if len(picked) < len(targets) and targets[len(picked)] < end:
            image = shown_before(first)
            while image is not None and len(picked) < len(targets) and targets[len(picked)] < end:
                picked.append(image)
        return picked, decoded, first.number - 1, start, first.before_ends, damage
    return picked, decoded, read, start, last_time + last_shown, damage


def _time(frame: av.VideoFrame | av.Packet, before: int, source_rate: float | None) -> float:
    """When the frame is shown, from the clip's time zero; counted at the clip's rate from the
    frames before it where it has no timestamp."""
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base)
    return before / source_rate if source_rate else float(before)


def _check_count(count: int, cover: float) -> None:
    if count > MAX_DECODED_FRAMES:
        raise InputError(
            f"video needs more than {MAX_DECODED_FRAMES} decoded frames to cover "
            f"{cover:.1f} s; send it at a lower frame rate."
        )


def _check_frame(frame: av.VideoFrame, number: int, decoded: int, pixels: int, cover: float):
    """Refuses the clip at its frame `number` past the size limit, or `decoded` frames
    counting `pixels` past the budget."""
    if frame.width * frame.height > MAX_VIDEO_PIXELS:
        raise InputError(
            f"video's frame {number} is {frame.width}x{frame.height} "
            f"({frame.width * frame.height / 1e6:.0f} MP), larger than its first; the "
            f"limit is {MAX_VIDEO_PIXELS / 1e6:.0f} MP a frame. Downscale it first."
        )
    _check_budget(decoded, pixels, cover, f"{frame.width}x{frame.height}")


def _check_budget(decoded: int, pixels: int, cover: float, size: str) -> None:
    """Refuses the clip once `decoded` frames counting `pixels` are past the budget."""
    _check_count(decoded, cover)
    if pixels > MAX_DECODED_PIXELS:
        raise InputError(
            f"video needs more than {MAX_DECODED_PIXELS / 1e9:g} gigapixels decoded "
            f"to cover {cover:.1f} s ({decoded} frames of {size} so far); send it at a lower "
            f"frame rate or resolution (4K at 120 fps fits)."
        )


def _damage(error: av.error.FFmpegError, before: int) -> str:
    """What stopped decoding after `before` frames; refused if it is the frame's size, or
    nothing could be decoded."""
    if error.errno == errno.EINVAL:  # max_pixels, or a size no decoder takes
        than = "its first" if before else "its header says"
        raise InputError(
            f"video's frame {before + 1} is far larger than {than}, or of an invalid "
            f"size; the limit is {MAX_VIDEO_PIXELS / 1e6:.0f} MP a frame. Downscale it "
            f"first."
        ) from error
    if before == 0:
        raise InputError(
            f"video could not be decoded ({error}); send an {FORMATS} file."
        ) from error
    log.warning(f"video: decoding stopped after {before} frames: {error}")
    return str(error)


def _on_screen(frame: av.VideoFrame | av.Packet, source_rate: float | None) -> float:
    """Seconds the frame stays on screen: its own duration where the file gives one (a GIF
    often holds its last frame for seconds), else one frame at the clip's average rate."""
    if frame.duration and frame.time_base:
        return float(frame.duration * frame.time_base)
    return 1 / source_rate if source_rate else 0.0


def _too_short(decoded: int, span: float, num_frames: int, fps: int, allowed: range | None) -> str:
    needed = (num_frames - 1) / fps
    message = (
        f"video is too short: {span:.2f} s ({decoded} frames), and {num_frames} frames at "
        f"{fps} fps need at least {needed:.2f} s."
    )
    if decoded < 2:
        return message + " A single picture is an image: use the image-to-video predictor."
    fitting = [n for n in (allowed or ()) if (n - 1) / fps < span + _EPSILON]
    if fitting:
        return message + f" Send a longer clip, or ask for num_frames={fitting[-1]} or fewer."
    return message + " Send a longer clip."


def _header_duration(container, stream) -> float | None:
    """The clip's length from its first frame, as its header gives it."""
    seconds = _track_duration(stream)
    if seconds is None and container.duration is not None:
        seconds = container.duration / av.time_base
        # A Matroska or WebM header gives the time the clip ends, not its length: one cut from
        # a recording at 700 s, its timestamps kept, would count those 700 s too.
        start = (container.start_time or 0) / av.time_base
        if container.format.name.startswith("matroska") and 0 < start < seconds:
            seconds -= start
    return seconds


def _track_duration(stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


_T = Image.Transpose
_SWAPS_SIDES = {_T.ROTATE_90, _T.ROTATE_270, _T.TRANSPOSE, _T.TRANSVERSE}
# For the summary; turns are counterclockwise, as VideoFrame.rotation gives them.
_SAID = {
    _T.ROTATE_90: "turned 90 degrees",
    _T.ROTATE_180: "turned 180 degrees",
    _T.ROTATE_270: "turned 270 degrees",
    _T.FLIP_LEFT_RIGHT: "mirrored",
    _T.FLIP_TOP_BOTTOM: "flipped upside down",
    _T.TRANSPOSE: "turned 90 degrees and mirrored",
    _T.TRANSVERSE: "turned 270 degrees and mirrored",
}


def _display_transform(frame: av.VideoFrame) -> Image.Transpose | None:
    """How a player shows the frame, as FFmpeg's autorotate turns it: phones store portrait
    clips as landscape frames plus a display matrix, and an editor's flip (QuickTime's Flip
    Horizontal) writes a mirrored one, whose rotation alone reads as 180 degrees or none.
    Only quarter turns, mirrored or not, exist in practice; others are ignored."""
    degrees = round(frame.rotation or 0) % 360  # counterclockwise
    matrix = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    # a, b, u, c, d, v, x, y, w: x' = a x + c y, y' = b x + d y (16.16 fixed point)
    m = struct.unpack("=9i", bytes(matrix)[:36]) if matrix is not None else (1, 0, 0, 0, 1)
    if degrees == 270:  # a quarter turn clockwise
        return _T.TRANSPOSE if m[3] > 0 else _T.ROTATE_270
    if degrees == 90:
        return _T.TRANSVERSE if m[3] < 0 else _T.ROTATE_90
    mirrored, upside_down = m[0] < 0, m[4] < 0
    if degrees == 180 and mirrored and upside_down:
        return _T.ROTATE_180
    if degrees in (0, 180) and mirrored != upside_down:
        return _T.FLIP_LEFT_RIGHT if mirrored else _T.FLIP_TOP_BOTTOM
    return None


# Colour matrices (H.273 MatrixCoefficients) that FFmpeg's libswscale has no conversion for.
_MATRIX_NAMES = {
    8: "YCgCo",
    10: "BT.2020 constant luminance",
    11: "SMPTE ST 2085",
    12: "chromaticity-derived",
    13: "chromaticity-derived constant luminance",
    14: "ICtCp",
}


def _on_white(rgba) -> Image.Image:
    """A frame with alpha (ProRes 4444, PNG) on white where it is transparent, as an image
    is (image.py): dropping the alpha would show whatever colour the transparent parts hold
    (a keyed-out green screen)."""
    picture = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, picture).convert("RGB")


def _rgb(frame: av.VideoFrame, transform: Image.Transpose | None, sdr: bool) -> Image.Image:
    """The frame upright in RGB; with sdr, converted to SDR BT.709 first."""
    try:
        # Not to_image(), which copies the picture row by row and then twice more: 3.1 ms of
        # an 8-bit 1080p frame against 1.6 (benchmarks/clip_colour.py); the same pixels.
        if sdr:
            image = to_sdr(frame)
        elif any(component.is_alpha for component in frame.format.components):
            image = _on_white(frame.to_ndarray(format="rgba"))
        else:
            image = Image.fromarray(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as error:
        if error.errno != errno.EOPNOTSUPP:
            raise
        # Refused, not left to _pick_frames, which takes an FFmpegError for damage in the
        # file: every frame of such a clip fails alike.
        matrix = _MATRIX_NAMES.get(frame.colorspace, f"number {frame.colorspace}")
        raise InputError(
            f"video is tagged with a colour matrix ({matrix}) whose frames cannot be "
            f"converted to RGB here ({error.strerror}); re-encode it with a BT.709, BT.601 "
            f"or BT.2020 matrix."
        ) from error
    return image.transpose(transform) if transform is not None else image
