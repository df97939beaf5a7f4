"""The GPU benchmark harness, run at tiny size on the CPU: every phase measured, numbers finite."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common, pipeline_speed, rife_memory
from cogvideox_cog.devtools.openapi import build_schema
from cogvideox_cog.inputs import RESOLUTION_ENV
from tests.markers import needs_cpp_compiler

ROOT = Path(__file__).resolve().parent.parent
PHASES = (
    "text_encode_s",
    "denoise_s",
    "vae_decode_s",
    "postprocess_s",
    "encode_mp4_s",
    "other_s",
    "total_s",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The harness in this process (torch and diffusers are imported already; a subprocess
    would spend most of the test importing them again)."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--size",
        "tiny",
        "--steps",
        "2",
        "--frames",
        "9",
        "--offload",
        "none",
        "--tiling",
        "on,off",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pipeline_speed.main(argv) == 0
    return out, printed.getvalue()


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_writes_one_json_per_run_and_a_markdown_table(run):
    out, stdout = run
    assert sorted(p.name for p in out.iterdir()) == ["cogvideox-5b-tiny-none.json", "results.md"]
    table = (out / "results.md").read_text()
    assert "| cogvideox-5b | tiny | none | 2 | 9x48x80 |" in table
    # The table is also the last thing printed.
    assert "| cogvideox-5b | tiny | none | 2 |" in stdout.strip().splitlines()[-1]


def test_a_projection_counts_the_first_steps_one_time_cost_once():
    """With offload the first step moves the transformer in: 19.3 s of 1.5-5B's, against
    8.4 s for the others. A median of all four counted it in none of the 50, or in all."""
    measured = [19.31, 8.36, 8.37, 8.36]
    assert pipeline_speed.projected_denoise(measured, 50) == pytest.approx(19.31 + 49 * 8.36)


def test_every_phase_is_measured_and_finite(run):
    out, _ = run
    record = json.loads((out / "cogvideox-5b-tiny-none.json").read_text())
    assert "error" not in record
    phases = record["phases"]
    for name in PHASES:
        assert _finite(phases[name]), (name, phases[name])
        if name != "other_s":
            assert phases[name] > 0, name
    measured = sum(phases[name] for name in PHASES if name != "total_s")
    assert math.isclose(measured, phases["total_s"], rel_tol=1e-6)

    steps = record["steps_s"]
    assert len(steps["each"]) == record["steps"] == 2
    assert all(_finite(s) and s > 0 for s in steps["each"])
    assert _finite(steps["median"]) and _finite(steps["first"])
    assert steps["total"] <= phases["denoise_s"] + 1e-9
    assert record["projection"]["steps"] == 50
    assert "PROJECTION" in record["projection"]["label"]
    assert _finite(record["projection"]["total_s"])

    assert record["frames_finite"] is True
    assert _finite(record["host_peak_rss_gib"]) and record["host_peak_rss_gib"] > 0
    assert record["gpu_peak"] is None  # CPU run
    assert record["mp4"]["codec"] == "h264" and record["mp4"]["frames"] == 9

    decodes = {d["tiling"]: d for d in record["decode_again"]}
    assert set(decodes) == {"on", "off"}
    for decode in decodes.values():
        assert "error" not in decode
        assert _finite(decode["seconds"]) and decode["frames_finite"] is True

    env = record["environment"]
    assert env["command"] and env["versions"]["torch"] and env["versions"]["diffusers"]


def test_denoising_time_is_the_sum_of_the_steps_it_reports(run):
    """The denoising phase ends where the last step ended (not when the decode started), and
    the step figures are read from the steps in the order they ran."""
    out, _ = run
    record = json.loads((out / "cogvideox-5b-tiny-none.json").read_text())
    steps = record["steps_s"]
    assert steps["total"] == pytest.approx(record["phases"]["denoise_s"], rel=1e-9)
    assert steps["first"] == steps["each"][0]
    assert steps["median_after_first"] == statistics.median(steps["each"][1:])


def test_a_projected_total_replaces_the_measured_denoising_with_the_projected_one(run):
    out, _ = run
    record = json.loads((out / "cogvideox-5b-tiny-none.json").read_text())
    phases, each = record["phases"], record["steps_s"]["each"]
    expected = phases["total_s"] - phases["denoise_s"] + (each[0] + 49 * each[1])
    assert record["projection"]["total_s"] == pytest.approx(expected, rel=1e-9)


def test_a_run_records_the_vae_tiling_it_ran_with_the_first_one_given(run):
    out, _ = run
    record = json.loads((out / "cogvideox-5b-tiny-none.json").read_text())
    assert record["tiling_in_run"] == "on"


def test_a_projection_from_one_measured_step_repeats_it():
    assert pipeline_speed.projected_denoise([2.5], 50) == pytest.approx(125.0)


def test_a_failed_run_is_recorded_as_an_error_and_fails_the_harness(tmp_path):
    """A run that raises (here a frame count the variant does not take) is written as an
    error record and the harness exits 1, so a GPU run cannot read as complete."""
    argv = ["--size", "tiny", "--steps", "1", "--frames", "10", "--tiling", "on"]
    argv += ["--device", "cpu", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert pipeline_speed.main(argv) == 1
    record = json.loads((tmp_path / "cogvideox-5b-tiny-none.json").read_text())
    assert record["error"] and "phases" not in record
    assert "error: " in (tmp_path / "results.md").read_text()


def test_speed_modes_harness_reports_each_mode_against_default(tmp_path):
    from benchmarks import speed_modes

    argv = ["--size", "tiny", "--steps", "20", "--warm-up-steps", "1", "--frames", "9"]
    argv += ["--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert speed_modes.main(argv) == 0
    record = json.loads((tmp_path / "cogvideox-5b-tiny-20steps.json").read_text())
    results = {r["mode"]: r for r in record["results"]}
    assert list(results) == ["default", "fast", "faster"]
    default = results["default"]
    assert default["psnr_db_mean"] == math.inf and default["max_abs_diff"] == 0.0
    assert default["projected_compute_fraction_full_size"] == 1.0
    for mode in ("fast", "faster"):
        result = results[mode]
        assert _finite(result["median_s"]) and _finite(result["psnr_db_worst_frame"])
        assert result["attention_rows_fraction"] < 1
        assert result["projected_compute_fraction_full_size"] < 1
    assert results["faster"]["transformer_rows_fraction"] < 1
    assert record["full_size_tokens_per_row"] == 226 + 13 * 30 * 45
    assert (tmp_path / "cogvideox-5b-tiny-20steps.md").read_text().startswith("# speed_mode")
    assert record["warm_up_steps"] == 1
    for name in ("attention_rows", "transformer_rows", "projected_compute"):
        assert default[f"{name}_fraction"] == 1.0, name
    for result in results.values():  # how many times faster than default, from its seconds
        speedup = statistics.median(default["seconds"]) / statistics.median(result["seconds"])
        assert result["speedup"] == speedup
        assert result["psnr_db_worst_frame"] <= result["psnr_db_mean"]


def test_speed_modes_psnr_is_of_frames_as_floats_in_zero_to_one():
    from benchmarks import speed_modes

    frames = np.zeros((2, 4, 4, 3), dtype=np.float32)
    assert speed_modes.psnr(frames, frames + 0.1) == pytest.approx(20.0)
    assert speed_modes.psnr(frames, frames) == math.inf


def _slow_first_transformer_call(module, seconds: float):
    """Makes the module's first forward take `seconds` longer, as a first call that loads
    kernels or compiles does."""
    import time

    calls = []

    def hook(*_):
        if not calls:
            time.sleep(seconds)
        calls.append(True)

    module.register_forward_hook(hook)
    return calls


def test_speed_modes_times_no_part_of_the_warm_up(tmp_path, monkeypatch):
    """The first call's one-time costs (kernel loading, autotuning, compiling) fall in the
    untimed warm-up render, not in a mode's measured seconds."""
    from benchmarks import speed_modes

    build = speed_modes.build_generator

    def with_a_slow_first_call(*args):
        generator, compiled = build(*args)
        _slow_first_transformer_call(generator.pipe.transformer, 2.0)
        return generator, compiled

    monkeypatch.setattr(speed_modes, "build_generator", with_a_slow_first_call)
    argv = ["--size", "tiny", "--steps", "2", "--warm-up-steps", "1", "--frames", "9"]
    argv += ["--modes", "default", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert speed_modes.main(argv) == 0
    record = json.loads((tmp_path / "cogvideox-5b-tiny-2steps.json").read_text())
    assert record["results"][0]["median_s"] < 2.0


def test_speed_modes_says_uncompiled_where_the_predictors_would_not_compile(tmp_path):
    """--compile on a CPU runs uncompiled, as a predictor does there: the record and the
    file name must not say compiled."""
    from benchmarks import speed_modes

    argv = ["--size", "tiny", "--steps", "1", "--warm-up-steps", "1", "--frames", "9"]
    argv += ["--modes", "default", "--compile", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert speed_modes.main(argv) == 0
    [written] = tmp_path.glob("*.json")
    assert written.name == "cogvideox-5b-tiny-1steps.json"
    assert json.loads(written.read_text())["compile"] is False


def test_speed_modes_writes_each_timed_render_before_the_next_one(tmp_path, monkeypatch):
    """A run stopped by a time limit keeps what it timed: after faster's render (before
    default's) the file already holds faster's seconds, which the summary takes."""
    from benchmarks import speed_modes, summary

    written = []
    write_json = speed_modes.write_json
    monkeypatch.setattr(
        speed_modes,
        "write_json",
        lambda path, data: (written.append(json.loads(json.dumps(data))), write_json(path, data)),
    )
    argv = ["--size", "tiny", "--steps", "2", "--warm-up-steps", "1", "--frames", "9"]
    argv += ["--modes", "faster,default", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert speed_modes.main(argv) == 0
    first, second, final = written
    assert first["partial"] and [r["mode"] for r in first["results"]] == ["faster"]
    assert [r["speed_mode"] for r in summary.records_of(first, "f.json")] == ["faster"]
    assert second["partial"] and "partial" not in final
    assert second["results"] == final["results"]
    assert [r["mode"] for r in final["results"]] == ["faster", "default"]


def _graphs_of_one_compiled_render(count_work: bool) -> tuple[int, int | None]:
    """(graphs dynamo built, attention rows counted) for one render of a freshly compiled
    tiny transformer, with speed_modes.py's work counter on it or not."""
    import torch
    from torch._dynamo.utils import counters

    from benchmarks import speed_modes
    from cogvideox_cog.generator import Request, VideoGenerator
    from cogvideox_cog.pipeline import PIPELINES, compile_transformer, configure_pipeline
    from cogvideox_cog.variants import VARIANTS
    from tests.markers import GUARDS_BACKEND

    variant, cpu = VARIANTS["cogvideox-5b"], torch.device("cpu")
    components = pipeline_speed.tiny_components(variant, cpu, torch.float32)
    pipe = configure_pipeline(PIPELINES["t2v"](**components), variant, cpu, "none")
    compile_transformer(pipe.transformer, GUARDS_BACKEND)
    counter = speed_modes.WorkCounter(pipe.transformer) if count_work else None
    request = Request(**speed_modes.request_fields("a cat", 9, 2, 42))
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    try:
        VideoGenerator(variant, pipe, cpu).render_frames(request)
        return counters["stats"]["unique_graphs"] - before, counter and counter.attention_rows
    finally:
        torch._dynamo.reset()


def test_speed_modes_work_counter_makes_a_compiled_transformer_compile_nothing_more():
    """--compile measures the blocks as the predictors compile them: one graph for every
    block. A counting hook that reads a Python value differing between blocks (the block's
    index, a running count) makes dynamo compile the block again for each, and past its
    recompile limit (8; 5B has 42 blocks) run the rest uncompiled."""
    graphs, _ = _graphs_of_one_compiled_render(count_work=False)
    counted_graphs, rows = _graphs_of_one_compiled_render(count_work=True)
    assert counted_graphs == graphs
    assert rows == 2 * 2 * 2  # 2 blocks, 2 steps, a guidance batch of 2


def test_speed_modes_medium_model_renders_at_its_own_size(tmp_path):
    from benchmarks import speed_modes

    argv = ["--size", "medium", "--steps", "2", "--warm-up-steps", "1", "--frames", "9"]
    argv += ["--modes", "default,faster"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert speed_modes.main([*argv, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cogvideox-5b-medium-2steps.json").read_text())
    assert record["resolution"] == "96x160"
    assert record["tokens_per_row"] == 226 + 3 * 6 * 10
    assert [r["mode"] for r in record["results"]] == ["default", "faster"]


@needs_cpp_compiler
def test_transformer_step_harness_times_every_candidate_against_the_baseline(tmp_path):
    from benchmarks import transformer_step

    argv = ["--size", "tiny", "--device", "cpu", "--frames", "9", "--repeats", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert transformer_step.main([*argv, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "transformer_step-cogvideox-5b-tiny.json").read_text())
    rows = {row["candidate"]: row for row in record["rows"]}
    assert rows["sdpa default"]["rel_l2_vs_default"] == 0.0
    measured = [row for row in rows.values() if "step_s" in row]
    names = [row["candidate"] for row in measured]
    assert any(name.startswith("fused qkv + ") for name in names)
    assert any(name.startswith("compile + ") for name in names)
    for row in measured:  # all output-preserving: float rounding at most
        assert _finite(row["step_s"]) and row["step_s"] > 0
        assert row["rel_l2_vs_default"] < 1e-4, row
    assert all("error" in row for row in rows.values() if "step_s" not in row)
    attention = [row for row in measured if row["candidate"].startswith("sdpa ")]
    fastest = min(attention, key=lambda row: row["step_s"])["candidate"]
    assert all(name.endswith(f" + {fastest}") for name in names if " + " in name), names


class _FirstCallsSlow(torch.nn.Module):
    """A step whose first `slow` calls take 0.6 s longer, as calls that load kernels do."""

    def __init__(self, slow: int):
        super().__init__()
        self.slow, self.calls = slow, 0

    def forward(self, hidden_states):
        import time

        self.calls += 1
        if self.calls <= self.slow:
            time.sleep(0.6)
        return (hidden_states * 2,)


def test_transformer_step_times_no_warm_up_step():
    from benchmarks.transformer_step import time_steps

    step = _FirstCallsSlow(slow=1)
    inputs = {"hidden_states": torch.ones(4)}
    seconds, out = time_steps(step, inputs, None, 1, 2, torch.device("cpu"))
    assert step.calls == 3 and seconds < 0.3
    assert torch.equal(out, torch.full((4,), 2.0))


def test_transformer_step_time_is_the_median_of_the_timed_steps():
    """One slow step among three (a stall on the host) does not move the figure."""
    from benchmarks.transformer_step import time_steps

    step = _FirstCallsSlow(slow=1)
    seconds, _ = time_steps(step, {"hidden_states": torch.ones(4)}, None, 0, 3, torch.device("cpu"))
    assert seconds < 0.1


def test_transformer_step_error_is_relative_to_the_baseline_output():
    from benchmarks.transformer_step import Candidates

    candidates = Candidates(None, {}, 1, torch.device("cpu"))
    candidates.reference = torch.full((4,), 2.0)
    with contextlib.redirect_stdout(io.StringIO()):
        candidates.record("half again", 0.1, torch.full((4,), 3.0))
    assert candidates.rows[0]["rel_l2_vs_default"] == pytest.approx(0.5)


class _Drifting(torch.nn.Module):
    """A step whose output grows by one with every call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, hidden_states):
        self.calls += 1
        return (hidden_states + self.calls,)


def test_transformer_step_compares_every_candidate_with_the_baseline_output():
    from benchmarks.transformer_step import Candidates

    candidates = Candidates(_Drifting(), {"hidden_states": torch.zeros(4)}, 1, torch.device("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):
        candidates.attention_backends()
    baseline, *forced = candidates.rows
    assert baseline["rel_l2_vs_default"] == 0.0
    assert forced and all(row["rel_l2_vs_default"] > 0 for row in forced if "step_s" in row)


def test_transformer_step_drops_the_fused_weights_before_the_next_candidate(tmp_path):
    """diffusers keeps the fused QKV weights after unfusing (2.4 GB for 5B), which the later
    candidates' peak memory would count."""
    from argparse import Namespace

    from benchmarks import transformer_step
    from cogvideox_cog.variants import VARIANTS

    cpu = torch.device("cpu")
    args = Namespace(size="tiny", frames=9)
    transformer, inputs, _ = transformer_step.build_step(args, VARIANTS["cogvideox-5b"], cpu)
    candidates = transformer_step.Candidates(transformer, inputs, 1, cpu)
    with contextlib.redirect_stdout(io.StringIO()):
        candidates.attention_backends()
        candidates.fused_qkv()
    assert candidates.rows[-1]["rel_l2_vs_default"] < 1e-4
    assert not any(hasattr(module, "to_qkv") for module in transformer.modules())
    _, out = candidates.time(transformer, None)  # the next candidate's model: unfused again
    assert torch.allclose(out, candidates.reference, atol=1e-5)
    assert not any(getattr(m, "fused_projections", False) for m in transformer.modules())


def test_step_profile_profiles_the_steps_after_one_untimed_call():
    """The first call (kernel loading) runs outside the profiler, and the time by class is
    per profiled step."""
    from benchmarks.step_profile import profile_steps

    linear = torch.nn.Linear(64, 64)
    calls = []
    linear.register_forward_hook(lambda *_: calls.append(True))
    seconds, table = profile_steps(linear, {"input": torch.ones(8, 64)}, 3, torch.device("cpu"))
    assert len(calls) == 4
    [row] = [line for line in table.splitlines() if line.split()[:1] == ["aten::linear"]]
    assert row.split()[-1] == "3", table  # the profiler's count of calls
    assert seconds["matmul"] > 0


def test_step_profile_writes_the_eager_profile_of_the_run_it_names(tmp_path):
    from benchmarks import step_profile

    argv = ["--size", "tiny", "--device", "cpu", "--frames", "9", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert step_profile.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "profile-cogvideox-5b-tiny.json",
        "profile-cogvideox-5b-tiny.txt",
    ]
    record = json.loads((tmp_path / "profile-cogvideox-5b-tiny.json").read_text())
    assert (record["compiled"], record["time"]) == (False, "cpu")
    assert record["shape"] == "9x48x80, CFG batch 2"
    fractions, seconds = record["fraction_by_class"], record["step_s_by_class"]
    assert math.isclose(sum(fractions.values()), 1, abs_tol=1e-3)
    total = sum(seconds.values())
    # The record rounds seconds to 5 places and fractions to 4: a class of a millisecond
    # or so on this tiny model is 1% off its exact share, so the bound follows the rounding.
    rounding = 5e-5 + 1e-5 * len(seconds) / total
    for label, second in seconds.items():
        assert fractions[label] == pytest.approx(second / total, abs=rounding), label
    assert "Self CPU" in (tmp_path / "profile-cogvideox-5b-tiny.txt").read_text()


@pytest.mark.parametrize("variant_id", ["cogvideox-5b", "cogvideox1.5-5b"])
def test_a_benchmarked_step_gets_the_shapes_the_pipeline_gives_the_transformer(variant_id):
    """transformer_step.py, step_profile.py and compile_setup.py time one step on these
    inputs: 1.5's latent frames are padded to whole temporal patches, as the pipeline pads
    them (unpadded, its patch embedding failed at every 16N+1 frame count)."""
    import torch

    from benchmarks.transformer_step import step_inputs
    from cogvideox_cog.pipeline import PIPELINES
    from cogvideox_cog.variants import VARIANTS

    variant, cpu = VARIANTS[variant_id], torch.device("cpu")
    pipe = PIPELINES["t2v"](**pipeline_speed.tiny_components(variant, cpu, torch.float32))
    config = pipe.transformer.config
    height, width = config.sample_height * 8, config.sample_width * 8
    frames = variant.allowed_frames[1]
    given = {}
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: given.update(kwargs), with_kwargs=True
    )
    pipe(
        "a cat",
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=1,
        output_type="latent",
    )
    inputs = step_inputs(pipe, frames, height, width, cpu, torch.float32)
    for name in ("hidden_states", "encoder_hidden_states", "timestep"):
        assert inputs[name].shape == given[name].shape, name
    rotary = given["image_rotary_emb"]
    assert [t.shape for t in inputs["image_rotary_emb"]] == [t.shape for t in rotary]


def test_step_profile_counts_each_gpu_kernel_once_under_the_op_that_launched_it():
    """On a GPU the profiler lists a kernel under its own name and in its op's self device
    time: the classes are summed over the ops, and a kernel no op launched is other."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.step_profile import seconds_by_class

    def event(key, device_us, device_type=DeviceType.CPU):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us)

    events = [
        event("aten::addmm", 600),
        event("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", 600, DeviceType.CUDA),
        event("aten::_scaled_dot_product_cudnn_attention", 300),
        event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 300, DeviceType.CUDA),
        event("triton_poi_fused_add_mul_0", 80),
        event("triton_poi_fused_add_mul_0", 80, DeviceType.CUDA),
        event("aten::linear", 0),
        event("cudaLaunchKernel", 0),
        event("Memset (Device)", 20, DeviceType.CUDA),  # launched by no op here
    ]
    seconds = seconds_by_class(events, steps=2, cuda=True)
    assert seconds == pytest.approx(
        {"attention": 150e-6, "matmul": 300e-6, "norm/elementwise": 40e-6, "other": 10e-6}
    )


@pytest.mark.parametrize("script", ["speed_modes", "transformer_step"])
def test_fp8_is_refused_before_any_work_without_a_gpu_that_has_fp8(script, tmp_path):
    import importlib

    main = importlib.import_module(f"benchmarks.{script}").main
    argv = ["--size", "tiny", "--fp8", "--out", str(tmp_path)]
    argv += ["--device", "cpu"] if script == "transformer_step" else []
    with pytest.raises(SystemExit, match=r"compute capability 8\.9"):
        main(argv)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["speed_modes", "transformer_step"])
def test_fp8_is_refused_before_any_work_on_the_float16_model(script, tmp_path):
    """torchao's per-row fp8 takes bfloat16 weights only: on a GPU, 2B failed in quantize_,
    after the measurements that come before it."""
    import importlib

    main = importlib.import_module(f"benchmarks.{script}").main
    argv = ["--size", "tiny", "--variant", "cogvideox-2b", "--fp8", "--out", str(tmp_path)]
    argv += ["--device", "cpu"] if script == "transformer_step" else []
    with pytest.raises(SystemExit, match=r"needs a bfloat16 model, not torch\.float16"):
        main(argv)
    assert not any(tmp_path.iterdir())


def _gpu_run_tiny(out: Path, scratch: Path, timeout: float, archive: Path | None = None, **env):
    """benchmarks/gpu_run.sh --tiny [--archive ARCHIVE] OUT with this interpreter; env: more
    variables (SUMMARY, WHEELS, BUDGET_S), none inherited but the process's own."""
    variables = {name: value for name, value in os.environ.items() if name != "SUMMARY"}
    variables |= {"PYTHON": sys.executable, "SCRATCH": str(scratch)}
    variables |= {name: str(value) for name, value in env.items()}
    archiving = ["--archive", str(archive)] if archive else []
    return subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--tiny", *archiving, str(out)],
        cwd=ROOT,
        env=variables,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@needs_cpp_compiler
def test_gpu_run_script_runs_start_to_finish_at_tiny_size_and_keeps_earlier_records(tmp_path):
    """benchmarks/gpu_run.sh --tiny: every step succeeds, the warm start compiles nothing, and
    summary.json has the new records next to the ones it had. (At tiny size the warm start
    shares the cold one's inductor folder; the cache file alone: test_compile_cache.py.) The
    archive holds every result and none of the caches (a GPU machine returns few files)."""
    earlier = {"gpu": "NVIDIA H200", "variant": "cogvideox-5b", "num_frames": 49}
    earlier |= {"height": 480, "width": 720, "steps": 50, "speed_mode": "default"}
    earlier |= {"compiled": False, "offload": "none", "measured": True, "total_seconds": 99.5}
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps([earlier]))
    out, archive = tmp_path / "out", tmp_path / "run.tar.gz"
    done = _gpu_run_tiny(out, tmp_path / "scratch", 1200, archive, SUMMARY=summary)
    assert done.returncode == 0, done.stdout + (out / "run.log").read_text()
    assert "FAILED" not in (out / "run.log").read_text()
    warm = json.loads((out / "compile-cogvideox-5b-tiny-warm.json").read_text())
    cold = json.loads((out / "compile-cogvideox-5b-tiny-cold.json").read_text())
    assert cold["graphs_compiled_in_setup"] > 0
    assert warm["graphs_compiled_in_setup"] == 0 and warm["graphs_compiled_in_request"] == 0
    for name in ("profile-cogvideox-5b-tiny", "profile-cogvideox-5b-tiny-cold"):
        profile = json.loads((out / f"{name}.json").read_text())
        assert math.isclose(sum(profile["fraction_by_class"].values()), 1, abs_tol=1e-3)
        assert profile["compiled"] is name.endswith("-cold"), name

    records = json.loads(summary.read_text())
    assert earlier in records
    fields = {"gpu", "variant", "num_frames", "height", "width", "steps", "speed_mode"}
    fields |= {"compiled", "total_seconds", "measured"}
    for record in records:
        assert fields <= set(record) and _finite(record["total_seconds"]), record
    new = [r for r in records if r["gpu"] == "cpu"]
    assert {(r.get("start"), r["speed_mode"], r["compiled"]) for r in new} == {
        ("cold", "default", True),
        ("warm", "default", True),
        (None, "default", False),
        (None, "faster", False),
    }
    with tarfile.open(archive) as packed:
        names = {Path(name).name for name in packed.getnames()}
    assert {"run.log", "speed-modes.log", "compile-cogvideox-5b-tiny-warm.json"} <= names
    assert not any(name.startswith("inductor") or name == "weights" for name in names)


def test_gpu_run_summary_starts_from_the_committed_records(tmp_path):
    """Without SUMMARY, OUT/summary.json is the committed table plus the run's records: the
    file to copy back. A run with no time left skips every step and still writes it."""
    out = tmp_path / "out"
    done = _gpu_run_tiny(out, tmp_path / "scratch", 120, BUDGET_S=0)
    assert done.returncode == 1
    assert (out / "run.log").read_text().count("SKIPPED") == 5
    committed = json.loads((ROOT / "benchmarks/results/gpu/summary.json").read_text())
    assert json.loads((out / "summary.json").read_text()) == committed


def test_gpu_run_runs_only_the_steps_named_in_only(tmp_path):
    """ONLY splits a run over two calls (a GPU machine's one command is time-limited); no
    step is named here, so none runs, and the summary still does."""
    out = tmp_path / "out"
    summary = tmp_path / "summary.json"
    done = _gpu_run_tiny(out, tmp_path / "scratch", 120, ONLY="none-of-them", SUMMARY=summary)
    assert done.returncode == 0, done.stdout
    log = (out / "run.log").read_text()
    assert log.count("not in ONLY") == 5 and "== summary: done" in log


@pytest.mark.parametrize("left", [None, "cogvideox-5b-t2v-0123.bin.token-1-2.tmp"])
def test_gpu_run_skips_the_warm_start_when_no_cold_start_left_a_compile_cache(tmp_path, left):
    """A cold start stopped in its warm-up saves no cache: the warm start would compile it all
    again and be recorded as warm. So does one stopped while writing it, which leaves only
    the temporary file of compile_cache.save."""
    if left:
        folder = tmp_path / "scratch" / "weights" / "compile-cache"
        folder.mkdir(parents=True)
        (folder / left).write_bytes(b"half written")
    out = tmp_path / "out"
    summary = tmp_path / "summary.json"
    done = _gpu_run_tiny(out, tmp_path / "scratch", 120, ONLY="compile-warm", SUMMARY=summary)
    assert done.returncode == 1
    assert "compile-warm: SKIPPED, no compile cache" in (out / "run.log").read_text()
    assert not list(out.glob("compile-*"))


def test_gpu_run_stopped_from_outside_leaves_an_archive_of_the_steps_it_finished(tmp_path):
    """A GPU machine's command limit can be shorter than BUDGET_S: everything is killed, the
    summary never runs, and the archive must already hold the steps done before."""
    import signal
    import time

    fake = tmp_path / "python"  # the profile is done at once; the next step never ends
    fake.write_text(
        '#!/bin/sh\ncase "$1" in *step_profile.py) echo profiled; exit 0 ;; esac\nexec sleep 30\n'
    )
    fake.chmod(0o755)
    out, archive = tmp_path / "out", tmp_path / "run.tar.gz"
    variables = {name: value for name, value in os.environ.items() if name != "SUMMARY"}
    variables |= {"PYTHON": str(fake), "SCRATCH": str(tmp_path / "scratch")}
    variables |= {"SUMMARY": str(tmp_path / "summary.json")}
    script = ["bash", "benchmarks/gpu_run.sh", "--tiny", "--archive", str(archive), str(out)]
    run = subprocess.Popen(script, cwd=ROOT, env=variables, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "profile: done" not in _read(out / "run.log") or not archive.exists():
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.2)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    with tarfile.open(archive) as packed:
        names = {Path(name).name for name in packed.getnames()}
    assert {"run.log", "profile.log"} <= names and "summary.log" not in names


# The cold start's stand-in, every other step done at once: one that hangs, and one that
# ignores SIGTERM (a process stuck in a CUDA call, a handler that waits), killed 10 s later.
COLD_STARTS = {
    "hung": ("exec sleep 60", "2", 60),
    "deaf to SIGTERM": ('trap "" TERM; sleep 45', "1", 90),
}


@pytest.mark.parametrize("cold_start", COLD_STARTS)
def test_gpu_run_stops_the_cold_compiled_start_at_its_cap_and_runs_the_steps_after(
    tmp_path, cold_start
):
    """A cold start compiling past its cap (COLD_CAP_S; 270 s at full size) would otherwise
    take the whole budget: it is stopped, killed if it must be, and the steps after it run."""
    command, cap, timeout = COLD_STARTS[cold_start]
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *"--start cold"*) {command} ;; esac\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = _gpu_run_tiny(
        out, tmp_path / "scratch", timeout, PYTHON=str(fake), COLD_CAP_S=cap, BUDGET_S="100"
    )
    log = (out / "run.log").read_text()
    assert done.returncode == 1
    stopped = re.search(r"== compile-cold: FAILED after (\d+) s", log)
    assert stopped and int(stopped[1]) < 30, log  # the cap (and 10 s to die), not the 45-60 s
    assert "== attention: done" in log and "== summary: done" in log


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_the_offline_wheels_are_the_versions_the_project_runs():
    """download_wheels.sh's pins: each one requirements*.txt pins, or the development
    environment has (cog's own dependencies). torchao is for fp8 on a GPU only, not installed
    here, and so unchecked."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    script = (ROOT / "benchmarks/download_wheels.sh").read_text()
    pins = dict(re.findall(r"([\w-]+)==([\w.]+)", script.split("PINNED=(")[1].split(")")[0]))
    required = {}
    for name in ("requirements.txt", "requirements-dev.txt"):
        required |= dict(re.findall(r"^([\w-]+)==([\w.]+)", (ROOT / name).read_text(), re.M))
    assert len(pins) == 11
    for package, pinned in pins.items():
        if package == "torchao":
            continue
        try:
            expected = required.get(package) or version(package)
        except PackageNotFoundError:
            pytest.fail(f"{package} is neither pinned nor installed")
        assert pinned == expected, package


def test_projected_times_are_summary_records_marked_not_measured(tmp_path):
    from benchmarks import projections, summary

    projections.main(["--out", str(tmp_path / "projected")])
    records = summary.merge(tmp_path / "summary.json", [tmp_path / "projected"])
    assert {(r["speed_mode"], r["compiled"]) for r in records} == {
        ("default", True),
        ("fast", False),
        ("faster", False),
        ("fast", True),
        ("faster", True),
    }
    assert all(r["measured"] is False and r["basis"] for r in records)
    seconds = {(r["speed_mode"], r["compiled"]): r["total_seconds"] for r in records}
    assert seconds["faster", False] < seconds["fast", False] < 103  # the measured eager default
    assert seconds["faster", True] < seconds["fast", True] < seconds["default", True]


@pytest.mark.parametrize(("run_says", "basis_says"), [(None, "whole-model"), ("regional",) * 2])
def test_a_compiled_projection_names_the_compile_its_step_was_measured_with(run_says, basis_says):
    """The committed compiled 5B run compiled the whole transformer, before
    COGVIDEOX_COMPILE=1 compiled each block: its projections must not read as the
    per-block compile's, which no GPU has timed."""
    from benchmarks import projections

    compiled = json.loads(projections.COMPILED.read_text())
    assert "compiled_as" not in compiled
    if run_says:
        compiled["compiled_as"] = run_says
    eager = json.loads(projections.EAGER.read_text())
    counts = json.loads(projections.COUNTS.read_text())
    records = projections.projections(eager, compiled, counts)
    for record in (r for r in records if r["compiled"]):
        assert f"measured {basis_says} compiled step" in record["basis"], record


def test_committed_projections_are_what_projections_py_computes_from_the_committed_runs(
    tmp_path,
):
    """The projected rows of the speed table are arithmetic on committed measurements: the
    committed file is exactly what the script writes from them, figure and basis alike."""
    from benchmarks import projections

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert projections.main(["--out", str(tmp_path)]) == 0
    name = "cogvideox-5b-projections.json"
    committed = ROOT / "benchmarks/results/gpu/projected" / name
    assert (tmp_path / name).read_text() == committed.read_text()


def test_projections_are_of_the_request_the_eager_run_measured():
    """Every projection is the eager run's request (GPU, variant, size and steps), whatever
    the CPU count of the speed modes was run at."""
    from benchmarks import projections

    eager = json.loads(projections.EAGER.read_text())
    eager |= {"steps": 30, "frames": 81, "height": 768, "width": 1360}
    eager |= {"variant": "cogvideox1.5-5b", "environment": {"gpu": "NVIDIA H200"}}
    compiled = json.loads(projections.COMPILED.read_text())
    counts = json.loads(projections.COUNTS.read_text())
    request = {
        (r["gpu"], r["variant"], r["num_frames"], r["height"], r["width"], r["steps"])
        for r in projections.projections(eager, compiled, counts)
    }
    assert request == {("NVIDIA H200", "cogvideox1.5-5b", 81, 768, 1360, 30)}


def test_projections_leave_the_first_compiling_step_out_of_the_step_time():
    """A short run's median counts its first step, which compiles (140 s on the committed
    compiled run): the projected step is the median of the steps after it."""
    from benchmarks import projections

    eager = json.loads(projections.EAGER.read_text())
    compiled = json.loads(projections.COMPILED.read_text())
    for run, first, step in ((eager, 3.0, 2.0), (compiled, 140.0, 1.5)):
        run["steps_s"] = {"each": [first, step], "first": first, "median": (first + step) / 2}
        run["steps_s"] |= {"median_after_first": step, "total": first + step}
    counts = json.loads(projections.COUNTS.read_text())
    rest = eager["phases"]["total_s"] - eager["phases"]["denoise_s"]
    records = projections.projections(eager, compiled, counts)
    fractions = {r["mode"]: r["projected_compute_fraction_full_size"] for r in counts["results"]}
    for record in records:
        step = 1.5 if record["compiled"] else 2.0
        expected = rest + eager["steps"] * step * fractions[record["speed_mode"]]
        assert record["total_seconds"] == round(expected, 1), record


@needs_cpp_compiler
def test_compile_setup_cold_start_does_not_load_a_compile_cache_left_in_its_folder(
    tmp_path, caplog
):
    """A cold start measures compiling from nothing. A compile cache an earlier start left in
    the same --weights folder (gpu_run.sh keeps its SCRATCH over split calls) made it a warm
    start, recorded as cold."""
    import logging

    import torch

    from benchmarks import compile_setup

    argv = ["--start", "cold", "--size", "tiny", "--warm-up-renders", "0"]
    args = compile_setup.parse_args(
        [*argv, "--weights", str(tmp_path / "w"), "--out", str(tmp_path)]
    )
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))  # something to save
        compile_setup.start(args, torch.device("cpu"))
        assert list((tmp_path / "w" / "compile-cache").iterdir())
        with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
            compile_setup.start(args, torch.device("cpu"))
    finally:
        torch._dynamo.reset()
    assert "compiling from nothing" in caplog.text
    assert "compile cache: loaded" not in caplog.text


def test_summary_skips_a_compiled_start_stopped_before_its_render(tmp_path):
    """compile_setup.py writes its setup figures before rendering: a start stopped by the time
    limit leaves that file, which has no total for the summary."""
    from benchmarks import summary

    partial = {"variant": "cogvideox-5b", "size": "full", "start": "cold", "compiled": True}
    partial |= {"num_frames": 49, "height": 480, "width": 720, "steps": 5, "setup_s": 250.0}
    partial |= {"render_s": None, "environment": {"gpu": "NVIDIA H200"}}
    (tmp_path / "compile-cogvideox-5b-full-cold.json").write_text(json.dumps(partial))
    assert summary.merge(tmp_path / "summary.json", [tmp_path]) == []


def test_summary_keeps_an_end_to_end_total_beside_a_speed_modes_render_of_it(tmp_path):
    """On the GPU of the committed records (an H100), speed_modes.py's default render has
    every field of pipeline_speed.py's end-to-end record of the same request: both stay."""
    from benchmarks import summary

    committed = json.loads((ROOT / "benchmarks/results/gpu/summary.json").read_text())
    end_to_end = next(
        r
        for r in committed
        if (r["variant"], r["offload"], r["steps"], r["compiled"], r["measured"])
        == ("cogvideox-5b", "none", 50, False, True)
    )
    (tmp_path / "summary.json").write_text(json.dumps(committed))
    render = {"variant": "cogvideox-5b", "size": "full", "steps": 50, "frames": 49}
    render |= {"resolution": "480x720", "compile": False, "fp8": False}
    render |= {"environment": {"gpu": end_to_end["gpu"]}}
    render["results"] = [{"mode": "default", "median_s": 95.0}]
    new = tmp_path / "new"
    new.mkdir()
    (new / "cogvideox-5b-full-50steps.json").write_text(json.dumps(render))
    records = summary.merge(tmp_path / "summary.json", [new])
    assert end_to_end in records and len(records) == len(committed) + 1


def test_gpu_run_whose_wheels_do_not_install_still_writes_the_archive(tmp_path):
    """A GPU machine returns only the archive: wheels that fail to install skip every step,
    and the archive still holds pip's reason and the summary."""
    out, archive, wheels = tmp_path / "out", tmp_path / "run.tar.gz", tmp_path / "wheels"
    wheels.mkdir()
    summary = tmp_path / "summary.json"
    done = _gpu_run_tiny(out, tmp_path / "scratch", 120, archive, SUMMARY=summary, WHEELS=wheels)
    assert done.returncode == 1
    log = (out / "run.log").read_text()
    assert "wheels: FAILED" in log and log.count("SKIPPED") == 5
    with tarfile.open(archive) as packed:
        names = {Path(name).name for name in packed.getnames()}
    assert {"run.log", "wheels.log", "summary.log"} <= names


def test_soak_basic_mix_is_the_one_the_committed_run_sent():
    import random

    from benchmarks import soak

    committed = json.loads((ROOT / "benchmarks/results/soak/soak.json").read_text())
    steps = soak.plan(committed["predictions"], random.Random(0))
    counts = {kind: sum(s["kind"] == kind for s in steps) for kind in committed["counts"]}
    assert counts == committed["counts"]
    assert [s["kind"] for s in steps] == [s["kind"] for s in committed["samples"]]


@pytest.mark.parametrize(("task", "count"), [("t2v", 120), ("i2v", 70), ("v2v", 80)])
def test_soak_full_mix_sends_every_failure_cancel_and_probe_kind(task, count):
    import random

    from benchmarks import soak

    steps = soak.plan_full(count, random.Random(0), task)
    sent = [s["inputs"] for s in steps if s["kind"] == "invalid"]
    for change, *_ in soak.invalid_full(task):
        assert any(change.items() <= inputs.items() for inputs in sent), change
    assert {s["variant"] for s in steps if s["kind"] == "cancel"} == set(soak.CANCELS)
    assert {s["probe"] for s in steps if s["kind"] == "probe"} == {"probe-base", "probe-lora"}
    valid = [s["inputs"] for s in steps if s["kind"] == "valid"]
    for feature in ("lora_url", "speed_mode", "upscale", "interpolate", "enhance_prompt"):
        assert any(feature in inputs for inputs in valid), feature
    media = soak.TASKS[task].media
    if media:
        assert {i[media] for i in valid} == {"media:data", "media:url"}
    for inputs in valid:  # video-to-video: at least one denoising step
        assert int(inputs["num_inference_steps"] * inputs.get("strength", 1.0)) >= 1


def test_a_tiny_1_5_run_renders_at_the_tiny_size_and_leaves_the_environment_alone(
    tmp_path, monkeypatch
):
    """The size goes to the generator, not into COGVIDEOX_RESOLUTION, which every later Cog
    server this test process starts would inherit."""
    monkeypatch.delenv(RESOLUTION_ENV, raising=False)
    argv = ["--size", "tiny", "--variant", "cogvideox1.5-5b", "--steps", "1", "--frames", "17"]
    argv += ["--offload", "none", "--tiling", "on", "--device", "cpu", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert pipeline_speed.main(argv) == 0
    record = json.loads((tmp_path / "cogvideox1.5-5b-tiny-none.json").read_text())
    assert (record["height"], record["width"]) == (48, 80)
    assert RESOLUTION_ENV not in os.environ


def test_summary_says_when_a_compiled_total_includes_the_compile():
    """The committed compiled 5B run predates setup's warm-up in pipeline_speed.py: its first
    step compiled (140 s of its 223 s). Its record must not read as a warm compiled
    prediction beside the 81 s projection of one."""
    from benchmarks import summary

    path = ROOT / "benchmarks/results/gpu/cogvideox-5b-compiled/cogvideox-5b-full-none.json"
    cold = json.loads(path.read_text())
    assert "warm_up_seconds" not in cold and cold["steps_s"]["first"] > 100
    [record] = summary.records_of(cold, path.name)
    assert record["compiled"] and record["compile_in_total"] is True
    [warm] = summary.records_of(cold | {"warm_up_seconds": 300.0}, path.name)
    assert warm["compile_in_total"] is False
    eager = json.loads((ROOT / "benchmarks/results/gpu/cogvideox-5b/" / path.name).read_text())
    assert all("compile_in_total" not in r for r in summary.records_of(eager, path.name))
    committed = json.loads((ROOT / "benchmarks/results/gpu/summary.json").read_text())
    assert record in committed


def test_summary_keeps_a_cold_compiled_total_beside_a_warm_one_of_the_same_file(tmp_path):
    """pipeline_speed.py --compile now warms up before the measured prediction and writes
    the same file name as the committed run that compiled in its first step (223 s): the
    warm total is another figure, and must not take the cold one's place."""
    from benchmarks import summary

    folder = "benchmarks/results/gpu/cogvideox-5b-compiled"
    cold = json.loads((ROOT / folder / "cogvideox-5b-full-none.json").read_text())
    committed = json.loads((ROOT / "benchmarks/results/gpu/summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps(committed))
    warm = cold | {"warm_up_seconds": 300.0, "phases": cold["phases"] | {"total_s": 81.5}}
    new = tmp_path / "new"
    new.mkdir()
    (new / "cogvideox-5b-full-none.json").write_text(json.dumps(warm))
    records = summary.merge(tmp_path / "summary.json", [new])
    compiled = {r["total_seconds"] for r in records if r.get("compile_in_total") is not None}
    assert compiled == {cold["phases"]["total_s"], 81.5}
    assert len(records) == len(committed) + 1


def test_summary_keeps_an_fp8_render_apart_from_the_bf16_one():
    """speed_modes.py --fp8 times the quantised transformer: its records say so."""
    from benchmarks import summary

    render = {"variant": "cogvideox-5b", "size": "full", "steps": 50, "frames": 49}
    render |= {"resolution": "480x720", "compile": False, "environment": {"gpu": "NVIDIA H200"}}
    render["results"] = [{"mode": "default", "median_s": 80.0}]
    [bf16] = summary.records_of(render | {"fp8": False}, "cogvideox-5b-full-50steps.json")
    [fp8] = summary.records_of(render | {"fp8": True}, "cogvideox-5b-full-50steps-fp8.json")
    assert bf16["fp8"] is False and fp8["fp8"] is True
    [cut] = summary.records_of(render | {"fp8": False, "partial": True}, "x.json")
    assert cut["partial"] is True and "partial" not in bf16


def test_summary_records_a_projected_total_beside_the_measured_one_as_not_measured():
    """pipeline_speed.py projects 50 steps from a run of fewer (sequential offload): the
    projection is its own record, at its own steps and total, never read as measured."""
    from benchmarks import summary

    path = ROOT / "benchmarks/results/gpu/cogvideox-5b/cogvideox-5b-full-sequential.json"
    run = json.loads(path.read_text())
    assert run["steps"] == 2 and run["projection"]["steps"] == 50
    measured, projected = summary.records_of(run, path.name)
    assert (measured["steps"], measured["total_seconds"], measured["measured"]) == (
        2,
        run["phases"]["total_s"],
        True,
    )
    assert (projected["steps"], projected["total_seconds"], projected["measured"]) == (
        50,
        run["projection"]["total_s"],
        False,
    )


def test_summary_adds_no_projection_to_the_steps_the_run_measured():
    """A projection to the run's own step count is the measured total again, not a record."""
    from benchmarks import summary

    path = ROOT / "benchmarks/results/gpu/cogvideox-5b/cogvideox-5b-full-none.json"
    run = json.loads(path.read_text())
    run["projection"] = {"steps": run["steps"], "total_s": run["phases"]["total_s"] + 1}
    [record] = summary.records_of(run, path.name)
    assert record["measured"] is True and record["total_seconds"] == run["phases"]["total_s"]


def test_summary_record_of_a_compiled_start_is_its_render_after_setup():
    """compile_setup.py's end-to-end total is the render once set up; setup's compile is
    beside it, and the start (cold or warm) is part of what the record says."""
    from benchmarks import summary

    start = {"variant": "cogvideox-5b", "size": "full", "start": "warm", "compiled": True}
    start |= {"num_frames": 49, "height": 480, "width": 720, "steps": 5, "setup_s": 90.0}
    start |= {"render_s": 12.5, "environment": {"gpu": "NVIDIA H200"}}
    [record] = summary.records_of(start, "compile-cogvideox-5b-full-warm.json")
    assert record["total_seconds"] == 12.5 and record["setup_seconds"] == 90.0
    assert (record["start"], record["offload"], record["measured"]) == ("warm", "none", True)


def test_summary_record_of_a_speed_modes_render_is_measured_at_its_request():
    """speed_modes.py writes its resolution as HEIGHTxWIDTH and whether it compiled."""
    from benchmarks import summary

    render = {"variant": "cogvideox-5b", "size": "full", "steps": 50, "frames": 49}
    render |= {"resolution": "480x720", "compile": True, "environment": {"gpu": "NVIDIA H200"}}
    render["results"] = [{"mode": "faster", "median_s": 60.0}]
    [record] = summary.records_of(render, "cogvideox-5b-full-50steps-compiled.json")
    assert (record["height"], record["width"]) == (480, 720)
    assert record["compiled"] is True and record["measured"] is True


def test_summary_takes_a_new_runs_total_over_the_earlier_one_of_the_same_request(tmp_path):
    """Measuring again what the summary holds updates its figure: the new run's file replaces
    the record the same file gave before, and the record count stays."""
    from benchmarks import summary

    committed = json.loads((ROOT / "benchmarks/results/gpu/summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps(committed))
    folder = "benchmarks/results/gpu/cogvideox-2b"
    run = json.loads((ROOT / folder / "cogvideox-2b-full-none.json").read_text())
    run["phases"]["total_s"] = 39.0
    new = tmp_path / "new"
    new.mkdir()
    (new / "cogvideox-2b-full-none.json").write_text(json.dumps(run))
    records = summary.merge(tmp_path / "summary.json", [new])
    totals = [r["total_seconds"] for r in records if r["source"] == "cogvideox-2b-full-none.json"]
    assert totals == [39.0] and len(records) == len(committed)


@pytest.mark.parametrize("text", ['{"phases": {"total_s"', "[1, 2]"], ids=["cut-short", "list"])
def test_summary_skips_a_json_file_that_is_no_result(tmp_path, text):
    """A file cut short by a stopped step, or JSON of another shape, is left out, not fatal:
    the summary of the other files is still written."""
    from benchmarks import summary

    (tmp_path / "other.json").write_text(text)
    assert summary.merge(tmp_path / "summary.json", [tmp_path]) == []


def test_summary_reads_the_folders_given_not_the_folders_inside_them(tmp_path):
    """Result folders are named one by one (benchmarks/results/gpu/*/): a folder under one,
    such as a CPU run's, is not part of the GPU table."""
    from benchmarks import summary

    inner = tmp_path / "cpu"
    inner.mkdir()
    source = ROOT / "benchmarks/results/gpu/cogvideox-2b/cogvideox-2b-full-none.json"
    (inner / source.name).write_text(source.read_text())
    assert summary.merge(tmp_path / "summary.json", [tmp_path]) == []


def test_summary_is_written_into_a_folder_not_made_yet(tmp_path):
    """SUMMARY may name a file in a folder that does not exist yet."""
    from benchmarks import summary

    folder = ROOT / "benchmarks/results/gpu/cogvideox-2b"
    records = summary.merge(tmp_path / "new" / "summary.json", [folder])
    assert json.loads((tmp_path / "new" / "summary.json").read_text()) == records != []


def test_summary_file_does_not_depend_on_the_order_of_the_folders(tmp_path):
    """The records are sorted by their key, so that merging the same runs gives the same file
    and a committed summary.json changes only where a figure did."""
    from benchmarks import summary

    folders = [
        ROOT / "benchmarks/results/gpu/cogvideox-2b",
        ROOT / "benchmarks/results/gpu/cogvideox-5b",
    ]
    summary.merge(tmp_path / "a.json", folders)
    summary.merge(tmp_path / "b.json", folders[::-1])
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_soak_trend_compares_windows_that_do_not_overlap():
    """At 70 requests (the least soak.py takes; the committed i2v run) two windows of 50
    after a warm-up of 20 were the same 50 samples: the trend was 0 whatever the RSS did."""
    from benchmarks import soak

    rising = [500.0] * soak.WARM_UP + [500.0 + 4 * i for i in range(50)]  # 4 MiB a request
    memory = soak.memory_figures(rising)
    assert memory["window"] == 25
    assert memory["trend_mib"] == 100.0 > soak.TREND_BOUND_MIB
    long_run = soak.memory_figures([500.0] * 200)
    assert long_run["window"] == soak.WINDOW and long_run["trend_mib"] == 0.0


def _soak_stopped_after(count: int) -> dict:
    """soak.py's result for a run whose worker died after `count` requests."""
    import argparse
    from types import SimpleNamespace

    from benchmarks import soak

    args = argparse.Namespace(task="t2v", mix="basic", worker_env=[])
    run = SimpleNamespace(args=args, task=soak.TASKS["t2v"], lora_dir=None, probe_log=[])
    samples = [
        {"index": i, "kind": "valid", "seconds": 0.5, "rss_mib": 900.0, "fds": 40}
        | {"threads": 30, "children": 0, "output_dirs": 1}
        for i in range(count)
    ]
    disk = {"other_tmp_entries": [], "coglet_files": 0, "output_dirs": 1, "output_bytes": 10}
    disk |= {"coglet_prediction_dirs": count}
    stopped = f"after request {count}: FileNotFoundError: /proc/123/status"
    errors = [{"index": count, "kind": "valid", "problem": stopped}]
    counts = {"valid": count + 1, "invalid": 0, "cancel": 0, "probe": 0}
    result = soak.summarise(run, samples, errors, counts, 10.0, disk, stopped)
    result["report"] = soak.markdown(result)
    return result


def _soak_run_of(
    samples: list[dict], errors: list[dict] | None = None, left: tuple[str, ...] = ()
) -> dict:
    """soak.py's result for a basic run that ran every request and sampled `samples`."""
    import argparse
    from types import SimpleNamespace

    from benchmarks import soak

    args = argparse.Namespace(task="t2v", mix="basic", worker_env=[])
    run = SimpleNamespace(args=args, task=soak.TASKS["t2v"], lora_dir=None, probe_log=[])
    disk = {"other_tmp_entries": list(left), "coglet_files": 0, "output_dirs": 1}
    disk |= {"output_bytes": 10, "coglet_prediction_dirs": len(samples)}
    counts = {"valid": len(samples), "invalid": 0, "cancel": 0, "probe": 0}
    result = soak.summarise(run, samples, errors or [], counts, 10.0, disk)
    result["report"] = soak.markdown(result)
    return result


def _soak_samples(count: int = 60, **at: dict) -> list[dict]:
    """`count` steady samples; `at={"i": {field: value}}` changes sample i."""
    samples = [
        {"index": i, "kind": "valid", "seconds": 0.5, "rss_mib": 900.0, "fds": 40}
        | {"threads": 30, "children": 0, "output_dirs": 1}
        for i in range(count)
    ]
    for index, change in at.items():
        samples[int(index.removeprefix("i"))] |= change
    return samples


def test_soak_run_with_one_wrong_answer_fails():
    steady = _soak_run_of(_soak_samples())
    assert steady["passed"] is True
    problem = {"index": 7, "kind": "valid", "problem": "server BUSY"}
    failed = _soak_run_of(_soak_samples(), [problem])
    assert failed["checks"]["every_response_correct"] is False and failed["passed"] is False
    assert "#7 (valid): server BUSY" in failed["report"]


def test_soak_fd_check_leaves_the_warm_up_out_and_catches_a_rise_after_it():
    from benchmarks import soak

    busy_warm_up = {f"i{i}": {"fds": 60} for i in range(soak.WARM_UP)}
    assert _soak_run_of(_soak_samples(**busy_warm_up))["checks"]["no_fd_leak"] is True
    rise = {"i59": {"fds": 40 + soak.FD_SLACK + 1}}
    assert _soak_run_of(_soak_samples(**rise))["checks"]["no_fd_leak"] is False


def test_soak_fails_a_child_process_or_second_output_folder_seen_after_any_request():
    child = _soak_run_of(_soak_samples(i30={"children": 1}))
    assert child["checks"]["no_child_process_left_after_any_request"] is False
    assert child["passed"] is False
    folders = _soak_run_of(_soak_samples(i30={"output_dirs": 2}))
    assert folders["checks"]["at_most_one_output_dir_at_any_time"] is False


def test_soak_fails_one_rss_sample_over_the_ceiling_though_the_trend_is_flat():
    from benchmarks import soak

    spike = _soak_run_of(_soak_samples(i40={"rss_mib": 900.0 + soak.CEILING_MIB + 1}))
    assert spike["checks"]["rss_no_upward_trend"] is True
    assert spike["checks"]["rss_under_ceiling"] is False and spike["passed"] is False
    assert "**NO**" in spike["report"]


def test_soak_fails_an_rss_trend_over_its_bound_and_reports_its_slope_per_100_requests():
    from benchmarks import soak

    rising = {f"i{i}": {"rss_mib": 900.0 + 4 * (i - soak.WARM_UP)} for i in range(20, 60)}
    result = _soak_run_of(_soak_samples(**rising))
    assert result["memory"]["trend_mib"] == 80.0 > soak.TREND_BOUND_MIB
    assert result["checks"]["rss_no_upward_trend"] is False and result["passed"] is False
    assert result["checks"]["rss_under_ceiling"] is True
    assert result["memory"]["slope_mib_per_100_after_warm_up"] == 400.0


def test_soak_fails_threads_that_stay_above_the_count_after_the_warm_up():
    from benchmarks import soak

    more = {f"i{i}": {"threads": 30 + soak.THREAD_SLACK + 1} for i in range(30, 60)}
    result = _soak_run_of(_soak_samples(**more))
    assert result["checks"]["no_thread_leak"] is False and result["passed"] is False


def test_soak_fails_a_file_left_in_the_workers_temp_folder():
    result = _soak_run_of(_soak_samples(), left=("tmpabc.mp4",))
    assert result["checks"]["no_other_temp_files"] is False and result["passed"] is False


def test_soak_reports_the_median_seconds_of_a_request():
    slow = _soak_run_of(_soak_samples(i0={"seconds": 60.5}))
    assert slow["seconds_per_request_median"] == 0.5


@pytest.mark.parametrize("health", ["UNHEALTHY", "SETUP_FAILED", "UNREACHABLE"])
def test_soak_counts_a_server_that_is_not_ready_after_a_request_as_a_failure(tmp_path, health):
    """check_after is what turns a server that went bad between requests into an error."""
    import argparse
    from types import SimpleNamespace

    from benchmarks import soak

    server = SimpleNamespace(status=lambda: health, worker_pid=lambda: 123)
    run = SimpleNamespace(
        args=argparse.Namespace(mix="basic"),
        server=server,
        tmpdir=tmp_path,
        prefix="soak-none-",
        lora_dir=None,
    )
    problem, _ = soak.check_after(run, 123)
    assert problem == f"server {health}"
    server.status = lambda: "READY"
    assert soak.check_after(run, 123)[0] is None
    assert soak.check_after(run, 456)[0] == "the worker process changed"


@pytest.mark.parametrize("count", [3, 30])
def test_soak_whose_worker_dies_still_reports_and_fails(count):
    """A worker that died or stayed busy ended the run with a traceback and no report: what
    ran, and why it stopped, were lost. The figures are left out when too few requests ran."""
    result = _soak_stopped_after(count)
    assert result["passed"] is False and result["checks"]["ran_every_request"] is False
    assert "The run stopped after request" in result["report"]
    assert ("memory" in result) == (count == 30)


def test_soak_counts_the_worker_threads_and_child_processes(tmp_path):
    import threading

    from benchmarks import soak

    pid = os.getpid()
    threads, children = soak.thread_count(pid), soak.child_count(pid)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert soak.thread_count(pid) == threads + 1
        assert soak.child_count(pid) == children + 1
    finally:
        stop.set()
        thread.join()
        child.kill()
        child.wait()
    assert soak.child_count(pid) == children


def test_soak_counts_a_child_process_started_by_any_thread_of_the_worker():
    """/proc lists a child under the thread that started it: one started off the main thread
    (a decoder's or encoder's pool) must count too."""
    import threading

    from benchmarks import soak

    pid = os.getpid()
    children = soak.child_count(pid)
    started: list[subprocess.Popen] = []
    stop = threading.Event()

    def start_child():
        started.append(subprocess.Popen(["sleep", "30"]))
        stop.wait()

    thread = threading.Thread(target=start_child)
    thread.start()
    try:
        while not started:
            stop.wait(0.01)
        assert soak.child_count(pid) == children + 1
    finally:
        started[0].kill()
        started[0].wait()
        stop.set()
        thread.join()


def test_soak_counts_coglets_runtime_threads_apart():
    """coglet's tokio runtime grows its pool over the first requests with the request rate: a
    fast basic-mix run went from 15 threads at request 20 to 18 and failed the leak check."""
    import ctypes
    import threading

    from benchmarks import soak

    pid = os.getpid()
    threads, runtime = soak.thread_count(pid), soak.runtime_thread_count(pid)
    named, stop = threading.Event(), threading.Event()

    def like_tokio():
        pr_set_name = 15
        ctypes.CDLL(None).prctl(pr_set_name, soak.RUNTIME_THREAD.encode(), 0, 0, 0)
        named.set()
        stop.wait()

    thread = threading.Thread(target=like_tokio)
    thread.start()
    try:
        named.wait(10)
        assert soak.thread_count(pid) == threads
        assert soak.runtime_thread_count(pid) == runtime + 1
    finally:
        stop.set()
        thread.join()


def test_gpu_run_split_keeps_the_inductor_folder_the_tiny_warm_start_reuses(tmp_path):
    """A second call with ONLY="compile-warm" (a run split over two calls) skips the cold
    start; its command line must not empty the cold start's inductor folder, which the tiny
    warm start reuses (without it a CPU rebuilds every C++ kernel, a minute or more)."""
    scratch = tmp_path / "scratch"
    kernel = scratch / "inductor-cold" / "kernel.so"
    kernel.parent.mkdir(parents=True)
    kernel.write_text("built by the cold start")
    (scratch / "weights" / "compile-cache").mkdir(parents=True)
    (scratch / "weights" / "compile-cache" / "cogvideox-5b-none-0.bin").write_text("cache")
    fake = tmp_path / "python"  # the warm start lists the inductor folder it was given
    fake.write_text('#!/bin/sh\nls "$TORCHINDUCTOR_CACHE_DIR"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = _gpu_run_tiny(
        out, scratch, 60, PYTHON=str(fake), ONLY="compile-warm", SUMMARY=tmp_path / "s.json"
    )
    assert done.returncode == 0, (out / "run.log").read_text()
    assert kernel.exists()
    assert "kernel.so" in (out / "compile-warm.log").read_text()


def test_gpu_run_skips_the_steps_the_budget_has_no_time_left_for(tmp_path):
    """The budget drains as steps run: a step starts only with 20 s left beyond the 30 s kept
    for the summary, so after a 4 s step of a 53 s budget the rest are skipped."""
    fake = tmp_path / "python"  # every step takes 4 s
    fake.write_text("#!/bin/sh\nsleep 4\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    summary = tmp_path / "summary.json"
    done = _gpu_run_tiny(
        out, tmp_path / "scratch", 60, PYTHON=str(fake), BUDGET_S="53", SUMMARY=summary
    )
    log = (out / "run.log").read_text()
    assert done.returncode == 1
    assert "== profile: done" in log and log.count("SKIPPED") == 4, log
    assert "== summary: done" in log


def test_gpu_run_keeps_the_records_of_the_summary_it_is_given(tmp_path):
    """SUMMARY names a table that already holds records: the committed one is copied only
    where there is none, never over it."""
    earlier = {"gpu": "NVIDIA H200", "variant": "cogvideox-5b", "num_frames": 49}
    earlier |= {"height": 480, "width": 720, "steps": 50, "speed_mode": "default"}
    earlier |= {"compiled": False, "offload": "none", "measured": True, "total_seconds": 99.5}
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps([earlier]))
    out = tmp_path / "out"
    done = _gpu_run_tiny(out, tmp_path / "scratch", 120, ONLY="none-of-them", SUMMARY=summary)
    assert done.returncode == 0, done.stdout
    assert json.loads(summary.read_text()) == [earlier]


def test_gpu_run_removes_the_scratch_folder_it_made(tmp_path):
    """Without SCRATCH the compile caches go to a new temporary folder (thousands of files),
    removed at the end."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    variables = {name: value for name, value in os.environ.items() if name != "SCRATCH"}
    variables |= {"PYTHON": sys.executable, "TMPDIR": str(temporary), "BUDGET_S": "0"}
    variables |= {"SUMMARY": str(tmp_path / "summary.json")}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--tiny", str(tmp_path / "out")],
        cwd=ROOT,
        env=variables,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout
    assert not list(temporary.iterdir())


def test_gpu_run_cold_start_gets_an_empty_inductor_folder(tmp_path):
    """A cold start compiles from nothing, as in a new container: kernels an earlier call
    left in its inductor folder (SCRATCH is kept over split calls) are removed first."""
    scratch = tmp_path / "scratch"
    stale = scratch / "inductor-cold" / "kernel.so"
    stale.parent.mkdir(parents=True)
    stale.write_text("built by an earlier cold start")
    fake = tmp_path / "python"  # the cold start lists what its inductor folder holds
    fake.write_text('#!/bin/sh\nls "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = _gpu_run_tiny(
        out, scratch, 60, PYTHON=str(fake), ONLY="compile-cold", SUMMARY=tmp_path / "s.json"
    )
    assert done.returncode == 0, (out / "run.log").read_text()
    assert "kernel.so" not in (out / "compile-cold.log").read_text()
    assert not stale.exists()


def test_gpu_run_exits_with_failure_when_a_step_fails(tmp_path):
    """A step that fails is logged and the rest still run, but the run must not read as
    complete: its exit status says so."""
    fake = tmp_path / "python"  # the profile fails, the summary succeeds
    fake.write_text('#!/bin/sh\ncase "$1" in *step_profile.py) exit 3 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = _gpu_run_tiny(
        out, tmp_path / "scratch", 60, PYTHON=str(fake), ONLY="profile", SUMMARY=tmp_path / "s"
    )
    log = (out / "run.log").read_text()
    assert "== profile: FAILED" in log and "== summary: done" in log
    assert done.returncode == 1


def test_rife_memory_peak_is_the_most_tensor_bytes_alive_at_once():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        first = torch.empty(4096, dtype=torch.uint8)
        second = torch.empty(8192, dtype=torch.uint8)
        del first
        third = torch.empty(2048, dtype=torch.uint8)
        del second, third
    assert rife_memory.allocation_peaks(prof) == (4096 + 8192, 4096 + 8192)


def test_rife_memory_counts_an_ops_own_buffers_apart_from_its_output():
    """A CPU's fp16 convolution unrolls its input (im2col) into a buffer it frees before it
    returns; a GPU's takes a cuDNN workspace instead, so the tensors' peak leaves it out."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).half()
    image = torch.rand(1, 3, 32, 32, dtype=torch.float16)
    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        out = conv(image)
    tensors, everything = rife_memory.allocation_peaks(prof)
    assert tensors == out.nbytes
    assert everything > tensors


def test_rife_memory_misfit_is_each_sizes_own_share_of_its_bytes():
    """Fitted 15, 20, 25 bytes against 10, 30, 20: the smallest misses by half its own bytes,
    a sixth of the largest's."""
    pairs = [
        {"factor": 2, "padded_pixels": pixels, "tensor_bytes": tensors}
        for pixels, tensors in [(1, 10), (2, 30), (3, 20)]
    ]
    line = rife_memory.fit(pairs, 2)
    assert (line["per_padded_pixel_bytes"], line["fixed_bytes"]) == pytest.approx((5, 10))
    assert line["largest_misfit"] == pytest.approx(0.5)


def test_rife_memory_fits_each_factor_and_projects_the_predictors_sizes(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        assert rife_memory.main(["--sizes", "64x64,64x128", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "rife-memory.json").read_text())
    assert [(p["width"], p["factor"]) for p in record["pairs"]] == [
        (64, 2),
        (64, 4),
        (128, 2),
        (128, 4),
    ]
    fits = {line["factor"]: line for line in record["fits"]}
    assert fits[4]["per_padded_pixel_bytes"] > fits[2]["per_padded_pixel_bytes"] > 0
    assert all(line["largest_misfit"] < 0.01 for line in fits.values())
    assert all(kept["held_bytes"] == 0 < kept["frame_bytes"] for kept in record["upscale_held"])
    peaks = {}
    for video in record["frame_counts"]:
        peaks.setdefault(video["factor"], set()).add(video["tensor_bytes"])
    assert sorted(video["frames"] for video in record["frame_counts"]) == [2, 2, 5, 5]
    assert all(len(peak) == 1 for peak in peaks.values())
    rows = record["projections"]
    assert [(row["width"], row["height"]) for row in rows] == [
        (720, 480),
        (1440, 960),
        (2880, 1920),
        (1360, 768),
        (2720, 1536),
        (5440, 3072),
    ]
    assert all(row["interpolate_4x_bytes"] > row["interpolate_2x_bytes"] for row in rows)
    largest = max(rows, key=lambda row: row["interpolate_4x_bytes"])
    assert (largest["width"], largest["upscale_held_bytes"]) == (5440, 0)
    report = (tmp_path / "rife-memory.md").read_text()
    assert report.startswith("# interpolate's device memory")
    largest = record["pairs"][-1]
    mib = f"{largest['tensor_bytes'] / 2**20:.1f}"
    assert f"| 128x64 | {largest['padded_pixels']} | 4x | {mib} |" in report


def test_enhance_prompt_records_the_peak_rss_of_the_run_not_the_rss_left_at_its_end():
    """A Qwen2 whose MLP is wide beside everything else: the prompt pass's activations are
    most of the memory it takes, and are freed before the timing returns."""
    import threading

    import psutil

    from benchmarks import enhance_prompt

    shape = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=2**17,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    process, seen, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            seen[0] = max(seen[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = enhance_prompt.full_size_local_model(2, shape)
    finally:
        stop.set()
        sampler.join()
    activation = enhance_prompt.CHAT_TOKENS * shape["intermediate_size"] * 4  # float32
    assert seen[0] > process.memory_info().rss + activation  # the run's peak came and went
    # The kernel sums its RSS counters per CPU, so two readings can differ by a few pages.
    assert result["peak_rss_gib"] * 2**30 >= seen[0] - 2**20
    # In GiB: no more than the high-water mark the kernel keeps since the run reset it.
    high_water = Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]
    assert result["peak_rss_gib"] * 2**30 <= int(high_water) * 1024


def _tiny_enhance_run(stalled_pass: int, seconds: float) -> tuple[dict, int]:
    """enhance_prompt's local-model figures for a tiny Qwen2 of 8 new tokens, its
    `stalled_pass`-th prompt pass over the chat held up by `seconds` of sleep (other work on
    the host: wall time, no CPU time); and how many prompt passes over the chat ran."""
    from benchmarks import enhance_prompt

    shape = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    chat_passes = 0

    def stall(module, args):
        nonlocal chat_passes
        chat = args and args[0].shape[-1] == enhance_prompt.CHAT_TOKENS
        if isinstance(module, torch.nn.Embedding) and chat:
            chat_passes += 1
            if chat_passes == stalled_pass:
                time.sleep(seconds)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(stall)
    try:
        return enhance_prompt.full_size_local_model(8, shape), chat_passes
    finally:
        hook.remove()


def test_enhance_prompt_times_the_prompt_pass_and_each_token_in_the_same_generate_call():
    """Other work on the host stalls one prompt pass over the chat by 0.5 s of wall time and
    no CPU time. Figures from two runs, one subtracted from the other, carried that stall
    into the per-token time (below zero here; on the full-size model below CPU time / cores,
    which two cores cannot give); clocked inside one call, the parts add up to that call."""
    result, chat_passes = _tiny_enhance_run(stalled_pass=1, seconds=0.5)
    assert chat_passes >= 1
    cores = len(os.sched_getaffinity(0))
    # Each gap's CPU time is at most its wall time on every core, so their medians are too.
    assert 0 < result["per_token_cpu_s"] <= cores * result["per_token_s"] + 1e-3
    assert result["prompt_pass_s"] < 0.5  # the stall fell in another run than the one timed
    assert len(result["token_gaps_s"]) == len(result["token_gaps_cpu_s"]) == 7
    for suffix in ("s", "cpu_s"):
        parts = result[f"prompt_pass_{suffix}"] + sum(result[f"token_gaps_{suffix}"])
        assert parts == pytest.approx(result[f"generate_{suffix}"], rel=0.1, abs=0.02)
        projected = result[f"prompt_pass_{suffix}"] + 7 * result[f"per_token_{suffix}"]
        assert projected == pytest.approx(result[f"generate_{suffix}"], rel=0.5, abs=0.05)


def test_decode_again_table_shows_the_reserved_peak_beside_the_allocated_one():
    """What must fit for an untiled decode is the reserved memory (COGVIDEOX_VAE_TILING=auto
    counts it): the committed 5B record's table cell gives both, and each one's own growth
    where the level before the decode was recorded."""
    record = json.loads(
        (ROOT / "benchmarks/results/gpu/cogvideox-5b/cogvideox-5b-full-none.json").read_text()
    )
    assert pipeline_speed._decode_cell(record, "off") == "2.34 / 34.4 / 43.0"
    measured = {"tiling": "off", "seconds": 2.0, "peak_allocated_gib": 34.4}
    measured |= {"allocated_before_gib": 23.4, "peak_reserved_gib": 43.0}
    measured["reserved_before_gib"] = 25.5
    cell = pipeline_speed._decode_cell({"decode_again": [measured]}, "off")
    assert cell == "2.00 / 34.4 (+11.0) / 43.0 (+17.5)"


def test_compile_setup_synchronizes_the_device_before_every_clock_read(tmp_path, monkeypatch):
    """On a GPU a clock read without a synchronize before it times the launches queued so
    far: each of the render's clock reads must come right after one, the first step's start
    (the first transformer call, with the text encoder's work still queued) included."""
    import time
    import types

    from benchmarks import compile_setup

    argv = ["--start", "uncompiled", "--size", "tiny", "--out", str(tmp_path)]
    generator, _ = compile_setup.start(compile_setup.parse_args(argv), torch.device("cpu"))
    calls: list[str] = []
    synchronize = compile_setup.synchronize

    def recorded_synchronize(device):
        calls.append("synchronize")
        synchronize(device)

    def recorded_clock():
        calls.append("clock")
        return time.perf_counter()

    monkeypatch.setattr(compile_setup, "synchronize", recorded_synchronize)
    monkeypatch.setattr(compile_setup, "time", types.SimpleNamespace(perf_counter=recorded_clock))
    total, steps = compile_setup.timed_render(generator, 9, 3, torch.device("cpu"))
    assert len(steps) == 3 and total > sum(steps) > 0
    reads = [i for i, call in enumerate(calls) if call == "clock"]
    assert len(reads) == 2 + 1 + 3  # the render's start and end, the loop's start, each step
    assert all(calls[i - 1] == "synchronize" for i in reads), calls


@pytest.fixture(scope="module")
def uncompiled_start(tmp_path_factory):
    """compile_setup.py --start uncompiled at tiny size, 2 steps, the first of which takes
    2 s longer (as a first call that loads kernels does), then 1 step profiled; every JSON it
    wrote, in order."""
    from benchmarks import compile_setup

    out = tmp_path_factory.mktemp("start")
    written = []
    start, write_json = compile_setup.start, compile_setup.write_json

    def with_a_slow_first_call(args, device):
        generator, times = start(args, device)
        _slow_first_transformer_call(generator.pipe.transformer, 2.0)
        return generator, times

    def recorded(path, data):
        written.append((path.name, json.loads(json.dumps(data))))
        write_json(path, data)

    argv = ["--start", "uncompiled", "--size", "tiny", "--steps", "2", "--frames", "9"]
    argv += ["--profile-steps", "1"]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(compile_setup, "start", with_a_slow_first_call)
        patch.setattr(compile_setup, "write_json", recorded)
        assert compile_setup.main([*argv, "--out", str(out)]) == 0
    return out, written


def test_compile_setup_step_median_leaves_the_first_step_out(uncompiled_start):
    out, _ = uncompiled_start
    record = json.loads((out / "compile-cogvideox-5b-tiny-uncompiled.json").read_text())
    assert record["render_s"] > 2.0 and record["step_median_s"] < 1.0


def test_compile_setup_writes_the_setup_figures_before_the_render(uncompiled_start):
    """A start stopped in its render (the time limit) still leaves its setup figures."""
    _, written = uncompiled_start
    (first_name, first), (last_name, last) = written[:2]
    assert first_name == last_name == "compile-cogvideox-5b-tiny-uncompiled.json"
    assert first["render_s"] is None and first["setup_s"] == last["setup_s"]
    assert last["render_s"] > 0


def test_compile_setup_setup_time_is_the_build_and_the_warm_up(uncompiled_start):
    out, _ = uncompiled_start
    record = json.loads((out / "compile-cogvideox-5b-tiny-uncompiled.json").read_text())
    assert record["compiled"] is False and record["graphs_compiled_in_setup"] == 0
    parts = record["build_s"] + record["warm_up_s"]
    assert record["setup_s"] == pytest.approx(parts, abs=2e-3)
    assert record["build_s"] > record["warm_up_s"]  # an uncompiled start does no warm-up


def test_compile_setup_profiles_the_step_of_the_start_it_names(uncompiled_start):
    out, _ = uncompiled_start
    profile = json.loads((out / "profile-cogvideox-5b-tiny-uncompiled.json").read_text())
    assert profile["compiled"] is False
    assert profile["after"] == "compile_setup.py --start uncompiled"
    assert profile["shape"] == "9x48x80, CFG batch 2"
    assert (out / "profile-cogvideox-5b-tiny-uncompiled.txt").exists()


@pytest.mark.parametrize("renders", [0, 1])
def test_compile_setup_keeps_only_the_first_warm_up_renders_asked_for(tmp_path, renders):
    from benchmarks import compile_setup

    argv = ["--start", "uncompiled", "--size", "tiny", "--out", str(tmp_path)]
    argv += ["--warm-up-renders", str(renders)]
    generator, _ = compile_setup.start(compile_setup.parse_args(argv), torch.device("cpu"))
    every = type(generator).warm_up_renders(generator)
    assert len(every) > 1
    assert generator.warm_up_renders() == every[:renders]


def test_enhance_prompt_table_is_the_committed_records():
    """results.md is rewritten from the JSON records: the committed one must be what they give,
    and the full-size record, timed in one call, must carry the peak RSS and the host's load."""
    from benchmarks import enhance_prompt

    folder, parts = ROOT / "benchmarks/results/cpu/enhance-prompt", ("tiny", "full-size")
    tiny, full = (json.loads((folder / f"{p}.json").read_text())["results"] for p in parts)
    assert full["peak_rss_method"] == "VmHWM"
    assert len(full["token_gaps_s"]) == full["measured_tokens"] - 1
    assert "| peak RSS |" in enhance_prompt.markdown(None, full)
    assert enhance_prompt.markdown(tiny, full) == (folder / "results.md").read_text()


def test_inputs_docs_cite_the_committed_full_size_enhance_prompt_figures():
    """docs/inputs.md's full-size local rewrite costs are the committed record's, and say it."""
    record = json.loads((ROOT / "benchmarks/results/cpu/enhance-prompt/full-size.json").read_text())
    full = record["results"]
    start, end = full["load_average_start"][0], full["load_average_end"][0]
    docs = " ".join((ROOT / "docs/inputs.md").read_text().split())
    assert "`full-size.json` for the last three" in docs
    assert f"{start:.1f} to {end:.1f} for the full-size ones" in docs
    first = f"| {full['prompt_pass_s']:.0f} s | {full['prompt_pass_cpu_s']:.0f} s |"
    token = f"| {full['per_token_s']:.2f} s | {full['per_token_cpu_s']:.2f} s |"
    rewrite = f"| {full['projected_rewrite_s']:.0f} s | {full['projected_rewrite_cpu_s']:.0f} s |"
    assert f"a 500-token chat (time to the first token) {first}" in docs
    gaps = len(full["token_gaps_s"])
    assert f"{gaps} gaps between {gaps + 1} tokens of one call) {token}" in docs
    assert f"projected from the two lines above {rewrite}" in docs


def test_inputs_docs_cite_the_committed_tiny_enhance_prompt_figures():
    """docs/inputs.md's tiny rewrite costs and the host's load are the committed record's."""
    record = json.loads((ROOT / "benchmarks/results/cpu/enhance-prompt/tiny.json").read_text())
    tiny, load = record["results"], record["environment"]["load_average"][0]
    docs = " ".join((ROOT / "docs/inputs.md").read_text().split())
    assert f"average {load:.1f} for the tiny lines" in docs
    endpoint, local = tiny["endpoint (loopback)"], tiny["local, tiny Qwen2"]
    plain = tiny["none"]
    assert (
        f"our own overhead | {endpoint['rewrite']:.3f} s | {endpoint['rewrite_cpu']:.3f} s |"
        in docs
    )
    assert (
        f"overhead of `generate` | {local['rewrite']:.2f} s | {local['rewrite_cpu']:.2f} s |"
        in docs
    )
    assert f"for scale | {plain['prediction']:.2f} s | {plain['prediction_cpu']:.2f} s |" in docs


def test_the_readme_cites_the_committed_endpoint_rewrite_overhead():
    """The README's cost of an endpoint rewrite is tiny.json's, as docs/inputs.md's is."""
    record = json.loads((ROOT / "benchmarks/results/cpu/enhance-prompt/tiny.json").read_text())
    overhead_ms = record["results"]["endpoint (loopback)"]["rewrite"] * 1000
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"endpoint: {overhead_ms:.0f} ms of ours" in readme


def test_performance_docs_cite_the_committed_tiny_compile_starts():
    """docs/performance.md's tiny compiled-start figures are the committed run's."""
    folder = ROOT / "benchmarks/results/cpu/compile-setup"
    cold, warm = (
        json.loads((folder / f"compile-cogvideox-5b-tiny-{start}.json").read_text())
        for start in ("cold", "warm")
    )
    docs = " ".join((ROOT / "docs/performance.md").read_text().split())
    assert warm["graphs_compiled_in_setup"] == 0
    assert (
        f"compiled {cold['graphs_compiled_in_setup']} graphs in a {cold['warm_up_s']:.0f} s" in docs
    )
    assert f"took {cold['warm_up_s']:.0f} s cold and {warm['warm_up_s']:.0f} s warm" in docs


def test_performance_docs_cite_the_committed_tiny_gpu_run_warm_ups():
    """docs/performance.md's cost of the tiny script's warm-up renders is the committed runs'."""
    folder = ROOT / "benchmarks/results/cpu/gpu-run-tiny"

    def both_warm_ups(run: Path) -> int:
        starts = (run / f"compile-cogvideox-5b-tiny-{start}.json" for start in ("cold", "warm"))
        return round(sum(json.loads(p.read_text())["warm_up_s"] for p in starts))

    one, two = both_warm_ups(folder), both_warm_ups(folder / "two-renders")
    docs = " ".join((ROOT / "docs/performance.md").read_text().split())
    assert f"warm-ups took {two} s with two renders and {one} s with one" in docs


def test_the_harnesses_render_the_predictors_defaults_at_the_seed_they_are_given():
    """A benchmark times the video a user gets by default: a guidance or negative prompt of
    its own would time another request, and a seed not passed on another video."""
    schema = build_schema(f"{ROOT}/predict_t2v.py:Predictor")
    declared = schema["components"]["schemas"]["Input"]["properties"]
    fields = common.request_fields("a cat", 9, 2, 1234, speed_mode="fast")
    for name in ("negative_prompt", "guidance_scale", "use_dynamic_cfg", "fps"):
        assert fields[name] == declared[name].get("default"), name
    expected = {"prompt": "a cat", "num_frames": 9, "num_inference_steps": 2, "seed": 1234}
    assert {name: fields[name] for name in expected} == expected
    assert fields["speed_mode"] == "fast"


@pytest.fixture(scope="module")
def weights_rounds(tmp_path_factory):
    """weights_download.py's sides, one round each, on a 3 MB tar served on 127.0.0.1."""
    from benchmarks import weights_download

    work = tmp_path_factory.mktemp("weights-bench")
    server, url, manifest, size = weights_download.serve_tar(work, 0.003)
    try:
        runs = weights_download.run_rounds(weights_download.sides_for(url, manifest), 1, work)
    finally:
        server.terminate()
        server.wait()
    return work, url, manifest, size, runs


def test_weights_download_runs_every_side_into_a_fresh_folder_and_times_ours_by_phase(
    weights_rounds,
):
    from benchmarks import weights_download

    work, url, _, _, runs = weights_rounds
    assert [r["side"] for r in runs] == list(weights_download.sides_for(url, work))
    assert all(r["round"] == 1 and r["seconds"] > 0 for r in runs)
    fsynced = runs[1]
    assert fsynced["seconds"] > fsynced["extract_seconds"]
    for ours in runs[2:]:
        assert {"download", "verify", "sync and publish"} <= set(ours["phases"])
    assert not (work / "out").exists()


def test_weights_download_manifest_holds_the_size_and_sha256_of_every_file_in_the_tar(
    weights_rounds,
):
    import hashlib

    work, _, manifest, size, _ = weights_rounds
    files = json.loads(manifest.read_text())["files"]
    tar = work / "served" / "weights.tar"
    assert tar.stat().st_size == size
    with tarfile.open(tar) as archive:
        members = [m for m in archive.getmembers() if m.isfile()]
        assert sorted(m.name for m in members) == sorted(files)
        for member in members:
            data = archive.extractfile(member).read()
            assert files[member.name] == {
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            if member.name.endswith(".safetensors"):
                length = int.from_bytes(data[:8], "little")
                header = json.loads(data[8 : 8 + length])
                assert header["weight"]["data_offsets"][1] == len(data) - 8 - length


def test_weights_download_stops_when_curl_cannot_fetch_the_tar(weights_rounds, tmp_path):
    from benchmarks import weights_download

    url = weights_rounds[1].replace("weights.tar", "missing.tar")
    with pytest.raises(SystemExit, match="curl \\| tar failed"):
        weights_download.run_curl(url, tmp_path / "out", sync=False)


def _weights_runs(seconds: dict[str, list[float]]) -> list[dict]:
    """Runs of each side taking these seconds, round by round, ours with their phases."""
    runs = []
    for side, times in seconds.items():
        for round_, taken in enumerate(times, 1):
            run = {"side": side, "round": round_, "seconds": taken}
            if side.startswith("built-in"):
                run["phases"] = {"verify": taken / 10, "sync and publish": taken / 4}
            runs.append(run)
    return runs


def test_weights_download_summary_gives_ours_over_curl_tar_and_megabytes_of_1e6_bytes():
    from benchmarks import weights_download

    runs = _weights_runs(
        {
            "curl | tar -x": [2.0, 2.0, 9.0],
            "curl | tar -x, then fsync": [3.0, 3.0, 3.0],
            "built-in, structure checks": [4.0, 4.0, 4.0],
            "built-in, sha256 manifest": [5.0, 5.0, 1.0],
            "built-in, structure checks, no fsync": [40.0, 40.0, 40.0],
        }
    )
    summary = weights_download.summarise(runs, 100_000_000)
    assert summary["median_seconds"]["curl | tar -x"] == 2.0
    assert summary["median_mb_per_s"]["curl | tar -x"] == 50
    assert summary["ratio_to_curl_tar"]["built-in, structure checks"] == 2.0
    overhead = summary["verification_overhead_seconds"]
    assert overhead["sha256 while writing (sha256 manifest - structure checks)"] == 1.0
    assert overhead["verify phase (structure, manifest files)"] == 0.4
    assert overhead["fsync and publish"] == 1.0
    data = {"summary": summary, "runs": runs, "command": "x", "date": "d"}
    data["machine"] = {"note": "n"}
    _, table = weights_download.report(data, 3)
    structure = next(line for line in table.splitlines() if "built-in, structure checks |" in line)
    assert "| 4.00 | 25 | 2.00x | 4.00, 4.00, 4.00 |" in structure


def test_cpu_figures_ratios_are_ours_over_diffusers_by_median_and_by_pair():
    from benchmarks.cpu_figures import Samples, _ratios

    ours = Samples(wall=[4.0, 3.0, 8.0], cpu=[2.0, 2.0, 2.0])
    theirs = Samples(wall=[1.0, 2.0, 8.0], cpu=[1.0, 1.0, 1.0])
    assert _ratios(ours, theirs) == {
        "wall_ratio_of_medians": 2.0,
        "wall_median_of_paired_ratios": 1.5,
        "cpu_ratio_of_medians": 2.0,
    }


def test_cpu_figures_counts_the_cpu_seconds_of_the_child_processes_a_call_waits_for():
    """export_to_video encodes in an ffmpeg process: its CPU time is the side's too."""
    from benchmarks.cpu_figures import Samples

    busy = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    samples = Samples()
    samples.call(subprocess.run, [sys.executable, "-c", busy], check=True)
    assert samples.cpu[0] >= 0.5 and samples.wall[0] >= 0.5
    assert samples.cpu[0] < samples.wall[0] + 0.5  # the call's, not the whole process's
    summary = samples.summary()
    assert summary["median_cpu_s"] == samples.cpu[0] and summary["min_wall_s"] == samples.wall[0]


def test_postprocess_cost_scales_flops_by_pixels_to_49_frames_of_480x720():
    from benchmarks.postprocess_cost import flops_at_full_size
    from cogvideox_cog.postprocess.rife import IFNet
    from cogvideox_cog.postprocess.rrdbnet import RRDBNet

    torch.manual_seed(0)
    interpolator, upscaler = IFNet(), RRDBNet()
    small = flops_at_full_size(interpolator, upscaler, 24, 40)
    large = flops_at_full_size(interpolator, upscaler, 48, 80)
    for key in ("upscale_tflop_per_frame", "interpolate_tflop_per_new_frame"):
        assert math.isclose(small[key], large[key], rel_tol=0.02), key
    assert math.isclose(large["upscale_tflop_49_frames"], 49 * large["upscale_tflop_per_frame"])
    new_frames = large["interpolate_tflop_per_new_frame"]
    assert math.isclose(large["interpolate_2x_tflop"], 48 * new_frames)
    assert math.isclose(large["interpolate_4x_tflop"], 3 * 48 * new_frames)
    committed = json.loads(_read(ROOT / "benchmarks/results/cpu/postprocess/postprocess_cost.json"))
    for key, value in committed["projection_full_size"].items():
        assert math.isclose(large[key], value, rel_tol=1e-9), key


def test_postprocess_cost_report_gives_each_steps_added_seconds_over_the_base_prediction():
    from benchmarks.postprocess_cost import report

    row = {"step": "upscale 2x", "seconds": 3.0, "extra_encode_seconds": 1.0}
    record = {
        "command": "c",
        "base": {"seconds": 2.0, "frames": 9, "height": 48, "width": 80, "steps": 2},
        "steps": [row | {"frames": 9, "height": 96, "width": 160}],
        "projection_full_size": dict.fromkeys(
            [
                "upscale_tflop_49_frames",
                "upscale_tflop_per_frame",
                "interpolate_2x_tflop",
                "interpolate_4x_tflop",
            ],
            1.0,
        ),
    }
    assert "| upscale 2x | 9 x 160x96 | 3.00 | 1.00 | 2.0 |" in report(record)


def test_enhance_prompt_prompt_pass_is_the_timed_calls_time_to_its_first_token():
    """A stall in the timed call's prompt pass belongs to the prompt pass, none to the tokens;
    the projection is that pass and the median gap for each token after the first."""
    from benchmarks import enhance_prompt

    result, chat_passes = _tiny_enhance_run(stalled_pass=2, seconds=0.3)  # 1: the warm-up's
    assert chat_passes == 2
    assert 0.3 <= result["prompt_pass_s"] <= result["generate_s"]
    assert max(result["token_gaps_s"]) < 0.3
    for suffix in ("s", "cpu_s"):
        per_token = result[f"per_token_{suffix}"]
        assert per_token == statistics.median(result[f"token_gaps_{suffix}"])
        projected = result[f"prompt_pass_{suffix}"] + per_token * (enhance_prompt.CAP_TOKENS - 1)
        assert result[f"projected_rewrite_{suffix}"] == pytest.approx(projected, rel=1e-12)


class _Clock:
    """process_time readings given in turn: each timed span is the gap between two of them."""

    def __init__(self, spans: list[float]):
        self.readings = [
            value for index, span in enumerate(spans) for value in (index, index + span)
        ]

    def process_time(self) -> float:
        return self.readings.pop(0)


def _burn_cpu(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def test_clip_colour_cpu_time_is_the_least_repetition_after_an_untimed_warm_up(monkeypatch):
    from benchmarks import clip_colour

    calls = []
    monkeypatch.setattr(clip_colour, "time", _Clock([0.005, 0.002, 0.004]))
    assert clip_colour.cpu_ms(lambda: calls.append(1), 3) == pytest.approx(2.0)
    assert len(calls) == 4


def test_clip_colour_ffmpeg_times_its_first_frame_apart_from_the_least_of_the_others(
    tmp_path, monkeypatch
):
    from benchmarks import clip_colour

    path = tmp_path / "hlg.mp4"
    clip_colour.write_clip(path, 16, 32, clip_colour.TRANSFERS["HLG"], 4)
    clock = _Clock([0.0005, 0.003, 0.001, 0.002])  # the first kept apart even as the least
    monkeypatch.setattr(clip_colour, "time", clock)
    assert clip_colour.ffmpeg_ms(path) == pytest.approx((0.5, 1.0))
    assert clock.readings == []  # every frame timed


def test_clip_colour_times_each_read_under_its_own_column(tmp_path, monkeypatch):
    """to_sdr made 60 ms slower and load_video's read 30 ms: each shows in its own column
    only. One transfer at a tiny size: FFmpeg's first frame alone takes seconds."""
    from benchmarks import clip_colour

    to_sdr, rgb, seen = clip_colour.to_sdr, clip_colour._rgb, set()

    def slower(read, seconds):
        def timed(frame, *args):
            seen.add((frame.height, frame.width, torch.get_num_threads()))
            _burn_cpu(seconds)
            return read(frame, *args)

        return timed

    monkeypatch.setattr(clip_colour, "to_sdr", slower(to_sdr, 0.06))
    monkeypatch.setattr(clip_colour, "_rgb", slower(rgb, 0.03))
    monkeypatch.setattr(clip_colour, "TRANSFERS", {"HLG": clip_colour.TRANSFERS["HLG"]})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # no re-exec on one core
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the one thread it runs on is its own doing
    argv = ["--sizes", "16x32", "--repeats", "2", "--filter-frames", "3", "--out", str(tmp_path)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert clip_colour.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "clip_colour.json").read_text())
    [run], [sdr] = record["runs"], record["sdr_runs"]
    assert (run["size"], run["clip"], sdr["size"]) == ("32x16", "HLG", "32x16")
    assert run["to_sdr_ms"] >= 60 > run["as_it_is_ms"] >= 30 > run["to_image_ms"]
    assert sdr["as_it_is_ms"] >= 30 > sdr["to_image_ms"]
    assert run["ffmpeg_first_frame_ms"] > run["ffmpeg_next_frames_ms"]
    assert seen == {(16, 32, 1)}  # frames of the size asked, read on one thread
    assert (tmp_path / "results.md").read_text() == clip_colour.report(record)


@pytest.mark.parametrize(
    ("script", "folder"), [("clip_colour", "clip-colour"), ("clip_decode", "clip-decode")]
)
def test_clip_benchmark_table_is_the_committed_records(script, folder):
    import importlib

    report = importlib.import_module(f"benchmarks.{script}").report
    results = ROOT / "benchmarks" / "results" / "cpu" / folder
    record = json.loads((results / f"{script}.json").read_text())
    assert report(record) == (results / "results.md").read_text()


def test_clip_decode_clip_holds_its_span_and_half_a_second(tmp_path):
    import av

    from benchmarks import clip_decode

    case = clip_decode.CASES["mjpeg-tiny"]
    frames = clip_decode.write_clip(tmp_path / "clip.avi", case)
    assert frames == 150  # (8 / 8 + 0.5) s at 100 fps
    with av.open(str(tmp_path / "clip.avi")) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames


def test_clip_decode_reads_only_the_picked_frames_or_every_frame_as_asked(tmp_path, monkeypatch):
    from benchmarks import clip_decode
    from cogvideox_cog.media import clip

    monkeypatch.setattr(clip, "_intra_coded", clip._intra_coded)  # put back after "every"
    path = tmp_path / "clip.avi"
    clip_decode.write_clip(path, clip_decode.CASES["mjpeg-tiny"])
    picked = clip_decode.run_one("mjpeg-tiny", "picked", str(path))
    every = clip_decode.run_one("mjpeg-tiny", "every", str(path))
    assert "9 of 102 frames decoded" in picked["summary"]
    assert ", 102 frames decoded" in every["summary"]
    assert (picked["mode"], every["mode"]) == ("picked", "every")
    assert all("64x48 -> 48x32" in run["summary"] for run in (picked, every))


def test_clip_decode_peak_rss_is_this_processs_high_water_mark_in_mib():
    import resource

    import numpy as np

    from benchmarks import clip_decode

    block = np.ones(2**27, dtype=np.uint8)  # 128 MiB resident, then freed: the peak stays
    del block
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert abs(clip_decode.peak_rss_mib() - kib / 1024) <= 2


@pytest.mark.parametrize(
    ("skip_every", "modes"), [("", ["picked", "every"]), ("mjpeg-tiny", ["picked"])]
)
def test_clip_decode_runs_each_read_in_a_process_of_its_own_end_to_end(tmp_path, skip_every, modes):
    from benchmarks import clip_decode

    argv = ["--cases", "mjpeg-tiny", "--skip-every", skip_every, "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert clip_decode.main(argv) == 0
    record = json.loads((tmp_path / "clip_decode.json").read_text())
    assert [(run["mode"], run["frames_in_clip"]) for run in record["runs"]] == [
        (mode, 150) for mode in modes
    ]
    assert "9 of 102 frames decoded" in record["runs"][0]["summary"]
    assert all(run["peak_rss_mib"] > 0 and run["file_mb"] >= 0 for run in record["runs"])
    assert (tmp_path / "results.md").read_text() == clip_decode.report(record)


@pytest.mark.parametrize(
    ("name", "conversion"),
    [
        ("HLG", "HDR (HLG) tone-mapped"),
        ("PQ", "HDR (PQ) tone-mapped"),
        ("SDR BT.2020", "BT.2020 primaries converted"),
    ],
)
def test_clip_colour_clip_is_tagged_as_the_transfer_it_is_timed_for(tmp_path, name, conversion):
    import av
    from av.video.reformatter import ColorPrimaries, Colorspace

    from benchmarks import clip_colour
    from cogvideox_cog.media import colour

    path = tmp_path / "clip.mp4"
    clip_colour.write_clip(path, 16, 32, clip_colour.TRANSFERS[name], 1)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    assert conversion in colour.conversion(frame)
    assert (frame.color_primaries, frame.colorspace) == (ColorPrimaries.BT2020, Colorspace.BT2020)


def test_clip_colour_pins_itself_to_one_core_and_starts_again_before_any_work(monkeypatch):
    """Its BLAS threads start with numpy: pinned afterwards, they would share the one core."""
    from benchmarks import clip_colour

    pinned, started = [], []

    def execv(path, argv):
        started.append((path, argv))
        raise InterruptedError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 1})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(cores))
    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setattr(clip_colour, "environment", lambda device: pytest.fail("work began"))
    with pytest.raises(InterruptedError):
        clip_colour.main(["--sizes", "16x32"])
    assert pinned == [{1}]
    assert started == [(sys.executable, [sys.executable, *sys.argv])]


def test_clip_decode_times_the_read_alone_cpu_of_user_and_system_apart_from_wall(
    tmp_path, monkeypatch
):
    """A read made to wait 0.3 s and to spend 0.2 s of user and 0.2 s of system CPU."""
    import resource

    from benchmarks import clip_decode
    from cogvideox_cog.media import clip

    def system_cpu() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_stime

    def slower_read(*args):
        time.sleep(0.3)
        _burn_cpu(0.2)
        start = system_cpu()
        with open("/dev/zero", "rb", buffering=0) as zeros:
            while system_cpu() - start < 0.2:
                zeros.read(2**22)
        return read(*args)

    read = clip.load_video
    monkeypatch.setattr(clip, "load_video", slower_read)
    path = tmp_path / "clip.avi"
    clip_decode.write_clip(path, clip_decode.CASES["mjpeg-tiny"])
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run = clip_decode.run_one("mjpeg-tiny", "picked", str(path))
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    spent = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert 0.4 <= run["cpu_seconds"] <= spent + 0.01
    assert run["cpu_seconds"] + 0.25 <= run["wall_seconds"] <= wall + 0.01


def test_clip_decode_cases_are_the_ones_the_committed_records_measured():
    from benchmarks import clip_decode

    results = ROOT / "benchmarks" / "results" / "cpu" / "clip-decode" / "clip_decode.json"
    for run in json.loads(results.read_text())["runs"]:
        case = clip_decode.CASES[run["case"]]
        assert f" at {case.rate} fps, " in run["summary"]
        assert f"-> {case.num_frames} frames at {case.fps} fps " in run["summary"]
        sizes = f"{case.width}x{case.height} -> {case.size[1]}x{case.size[0]} "
        assert sizes in run["summary"]
