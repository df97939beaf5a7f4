"""Upscale and interpolate on tiny random models of the real architectures: frame counts, fps,
sizes, tiling, the choices a deployment offers, and how their weights are fetched and read."""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cogvideox_cog import postprocess
from cogvideox_cog.devtools.tiny_postprocess import (
    TINY_RIFE_WIDTHS,
    save_tiny_realesrgan,
    save_tiny_rife,
    tiny_ifnet,
    tiny_rrdbnet,
)
from cogvideox_cog.errors import ConfigError, InputError, WeightsError
from cogvideox_cog.postprocess import (
    INTERPOLATE_ENV,
    INTERPOLATE_URL_ENV,
    UPSCALE_ENV,
    UPSCALE_URL_ENV,
    Offer,
    Postprocessor,
    Steps,
    _build_ifnet,
    _build_rrdbnet,
    _source,
    rife,
    rrdbnet,
)
from cogvideox_cog.postprocess.weights import load_model, read_state_dict
from cogvideox_cog.weights.cache import COMPLETE_MARKER
from cogvideox_cog.weights.manifest import sha256_file
from tests.file_server import FileServer

CPU = torch.device("cpu")
HEIGHT, WIDTH = 32, 48  # even, not square, small


@pytest.fixture(scope="module")
def postprocessor() -> Postprocessor:
    return Postprocessor(tiny_ifnet(), tiny_rrdbnet(), CPU)


def _frames(count: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(0).random((count, height, width, 3), dtype=np.float32)


@pytest.mark.parametrize(("factor", "expected"), [(2, 5), (4, 9)])
def test_interpolation_adds_factor_minus_one_frames_between_each_pair(
    postprocessor, factor, expected
):
    frames = postprocessor.apply(_frames(3), 8, Steps(interpolate=factor)).array()
    assert frames.shape == (expected, HEIGHT, WIDTH, 3)
    assert rife.interpolated_count(49, factor) == {2: 97, 4: 193}[factor]


@pytest.mark.parametrize("factor", [2, 4])
def test_interpolation_multiplies_the_fps_so_the_duration_stays(postprocessor, factor):
    assert postprocessor.apply(_frames(2), 10, Steps(interpolate=factor)).fps == 10 * factor


def test_interpolation_keeps_the_generated_frames_as_the_encoder_would_round_them(
    postprocessor,
):
    source = _frames(3)
    frames = postprocessor.apply(source, 8, Steps(interpolate=4)).array()
    rounded = np.rint(source * 255).astype(np.uint8)
    np.testing.assert_array_equal(frames[[0, 4, 8]], rounded)


def test_interpolation_between_two_equal_still_frames_is_that_frame(postprocessor):
    """Whatever flow the random network estimates, warping a flat image gives it back."""
    still = np.full((2, HEIGHT, WIDTH, 3), 0.4, np.float32)
    frames = postprocessor.apply(still, 8, Steps(interpolate=2)).array()
    assert np.abs(frames[1].astype(int) - round(0.4 * 255)).max() <= 1


def _leaky(x):
    return F.leaky_relu(x, 0.2)


def _conv(state, name, x, stride=1):
    return F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], stride, 1)


def _deconv(state, name, x):
    return F.conv_transpose2d(x, state[f"{name}.weight"], state[f"{name}.bias"], 2, 1)


def _rife_head(state, image):
    for index, stride in ((0, 2), (1, 1), (2, 1)):
        image = _leaky(_conv(state, f"encode.cnn{index}", image, stride))
    return _deconv(state, "encode.cnn3", image)


def _rife_block(state, index, x, flow, scale):
    x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear")
    if flow is not None:
        x = torch.cat(
            (x, F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear") / scale), 1
        )
    name = f"block{index}"
    x = _leaky(_conv(state, f"{name}.conv0.0.0", x, 2))
    x = _leaky(_conv(state, f"{name}.conv0.1.0", x, 2))
    for k in range(8):
        res = f"{name}.convblock.{k}"
        x = _leaky(_conv(state, f"{res}.conv", x) * state[f"{res}.beta"] + x)
    x = F.pixel_shuffle(_deconv(state, f"{name}.lastconv.0", x), 2)
    x = F.interpolate(x, scale_factor=scale, mode="bilinear")
    return x[:, :4] * scale, x[:, 4:5], x[:, 5:]


def _rife_warp(image, flow):
    batch, _, height, width = flow.shape
    xs = torch.linspace(-1.0, 1.0, width).view(1, 1, 1, width).expand(batch, -1, height, -1)
    ys = torch.linspace(-1.0, 1.0, height).view(1, 1, height, 1).expand(batch, -1, -1, width)
    flow = torch.cat(
        (flow[:, 0:1] / ((width - 1.0) / 2.0), flow[:, 1:2] / ((height - 1.0) / 2.0)), 1
    )
    grid = (torch.cat((xs, ys), 1) + flow).permute(0, 2, 3, 1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _rife_reference(state, img0, img1, timestep):
    """Practical-RIFE v4.26's IFNet forward, in functional ops on its state dict."""
    f0, f1 = _rife_head(state, img0), _rife_head(state, img1)
    warped0, warped1, flow = img0, img1, None
    for index, scale in enumerate((16, 8, 4, 2, 1)):
        if flow is None:
            inputs = torch.cat((img0, img1, f0, f1, timestep), 1)
            flow, mask, context = _rife_block(state, index, inputs, None, scale)
        else:
            features = (_rife_warp(f0, flow[:, :2]), _rife_warp(f1, flow[:, 2:4]))
            inputs = torch.cat((warped0, warped1, *features, timestep, mask, context), 1)
            delta, mask, context = _rife_block(state, index, inputs, flow, scale)
            flow = flow + delta
        warped0, warped1 = _rife_warp(img0, flow[:, :2]), _rife_warp(img1, flow[:, 2:4])
    mask = torch.sigmoid(mask)
    return warped0 * mask + warped1 * (1 - mask)


def test_interpolated_frames_are_practical_rifes_ifnet_at_each_timestep():
    """Against Practical-RIFE v4.26's forward written out on the state dict: each pair's
    frames at t = 1/4, 2/4, 3/4, its frames padded to 64 by repeating their edges."""
    model, frames = tiny_ifnet(), _frames(3)
    with torch.no_grad():  # the random weights barely see the timestep: any would pass
        model.block0.conv0[0][0].weight[:, -1] *= 50
    made = Postprocessor(interpolator=model, device=CPU).apply(frames, 8, Steps(interpolate=4))
    made = made.array()
    state = {key: value.detach() for key, value in model.state_dict().items()}
    pad = (0, -WIDTH % 64, 0, -HEIGHT % 64)
    for pair in (0, 1):
        img0, img1 = (
            F.pad(torch.from_numpy(frames[i]).permute(2, 0, 1)[None], pad, mode="replicate")
            for i in (pair, pair + 1)
        )
        times = torch.tensor([0.25, 0.5, 0.75]).view(3, 1, 1, 1).expand(3, 1, *img0.shape[2:])
        with torch.inference_mode():
            middle = _rife_reference(
                state, img0.expand(3, -1, -1, -1), img1.expand(3, -1, -1, -1), times
            )
        middle = middle[:, :, :HEIGHT, :WIDTH].clamp(0, 1)
        expected = torch.round(middle * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        got = made[4 * pair + 1 : 4 * pair + 4]
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("steps", [Steps(interpolate=2), Steps(upscale=2)], ids=str)
def test_8_bit_frames_give_what_their_values_over_255_give(postprocessor, steps):
    """Upscaled frames reach the interpolation as 8-bit ones; decoded ones come as floats."""
    frames = np.rint(_frames(2) * 255).astype(np.uint8)
    as_8_bit = postprocessor.apply(frames, 8, steps).array()
    as_floats = postprocessor.apply(frames / np.float32(255), 8, steps).array()
    assert np.abs(as_8_bit.astype(int) - as_floats.astype(int)).max() <= 1


@pytest.mark.parametrize("factor", [2, 4])
def test_upscale_multiplies_width_and_height(postprocessor, factor):
    output = postprocessor.apply(_frames(2), 8, Steps(upscale=factor))
    frames = output.array()
    assert frames.shape == (2, HEIGHT * factor, WIDTH * factor, 3)
    assert (frames.dtype, output.fps) == (np.uint8, 8)


def _rdb(state, name, x):
    dense = [x]
    for conv in range(1, 5):
        dense.append(_leaky(_conv(state, f"{name}.conv{conv}", torch.cat(dense, 1))))
    return _conv(state, f"{name}.conv5", torch.cat(dense, 1)) * 0.2 + x


def _rrdbnet_reference(state, x, scale):
    """BasicSR's RRDBNet forward, in functional ops on its state dict."""
    if scale < 4:
        x = F.pixel_unshuffle(x, 4 // scale)
    feat = _conv(state, "conv_first", x)
    body = feat
    blocks = len({key.split(".")[1] for key in state if key.startswith("body.")})
    for block in range(blocks):
        inner = body
        for rdb in (1, 2, 3):
            inner = _rdb(state, f"body.{block}.rdb{rdb}", inner)
        body = inner * 0.2 + body
    feat = feat + _conv(state, "conv_body", body)
    feat = _leaky(_conv(state, "conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = _leaky(_conv(state, "conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return _conv(state, "conv_last", _leaky(_conv(state, "conv_hr", feat)))


def test_upscaled_frames_are_basicsrs_rrdbnet():
    model, frames = tiny_rrdbnet(), _frames(2)
    with torch.no_grad():  # random dense blocks barely move the pixels: their scale would not show
        for name, weight in model.named_parameters():
            if name.endswith("conv5.weight"):
                weight *= 50
    made = Postprocessor(upscaler=model, device=CPU).apply(frames, 8, Steps(upscale=4)).array()
    state = {key: value.detach() for key, value in model.state_dict().items()}
    with torch.inference_mode():
        out = _rrdbnet_reference(state, torch.from_numpy(frames).permute(0, 3, 1, 2), 4)
    expected = torch.round(out.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(made.astype(int) - expected.astype(int)).max() <= 1


def test_upscale_2x_is_the_4x_models_output_area_resized():
    model, frame = tiny_rrdbnet(), _frames(1)
    two = np.stack(list(rrdbnet.upscale(model, frame, 2, CPU, torch.float32)))
    with torch.inference_mode():
        four = model(torch.from_numpy(frame).permute(0, 3, 1, 2))
    resized = torch.nn.functional.interpolate(four, scale_factor=0.5, mode="area")
    expected = torch.round(resized.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.abs(two.astype(int) - expected.numpy().astype(int)).max() <= 1


def test_a_native_2x_model_upscales_2x_and_refuses_4x():
    two = rrdbnet.RRDBNet(features=8, blocks=1, growth=4, scale=2)
    assert rrdbnet.rrdbnet_for(two.state_dict()).scale == 2
    postprocessor = Postprocessor(upscaler=two.eval(), device=CPU)
    frames = postprocessor.apply(_frames(1), 8, postprocessor.check("none", "2x")).array()
    assert frames.shape == (1, HEIGHT * 2, WIDTH * 2, 3)
    with pytest.raises(InputError, match="upscales 2x at most"):
        postprocessor.check("none", "4x")


def test_tiles_with_enough_overlap_give_the_untiled_result():
    """The tiny model sees about 20 input pixels around each one; 24 of overlap covers that."""
    model, image = tiny_rrdbnet(), torch.rand(1, 3, HEIGHT, WIDTH)
    with torch.inference_mode():
        whole = model(image)
    tiled = rrdbnet.upscale_tiled(model, image, tile=16, overlap=24)
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_tiles_without_overlap_show_seams():
    """The comparison above can fail: without overlap, tile borders miss their neighbours."""
    model, image = tiny_rrdbnet(), torch.rand(1, 3, HEIGHT, WIDTH)
    with torch.inference_mode():
        whole = model(image)
    seams = rrdbnet.upscale_tiled(model, image, tile=16, overlap=0)
    assert not torch.allclose(seams, whole, atol=1e-3)


def test_both_steps_upscale_then_interpolate(postprocessor):
    output = postprocessor.apply(_frames(2), 8, Steps(interpolate=2, upscale=2))
    assert output.array().shape == (3, HEIGHT * 2, WIDTH * 2, 3)
    assert output.fps == 16


def test_step_times_are_each_steps_own_share_of_making_the_frames(postprocessor):
    recorded: dict[str, float] = {}
    output = postprocessor.apply(
        _frames(2), 8, Steps(interpolate=2, upscale=2), recorded.__setitem__
    )
    started = time.monotonic()
    for _ in output:
        time.sleep(0.05)  # the encoder's share, not the steps'
    reading = time.monotonic() - started
    assert set(recorded) == {"upscale_seconds", "interpolate_seconds"}
    assert min(recorded.values()) > 0
    assert sum(recorded.values()) == pytest.approx(output.seconds, abs=0.002)
    assert output.seconds <= reading - 3 * 0.05


def test_both_steps_make_each_frame_only_when_it_is_read(postprocessor):
    """As the encoder reads them, so the video is never held whole: 161 frames of 1.5
    upscaled 4x and interpolated 4x would be 32 GB."""
    upscaled: list[int] = []
    hook = postprocessor.upscaler.register_forward_hook(lambda *_: upscaled.append(1))
    try:
        output = iter(postprocessor.apply(_frames(9), 8, Steps(interpolate=4, upscale=4)))
        assert len(upscaled) == 0
        next(output)  # generated frame 0
        assert len(upscaled) == 1
        next(output)  # the first between frames 0 and 1
        assert len(upscaled) == 2
        assert sum(1 for _ in output) == 31
        assert len(upscaled) == 9
    finally:
        hook.remove()


def test_streamed_frames_equal_each_step_run_on_all_frames(postprocessor):
    frames = _frames(3)
    streamed = postprocessor.apply(frames, 8, Steps(interpolate=2, upscale=2)).array()
    upscaled = postprocessor.apply(frames, 8, Steps(upscale=2)).array()
    expected = postprocessor.apply(upscaled, 8, Steps(interpolate=2)).array()
    np.testing.assert_array_equal(streamed, expected)


class Cancelled(Exception):
    """A cancel as a rank's progress check raises it."""


def _tensors() -> list[torch.Tensor]:
    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]


def _kept_since(before: list[torch.Tensor], height: int, width: int) -> list[tuple]:
    """Tensors made since `before` and alive now, but 8-bit (height, width, 3) frames as the
    encoder gets them: on a GPU `.cpu()` copies those to the host; on a CPU it is the tensor
    itself, which the frame's array keeps."""
    seen = {id(o) for o in before}
    return [
        (tuple(o.shape), o.dtype)
        for o in _tensors()
        if id(o) not in seen and not (o.dtype == torch.uint8 and o.shape[-3:] == (height, width, 3))
    ]


STEPS = [Steps(upscale=2), Steps(interpolate=2), Steps(interpolate=4, upscale=2)]


@pytest.mark.parametrize("steps", STEPS, ids=str)
def test_no_tensor_stays_alive_between_frames_while_the_encoder_has_one(postprocessor, steps):
    """The encoder reads a frame, encodes it, then asks for the next. Where it fails between
    (a cancel lands in its loop), its traceback keeps the unread frames' generators while
    the error is held: the upscale's last frame and RIFE's kept frame stayed on the GPU."""
    before = _tensors()
    output = postprocessor.apply(_frames(3), 8, steps, lambda name, value: None)
    frames = iter(output)
    for _ in range(len(output)):
        next(frames)
        assert _kept_since(before, HEIGHT * steps.upscale, WIDTH * steps.upscale) == []


@pytest.mark.parametrize("steps", STEPS, ids=str)
def test_a_cancel_while_the_frames_are_made_keeps_no_tensor_in_its_traceback(postprocessor, steps):
    """Until the error is dropped (Cog holds it while it reports it), its traceback's frames
    hold their locals: the upscaled frame's tensors stayed on the GPU with it."""
    calls = []

    def cancel_the_second(*_):
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    before = _tensors()
    output = postprocessor.apply(_frames(3), 8, steps, lambda name, value: None, cancel_the_second)
    with pytest.raises(Cancelled) as raised:
        output.array()
    assert raised.value.__traceback__ is not None
    assert _kept_since(before, HEIGHT * steps.upscale, WIDTH * steps.upscale) == []


def test_a_long_step_logs_where_it_is(postprocessor, monkeypatch, caplog):
    monkeypatch.setattr(postprocess, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        postprocessor.apply(_frames(3), 8, Steps(interpolate=2)).array()
    assert "interpolate: 1/2 frame pairs, " in caplog.text


def test_a_long_steps_progress_lines_end_before_its_last_pair(postprocessor, monkeypatch, caplog):
    """The step's own line says when it is done: a "2/2" before it would say nothing new."""
    monkeypatch.setattr(postprocess, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        postprocessor.apply(_frames(3), 8, Steps(interpolate=2)).array()
    assert "interpolate: 1/2 frame pairs" in caplog.text
    assert "2/2 frame pairs" not in caplog.text


def test_no_step_leaves_the_frames_untouched(postprocessor):
    source = _frames(2)
    output = postprocessor.apply(source, 8, Steps())
    assert output.array() is source and output.fps == 8


def test_a_step_the_deployment_did_not_enable_is_refused_naming_its_variable():
    bare = Postprocessor()
    with pytest.raises(InputError, match="COGVIDEOX_INTERPOLATE=1"):
        bare.check("2x", "none")
    with pytest.raises(InputError, match="COGVIDEOX_UPSCALE=1"):
        bare.check("none", "4x")


def test_none_is_always_accepted_and_choices_become_factors(postprocessor):
    assert Postprocessor().check("none", "none") == Steps(1, 1)
    assert postprocessor.check("4x", "2x") == Steps(interpolate=4, upscale=2)


def test_an_unknown_choice_is_refused_with_the_choices(postprocessor):
    with pytest.raises(InputError, match="interpolate='3x' is not one of: none, 2x, 4x"):
        postprocessor.check("3x", "none")


def test_the_released_layouts_are_read(tmp_path):
    rife_state = read_state_dict(save_tiny_rife(tmp_path / "flownet.pkl"))
    esrgan_state = read_state_dict(save_tiny_realesrgan(tmp_path / "x4plus.pth"))
    assert "block0.conv0.0.0.weight" in rife_state  # "module." stripped
    assert "conv_first.weight" in esrgan_state  # "params_ema" unwrapped
    assert rife.widths_of(rife_state) == (16, 16, 8, 8, 8)
    assert rrdbnet.rrdbnet_for(esrgan_state).scale == 4


def test_safetensors_weights_are_read(tmp_path):
    from safetensors.torch import save_file

    save_file(tiny_rrdbnet().state_dict(), tmp_path / "x4.safetensors")
    state = read_state_dict(tmp_path / "x4.safetensors")
    assert _build_rrdbnet(state).scale == 4


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"conv_first.weight": _RunsCode()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)
    assert "unpickled" not in capsys.readouterr().out


def test_weights_of_the_other_model_are_refused_saying_what_they_are_not(tmp_path, monkeypatch):
    """The two files swapped. Before, the message held only a quoted key: "Real-ESRGAN weights
    from ... are not usable: 'conv_first.weight'."."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_rife(tmp_path / "flownet.pkl")))
    monkeypatch.setenv("COGVIDEOX_INTERPOLATE_URL", str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    esrgan = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    with pytest.raises(WeightsError, match=r"not an RRDBNet \(Real-ESRGAN\) state dict"):
        load_model(esrgan, _build_rrdbnet)
    rife_source = _source("RIFE", "COGVIDEOX_INTERPOLATE_URL", "UNSET_SHA256", "unused")
    with pytest.raises(WeightsError, match=r"not a RIFE v4\.25/v4\.26 IFNet state dict"):
        load_model(rife_source, _build_ifnet)


def test_a_1x_model_fails_setup_as_it_enlarges_nothing(tmp_path, monkeypatch):
    """Loaded, it made a deployment that offered upscale and refused both 2x and 4x, in every
    request, as "upscales 1x at most"."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "x1.pth"
    torch.save(rrdbnet.RRDBNet(features=8, blocks=1, growth=4, scale=1).state_dict(), weights)
    monkeypatch.setenv(UPSCALE_URL_ENV, str(weights))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    with pytest.raises(WeightsError, match=f"1x model.*2x or 4x.*{UPSCALE_URL_ENV}"):
        load_model(source, _build_rrdbnet)


def test_setup_caches_the_file_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    load_model(source, _build_rrdbnet)
    (tmp_path / "x4.pth").unlink()  # a second setup needs only the cache
    assert load_model(source, _build_rrdbnet).scale == 4
    assert len(list((tmp_path / "cache" / "postprocess").glob("*/x4.pth"))) == 1


def test_a_local_file_replaced_at_its_path_is_copied_again(tmp_path, monkeypatch, caplog):
    """New weights baked into an image at the same path, the cache on a volume that outlived
    the old image: the old copy was used, the new file never read, and nothing said so."""
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "realesrgan.pth"
    torch.save(rrdbnet.RRDBNet(features=8, blocks=1, growth=4, scale=4).state_dict(), weights)
    monkeypatch.setenv(UPSCALE_URL_ENV, str(weights))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    assert load_model(source, _build_rrdbnet).scale == 4
    torch.save(rrdbnet.RRDBNet(features=8, blocks=1, growth=4, scale=2).state_dict(), weights)
    assert load_model(source, _build_rrdbnet).scale == 2
    assert "changed since it was cached" in caplog.text
    assert len(list((tmp_path / "cache" / "postprocess").glob("*/realesrgan.pth"))) == 1


def test_leftovers_of_a_killed_delete_beside_the_file_are_removed(tmp_path, monkeypatch):
    """A delete killed between its rename and its rmtree leaves a trash folder, never read:
    the next fetch removes it, as for the video weights."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    load_model(source, _build_rrdbnet)
    folder = tmp_path / "cache" / "postprocess"
    [entry] = [p for p in folder.iterdir() if not p.name.startswith(".")]
    for leftover in (f".{entry.name}.trash-456", f".{entry.name}.staging.trash-789"):
        (folder / leftover / "x4.pth").parent.mkdir(parents=True)
    shutil.rmtree(entry)  # fetched again
    load_model(source, _build_rrdbnet)
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry.name, f".{entry.name}.lock"])


@pytest.fixture
def x4_server(tmp_path) -> Iterator[FileServer]:
    """A tiny Real-ESRGAN x4 file over loopback HTTP."""
    host = tmp_path / "host"
    host.mkdir()
    save_tiny_realesrgan(host / "x4.pth")
    server = FileServer(host)
    yield server
    server.stop()


def test_a_renewed_presigned_url_reuses_the_cached_file_and_logs_no_signature(
    x4_server, tmp_path, monkeypatch, caplog
):
    """A presigned URL expires (S3's within 7 days); renewed, it names the same file."""
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    signed = x4_server.url("x4.pth") + "?X-Amz-Expires=604800&X-Amz-Signature="
    monkeypatch.setenv(UPSCALE_URL_ENV, signed + "sig-one")
    load_model(_source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET", "unused"), _build_rrdbnet)
    fetched = len(x4_server.requests)
    monkeypatch.setenv(UPSCALE_URL_ENV, signed + "sig-two")
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET", "unused")
    assert load_model(source, _build_rrdbnet).scale == 4
    assert len(x4_server.requests) == fetched  # from the cache
    [entry] = (tmp_path / "cache" / "postprocess").glob("real-esrgan-*")
    assert "X-Amz-Signature" not in (entry / COMPLETE_MARKER).read_text()
    assert "sig-one" not in caplog.text


def test_the_default_files_are_pinned_so_a_replaced_release_file_fails_setup(
    x4_server, tmp_path, monkeypatch
):
    """A release asset can be replaced, and a file of the same shapes loaded without a word:
    the default URLs had no sha256. The default URL is served here by the loopback server."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COGVIDEOX_UPSCALE", "1")
    for name in ("COGVIDEOX_INTERPOLATE", UPSCALE_URL_ENV, "COGVIDEOX_UPSCALE_SHA256"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(postprocess, "DEFAULT_ESRGAN_URL", x4_server.url("x4.pth"))
    with pytest.raises(
        WeightsError, match=f"not the [0-9a-f]{{64}} that the default {UPSCALE_URL_ENV}"
    ):
        Postprocessor.from_env(CPU)
    assert not list((tmp_path / "cache" / "postprocess").glob("real-esrgan-*/x4.pth"))
    served = sha256_file(x4_server.directory / "x4.pth").hexdigest()
    monkeypatch.setenv("COGVIDEOX_UPSCALE_SHA256", served)  # the operator pins another file
    assert Postprocessor.from_env(CPU).offer.upscale == 4


def test_a_url_with_its_scheme_in_capitals_is_downloaded(x4_server, tmp_path, monkeypatch):
    """A scheme is case-insensitive (RFC 3986). Taken for a path, the URL was refused with
    an error quoting all of it, a presigned URL's signature included."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    url = x4_server.url("x4.pth") + "?X-Amz-Signature=0123456789abcdef"
    monkeypatch.setenv(UPSCALE_URL_ENV, url.replace("http://", "HTTP://", 1))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET", "unused")
    assert load_model(source, _build_rrdbnet).scale == 4


def test_a_read_only_cache_that_needs_the_file_says_so_as_for_the_video_weights(
    x4_server, tmp_path, monkeypatch
):
    """As root (the Cog image's user) a read-only mount is the kernel's EROFS, which only
    os.access reports before a write: it stands in here for such a mount. Before, setup
    failed with a bare OSError making the cache's folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(cache))
    monkeypatch.setenv(UPSCALE_URL_ENV, x4_server.url("x4.pth"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != cache and real_access(p, mode))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET", "unused")
    with pytest.raises(WeightsError, match=r"weights cache .* is not writable.*Mount it"):
        load_model(source, _build_rrdbnet)
    assert list(cache.iterdir()) == []


def _failing_once(build):
    """build, but its first call fails as a copy with bit rot does."""
    calls = []

    def failing_once(state):
        calls.append(state)
        if len(calls) == 1:
            raise ValueError("bit rot")
        return build(state)

    return failing_once


def test_a_rank_whose_cached_copy_failed_keeps_the_copy_another_rank_fetched_again(
    x4_server, tmp_path, monkeypatch
):
    """Several GPUs load the same cached file at once. Rank A finds it bad, discards it and
    fetches it again; rank B, which read the same bad copy, must leave A's new one alone: it
    would delete it (maybe while A reads it) and fetch the file once more."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, x4_server.url("x4.pth"))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    load_model(source, _build_rrdbnet)
    one_fetch = len(x4_server.requests)
    rank_a = []

    def rank_b(state):
        if not rank_a:  # rank A heals the cache while rank B reads the bad copy
            rank_a.append(load_model(source, _failing_once(_build_rrdbnet)))
            raise ValueError("bit rot")
        return _build_rrdbnet(state)

    assert load_model(source, rank_b).scale == 4
    assert len(x4_server.requests) == 2 * one_fetch  # rank A's fetch, and no other


def test_bad_weights_fail_setup_and_leave_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "flownet.pkl"
    bad.write_bytes(b"<html>not found</html>")
    monkeypatch.setenv("COGVIDEOX_INTERPOLATE_URL", str(bad))
    source = _source("RIFE", "COGVIDEOX_INTERPOLATE_URL", "UNSET_SHA256", "unused")
    with pytest.raises(WeightsError, match="COGVIDEOX_INTERPOLATE_URL"):
        load_model(source, _build_ifnet)
    assert not list((tmp_path / "cache" / "postprocess").glob("rife-*/*"))


def _load_from_a_url_that_answers_404(tmp_path, monkeypatch) -> WeightsError:
    """The error of loading the upscaler from a URL of the test's server that has no file."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    server = FileServer(tmp_path)
    try:
        monkeypatch.setenv(UPSCALE_URL_ENV, server.url("RealESRGAN_x4plus.pth"))
        source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
        with pytest.raises(WeightsError) as failed:
            load_model(source, _build_rrdbnet)
    finally:
        server.stop()
    return failed.value


def test_a_url_that_cannot_be_downloaded_fails_setup_naming_the_variable(tmp_path, monkeypatch):
    error = _load_from_a_url_that_answers_404(tmp_path, monkeypatch)
    assert re.search(f"404.*{UPSCALE_URL_ENV}", str(error))


def test_a_pinned_sha256_that_differs_fails_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    monkeypatch.setenv("COGVIDEOX_UPSCALE_SHA256", "0" * 64)
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "COGVIDEOX_UPSCALE_SHA256", "unused")
    with pytest.raises(WeightsError, match="COGVIDEOX_UPSCALE_SHA256"):
        load_model(source, _build_rrdbnet)


def test_a_pinned_sha256_in_capitals_is_the_same_pin(tmp_path, monkeypatch):
    """Tools on Windows print sha256 in capitals; the pin must still match the cache."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    weights = save_tiny_realesrgan(tmp_path / "x4.pth")
    monkeypatch.setenv(UPSCALE_URL_ENV, str(weights))
    monkeypatch.setenv("COGVIDEOX_UPSCALE_SHA256", sha256_file(weights).hexdigest().upper())
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "COGVIDEOX_UPSCALE_SHA256", "unused")
    load_model(source, _build_rrdbnet)
    weights.unlink()  # a second setup needs only the cache
    assert load_model(source, _build_rrdbnet).scale == 4


def test_a_custom_url_without_a_sha256_is_not_held_to_the_default_files_pin(tmp_path, monkeypatch):
    """The pinned sha256 is the default release file's: another file set by its URL loads
    unpinned, as docs/postprocessing.md says, and does not fail setup as a replaced release."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    source = _source(
        "Real-ESRGAN",
        UPSCALE_URL_ENV,
        "UNSET_SHA256",
        postprocess.DEFAULT_ESRGAN_URL,
        postprocess.DEFAULT_ESRGAN_SHA256,
    )
    assert source.sha256 is None
    assert load_model(source, _build_rrdbnet).scale == 4


def test_weights_missing_a_parameter_fail_setup_naming_it(tmp_path, monkeypatch):
    """Loaded, the missing layer would keep its random initial weights: every upscaled frame
    noise, without an error."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    state = tiny_rrdbnet().state_dict()
    del state["conv_hr.weight"]
    torch.save(state, tmp_path / "x4.pth")
    monkeypatch.setenv(UPSCALE_URL_ENV, str(tmp_path / "x4.pth"))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    with pytest.raises(WeightsError, match=r"1 parameters missing, e\.g\. conv_hr\.weight"):
        load_model(source, _build_rrdbnet)


def test_a_file_with_both_basicsr_wrappers_gives_the_ema_weights(tmp_path):
    """A BasicSR training checkpoint holds both; Real-ESRGAN's inference takes params_ema."""
    ema, raw = tiny_rrdbnet(seed=0).state_dict(), tiny_rrdbnet(seed=1).state_dict()
    torch.save({"params": raw, "params_ema": ema}, tmp_path / "net_g.pth")
    state = read_state_dict(tmp_path / "net_g.pth")
    assert torch.equal(state["conv_first.weight"], ema["conv_first.weight"])


@pytest.mark.parametrize("check", ["pinned sha256", "COGVIDEOX_WEIGHTS_CHECK=sha256"])
def test_a_cached_copy_replaced_by_other_weights_of_its_size_is_fetched_again(
    tmp_path, monkeypatch, check
):
    """A pinned file is checked on each setup, not only when downloaded; with
    COGVIDEOX_WEIGHTS_CHECK=sha256 an unpinned one is too, against the sha256 it was
    fetched with, as for the video weights. A copy replaced in the cache by other weights of
    the same size is not loaded."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    weights = save_tiny_realesrgan(tmp_path / "x4.pth")
    monkeypatch.setenv(UPSCALE_URL_ENV, str(weights))
    if check == "pinned sha256":
        monkeypatch.setenv("COGVIDEOX_UPSCALE_SHA256", sha256_file(weights).hexdigest())
        source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "COGVIDEOX_UPSCALE_SHA256", "unused")
    else:
        monkeypatch.setenv("COGVIDEOX_WEIGHTS_CHECK", "sha256")
        source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    fetched = load_model(source, _build_rrdbnet).conv_first.weight.detach().clone()
    (cached,) = (tmp_path / "cache" / "postprocess").glob("*/x4.pth")
    other = tmp_path / "other" / "x4.pth"  # the same name: torch.save writes it inside
    other.parent.mkdir()
    torch.save({"params_ema": tiny_rrdbnet(seed=1).state_dict()}, other)
    assert other.stat().st_size == cached.stat().st_size
    shutil.copyfile(other, cached)
    assert torch.equal(load_model(source, _build_rrdbnet).conv_first.weight, fetched)


def test_a_downloaded_file_that_fails_to_load_is_not_downloaded_again(tmp_path, monkeypatch):
    """Fetched just now, it is what the URL serves: a second download would fail the same."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "x4.pth").write_bytes(b"<html>not found</html>")
    server = FileServer(tmp_path / "served")
    try:
        monkeypatch.setenv(UPSCALE_URL_ENV, server.url("x4.pth"))
        source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
        with pytest.raises(WeightsError, match=UPSCALE_URL_ENV):
            load_model(source, _build_rrdbnet)
    finally:
        server.stop()
    probes = [r for r in server.requests if r == ("GET", "x4.pth", "bytes=0-0")]
    assert len(probes) == 1


def test_a_cached_copy_that_fails_and_its_fetch_again_too_leaves_nothing_cached(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    load_model(source, _build_rrdbnet)

    def refuse(state):
        raise ValueError("not this architecture")

    with pytest.raises(WeightsError, match="not this architecture"):
        load_model(source, refuse)
    assert not list((tmp_path / "cache" / "postprocess").glob("real-esrgan-*/x4.pth"))


def test_a_file_with_entries_other_than_tensors_is_refused(tmp_path):
    """A training checkpoint's step count or optimizer beside the weights: not a plain state
    dict, so not a file an operator can be sure is the released one."""
    state = {**tiny_rrdbnet().state_dict(), "iteration": 400_000}
    torch.save(state, tmp_path / "net_g.pth")
    with pytest.raises(ValueError, match="no state dict of tensors"):
        read_state_dict(tmp_path / "net_g.pth")


def test_a_cached_copy_of_another_size_is_fetched_again_not_loaded(tmp_path, monkeypatch):
    """Unpinned, the size in the marker is what tells the copy from other weights that load
    as well."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    load_model(source, _build_rrdbnet)
    (cached,) = (tmp_path / "cache" / "postprocess").glob("*/x4.pth")
    torch.save(rrdbnet.RRDBNet(features=8, blocks=1, growth=4, scale=2).state_dict(), cached)
    assert load_model(source, _build_rrdbnet).scale == 4


def test_a_local_file_unchanged_since_it_was_cached_is_not_copied_again(
    tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    load_model(source, _build_rrdbnet)
    caplog.clear()
    load_model(source, _build_rrdbnet)
    assert "Real-ESRGAN: using cached" in caplog.text
    assert "ready in" not in caplog.text


def test_a_download_that_fails_leaves_no_staging_folder(tmp_path, monkeypatch):
    _load_from_a_url_that_answers_404(tmp_path, monkeypatch)
    assert not [
        p.name for p in (tmp_path / "cache" / "postprocess").iterdir() if "staging" in p.name
    ]


def test_interpolate_enabled_loads_rife_from_its_url_and_offers_it(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(INTERPOLATE_ENV, "1")
    monkeypatch.setenv(INTERPOLATE_URL_ENV, str(save_tiny_rife(tmp_path / "flownet.pkl")))
    monkeypatch.delenv(UPSCALE_ENV, raising=False)
    postprocessor = Postprocessor.from_env(CPU)
    assert postprocessor.offer == Offer(interpolate=True, upscale=None)
    assert rife.widths_of(postprocessor.interpolator.state_dict()) == TINY_RIFE_WIDTHS


def test_an_enabling_value_other_than_0_or_1_fails_setup_naming_the_variable(monkeypatch):
    """COGVIDEOX_UPSCALE=true taken as off would leave a deployment refusing every upscale
    its operator meant to offer."""
    monkeypatch.setenv("COGVIDEOX_UPSCALE", "true")
    with pytest.raises(ConfigError, match=r"COGVIDEOX_UPSCALE='true': use 1 to enable"):
        Postprocessor.from_env(CPU)


def test_a_pinned_sha256_that_is_not_one_is_refused(monkeypatch):
    monkeypatch.setenv("COGVIDEOX_UPSCALE_SHA256", "abc123")
    with pytest.raises(ConfigError, match=r"COGVIDEOX_UPSCALE_SHA256='abc123': give the file"):
        _source("Real-ESRGAN", UPSCALE_URL_ENV, "COGVIDEOX_UPSCALE_SHA256", "unused")


def test_a_url_with_a_password_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.setenv(UPSCALE_URL_ENV, "https://user:hunter2@127.0.0.1/RealESRGAN_x4plus.pth")
    with pytest.raises(ConfigError, match="holds a user name or password") as refused:
        _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    assert UPSCALE_URL_ENV in str(refused.value)
    assert "hunter2" not in str(refused.value)


def _released_esrgan_layout(scale: int) -> dict[str, tuple[int, ...]]:
    """BasicSR's RRDBNet(num_feat=64, num_block=23, num_grow_ch=32): RealESRGAN_x4plus/x2plus."""
    layout = {"conv_first.weight": (64, 3 * (4 // scale) ** 2, 3, 3), "conv_first.bias": (64,)}
    for block in range(23):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                out = 64 if conv == 5 else 32
                name = f"body.{block}.rdb{rdb}.conv{conv}"
                layout[f"{name}.weight"] = (out, 64 + 32 * (conv - 1), 3, 3)
                layout[f"{name}.bias"] = (out,)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        layout[f"{name}.weight"], layout[f"{name}.bias"] = (64, 64, 3, 3), (64,)
    layout["conv_last.weight"], layout["conv_last.bias"] = (3, 64, 3, 3), (3,)
    return layout


def _released_rife_layout(
    widths: tuple[int, ...] = (192, 128, 96, 64, 32),
) -> dict[str, tuple[int, ...]]:
    """Practical-RIFE v4.25/v4.26 IFNet: a Head of 16 channels giving 4, five IFBlocks."""
    layout = {}
    for i, (cin, cout) in enumerate(((3, 16), (16, 16), (16, 16))):
        layout[f"encode.cnn{i}.weight"], layout[f"encode.cnn{i}.bias"] = (cout, cin, 3, 3), (cout,)
    layout["encode.cnn3.weight"], layout["encode.cnn3.bias"] = (16, 4, 4, 4), (4,)  # transposed
    for i, (inputs, c) in enumerate(zip((15, 28, 28, 28, 28), widths, strict=True)):
        block = f"block{i}"
        layout[f"{block}.conv0.0.0.weight"] = (c // 2, inputs, 3, 3)
        layout[f"{block}.conv0.0.0.bias"] = (c // 2,)
        layout[f"{block}.conv0.1.0.weight"], layout[f"{block}.conv0.1.0.bias"] = (
            (c, c // 2, 3, 3),
            (c,),
        )
        for k in range(8):
            layout[f"{block}.convblock.{k}.conv.weight"] = (c, c, 3, 3)
            layout[f"{block}.convblock.{k}.conv.bias"] = (c,)
            layout[f"{block}.convblock.{k}.beta"] = (1, c, 1, 1)
        layout[f"{block}.lastconv.0.weight"], layout[f"{block}.lastconv.0.bias"] = (
            (c, 52, 4, 4),
            (52,),
        )
    return layout


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("scale", [4, 2])
def test_the_released_realesrgan_layout_is_the_full_size_model(scale):
    """Every name and shape of RealESRGAN_x4plus.pth (16,697,987 parameters) or x2plus."""
    layout = _released_esrgan_layout(scale)
    with torch.device("meta"):
        model = rrdbnet.rrdbnet_for({k: torch.empty(s) for k, s in layout.items()})
    assert model.scale == scale
    assert _shapes(model) == layout
    if scale == 4:
        assert sum(np.prod(shape) for shape in layout.values()) == 16_697_987


def test_the_released_rife_layout_is_the_full_size_model():
    """Every name and shape of flownet.pkl v4.25/v4.26, less its "module." prefix."""
    layout = _released_rife_layout()
    state = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    assert rife.widths_of(state) == rife.RELEASE_WIDTHS
    with torch.device("meta"):
        model = rife.IFNet(rife.widths_of(state))
    assert _shapes(model) == layout
    assert sum(np.prod(shape) for shape in layout.values()) == 5_664_776


def test_rife_lite_weights_are_refused_not_run_at_the_wrong_scales():
    """v4.25 lite has v4.26's names and shapes but a narrower last block; its blocks work at
    1/32 ... 1/4 and 1/1, so run at v4.26's scales it would give wrong frames silently."""
    layout = _released_rife_layout(widths=(192, 128, 96, 64, 24))
    state = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    with pytest.raises(ValueError, match=r"v4\.25 lite"):
        _build_ifnet(state)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_an_rrdbnet_state_dict_gives_the_scale_it_was_trained_at(scale):
    """Its first convolution's channels say it: 3 (4x), 12 (2x) or 48 (1x, pixel-unshuffled)."""
    state = rrdbnet.RRDBNet(features=8, blocks=1, growth=4, scale=scale).state_dict()
    assert rrdbnet.rrdbnet_for(state).scale == scale


def test_a_partial_tile_counts_as_a_whole_one():
    """A 480x720 frame in 256-pixel tiles is 2x3 tiles, as the log reports it."""
    assert rrdbnet.tiles_per_frame(480, 720) == 6


def test_upscale_reports_each_frame_done_out_of_all():
    seen = []
    frames = rrdbnet.upscale(
        tiny_rrdbnet(), _frames(3), 4, CPU, torch.float32, on_frame=lambda *step: seen.append(step)
    )
    assert len(list(frames)) == 3
    assert seen == [(1, 3), (2, 3), (3, 3)]


def _nearest_share(made: np.ndarray, values: torch.Tensor) -> float:
    """How many of the 8-bit pixels are `values` (floats in [0, 1]) rounded to the nearest."""
    expected = torch.round(values.clamp(0, 1) * 255).to(torch.uint8).numpy()
    return float((made == expected).mean())


def test_upscaled_pixels_are_rounded_to_the_nearest_8_bit_value():
    """As the encoder rounds a float frame: truncated, the video darkens by half a level and
    every test that allows one level of difference still passes."""
    model, frames = tiny_rrdbnet(), _frames(1)
    with torch.no_grad():  # random outputs fall mostly outside [0, 1], where both give 0 or 255
        model.conv_last.weight *= 0.05
        model.conv_last.bias.fill_(0.5)
    made = np.stack(list(rrdbnet.upscale(model, frames, 4, CPU, torch.float32)))
    with torch.inference_mode():
        out = model(torch.from_numpy(frames).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert _nearest_share(made, out) > 0.99


def test_interpolated_pixels_are_rounded_to_the_nearest_8_bit_value():
    model, frames = tiny_ifnet(), _frames(2)
    made = Postprocessor(interpolator=model, device=CPU).apply(frames, 8, Steps(interpolate=2))
    img0, img1 = (
        F.pad(torch.from_numpy(frames[i]).permute(2, 0, 1)[None], (0, 16, 0, 32), mode="replicate")
        for i in (0, 1)
    )
    with torch.inference_mode():
        middle = model(img0, img1, torch.full((1, 1, 64, 64), 0.5))
    middle = middle[:, :, :HEIGHT, :WIDTH].permute(0, 2, 3, 1)
    assert _nearest_share(made.array()[1:2], middle) > 0.99


def test_kept_frames_out_of_range_are_clipped_as_the_encoder_clips_them():
    """A float frame a little outside [0, 1] is clipped, not wrapped around: -0.02 is black,
    not 8-bit 251, as encode_mp4 writes it when no step runs."""
    frames = np.stack([np.full((HEIGHT, WIDTH, 3), -0.02), np.full((HEIGHT, WIDTH, 3), 1.03)])
    made = Postprocessor(interpolator=tiny_ifnet(), device=CPU).apply(
        frames.astype(np.float32), 8, Steps(interpolate=2)
    )
    kept = made.array()[[0, 2]]
    assert (kept[0] == 0).all() and (kept[1] == 255).all()


def test_a_pair_is_reported_done_only_once_its_frames_are_made():
    """The progress line's "1/2 frame pairs" and a rank's cancel check come after the pair's
    work, so a cancel during a pair is seen as soon as it is done."""
    model, forwards, reported = tiny_ifnet(), [], []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        Postprocessor(interpolator=model, device=CPU).apply(
            _frames(3),
            8,
            Steps(interpolate=2),
            lambda name, value: None,
            lambda: reported.append(len(forwards)),
        ).array()
    finally:
        hook.remove()
    assert reported == [1, 2]


def test_an_upscaled_frame_is_reported_done_before_the_encoder_gets_it():
    """The count says the frames handed over: with the report after the hand-over, the last
    frame was never reported unless the encoder asked for one more."""
    seen = []
    frames = rrdbnet.upscale(
        tiny_rrdbnet(), _frames(2), 4, CPU, torch.float32, on_frame=lambda *step: seen.append(step)
    )
    next(frames)
    assert seen == [(1, 2)]


class _Clock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_progress_lines_come_at_most_every_progress_interval(monkeypatch, caplog):
    """One line per PROGRESS_EVERY_S, however many frames are done between: a line per frame
    once the first interval passed would flood the log of a long upscale."""
    clock = _Clock()
    monkeypatch.setattr(postprocess, "time", clock)
    progress = postprocess._Progress("upscale", "frames")
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        for done, now in enumerate((101.0, 102.5, 103.0, 104.0, 104.6, 105.0), 1):
            clock.now = now
            progress(done, 10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upscale:")]
    assert lines == ["upscale: 2/10 frames, 2.5 s elapsed", "upscale: 5/10 frames, 4.6 s elapsed"]


def test_a_file_with_basicsrs_params_wrapper_alone_is_read(tmp_path):
    """BasicSR saves a model trained without EMA under "params" only."""
    state = tiny_rrdbnet().state_dict()
    torch.save({"params": state}, tmp_path / "net_g.pth")
    assert torch.equal(
        read_state_dict(tmp_path / "net_g.pth")["conv_first.weight"], state["conv_first.weight"]
    )


def test_a_local_path_under_the_home_folder_is_read(tmp_path, monkeypatch):
    """~/ in a *_URL is the user's home, as a shell would read it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    save_tiny_realesrgan(tmp_path / "home" / "x4.pth")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, "~/x4.pth")
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    assert load_model(source, _build_rrdbnet).scale == 4


def test_a_source_neither_a_url_nor_a_file_fails_setup_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(tmp_path / "missing.pth"))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    with pytest.raises(WeightsError, match=f"{UPSCALE_URL_ENV}=.* neither an http"):
        load_model(source, _build_rrdbnet)
    assert list((tmp_path / "cache" / "postprocess").glob("*/*")) == []


def test_a_file_over_the_size_cap_fails_setup_naming_the_variable(x4_server, tmp_path, monkeypatch):
    """Anything that large is not a frame model (a video weights file by mistake): the download
    stops at the cap, and nothing is cached."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(postprocess.weights, "MAX_BYTES", 1000)
    monkeypatch.setenv(UPSCALE_URL_ENV, x4_server.url("x4.pth"))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    with pytest.raises(WeightsError, match=f"over .*not a frame model; check {UPSCALE_URL_ENV}"):
        load_model(source, _build_rrdbnet)
    assert list((tmp_path / "cache" / "postprocess").glob("*/*")) == []


def test_every_setting_is_read_before_the_first_download(x4_server, tmp_path, monkeypatch):
    """A mistyped COGVIDEOX_UPSCALE_SHA256 fails setup at once, not after RIFE's download."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(INTERPOLATE_ENV, "1")
    monkeypatch.setenv(INTERPOLATE_URL_ENV, x4_server.url("flownet.pkl"))
    monkeypatch.setenv(UPSCALE_ENV, "1")
    monkeypatch.setenv("COGVIDEOX_UPSCALE_SHA256", "abc123")
    with pytest.raises(ConfigError, match="COGVIDEOX_UPSCALE_SHA256='abc123'"):
        Postprocessor.from_env(CPU)
    assert x4_server.requests == []


def test_a_staging_folder_a_killed_setup_left_is_replaced(tmp_path, monkeypatch):
    """Killed mid-download, a setup leaves its staging folder; the next one starts it anew."""
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(tmp_path / "x4.pth")))
    source = _source("Real-ESRGAN", UPSCALE_URL_ENV, "UNSET_SHA256", "unused")
    load_model(source, _build_rrdbnet)
    folder = tmp_path / "cache" / "postprocess"
    [entry] = [p for p in folder.iterdir() if not p.name.startswith(".")]
    shutil.rmtree(entry)
    (folder / f".{entry.name}.staging").mkdir()
    (folder / f".{entry.name}.staging" / "x4.pth").write_bytes(b"half a download")
    assert load_model(source, _build_rrdbnet).scale == 4
    assert not (folder / f".{entry.name}.staging").exists()
