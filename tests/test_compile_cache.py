"""The compile cache (compile_cache.py): a second start on the same volume compiles nothing.

Each start is a fresh Python process with an inductor cache folder of its own, as a new
container has, holding none of the other start's graphs: what it finds compiled can only
have come from the file in the weights folder. Compiled with torch's CPU backend (setup
compiles on CUDA only; the caching is the same code). The second start is given the first's
C++ builds alone (kernel binaries named by the hash of their source, which the file holds):
a CPU would otherwise spend a minute rebuilding them, where a GPU finds its kernels in the
file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import torch.distributed as dist

from cogvideox_cog import compile_cache
from cogvideox_cog.attention import AttentionBackendName
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.parallel.engine import ContextParallel
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.variants import VARIANTS
from tests.markers import needs_cpp_compiler
from tests.parallel_ranks import join_ranks, spawn_ranks

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
VARIANT = "cogvideox-5b"
REQUEST = dict(
    prompt="a cat",
    negative_prompt="",
    num_frames=17,
    num_inference_steps=1,
    guidance_scale=6.0,
    use_dynamic_cfg=None,
    fps=None,
    seed=3,
)

# One setup as from_env runs it on a GPU (regional compile, then the cached warm-up), then one
# request at a frame count the warm-up did not render. The warm-up keeps its first two renders
# (the default count, then the smallest): inductor builds C++ for every graph on a CPU, and
# what the whole warm-up covers is tested in test_pipeline.py; here, that what it compiled
# is saved and loaded.
START = """
import json, sys
from pathlib import Path
import numpy as np, torch
from cogvideox_cog import compile_cache
from cogvideox_cog.attention import AttentionBackendName
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.pipeline import build_pipeline, compile_transformer
from cogvideox_cog.variants import VARIANTS
variant, weights, root, out, request = sys.argv[1:6]
variant = VARIANTS[variant]
pipe = build_pipeline(variant, Path(weights), torch.device("cpu"), "none")
compile_transformer(pipe.transformer)
generator = VideoGenerator(variant, pipe, torch.device("cpu"))
renders = generator.warm_up_renders()[:2]
generator.warm_up_renders = lambda: renders
warm_up = compile_cache.warm_up_with_cache(generator, Path(root))
before = compile_cache.compiled_graphs()
frames = generator.render_frames(Request(**json.loads(request))).frames
np.save(out, frames)
print(json.dumps({"warm_up": warm_up, "request": compile_cache.compiled_graphs() - before}))
"""


def _start(
    weights: Path, root: Path, tmp_path: Path, name: str, builds_from: str | None = None
) -> tuple[dict, np.ndarray]:
    inductor = tmp_path / f"inductor-{name}"
    if builds_from is not None:  # the C++ builds only: folders named by 2 hash characters
        for folder in (tmp_path / f"inductor-{builds_from}").iterdir():
            if len(folder.name) == 2 and folder.is_dir():
                shutil.copytree(folder, inductor / folder.name)
        assert not (inductor / "fxgraph").exists() and not (inductor / "aotautograd").exists()
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor))
    out = tmp_path / f"{name}.npy"
    argv = [
        sys.executable,
        "-c",
        START,
        VARIANT,
        str(weights),
        str(root),
        str(out),
        json.dumps(REQUEST),
    ]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)


@needs_cpp_compiler
def test_second_start_on_the_same_volume_loads_instead_of_compiling(tiny_weights, tmp_path):
    weights, root = tiny_weights["1.0-t2v"], tmp_path / "weights"
    first, first_frames = _start(weights, root, tmp_path, "first")
    assert first["warm_up"] > 0 and first["request"] == 0
    saved = list((root / compile_cache.FOLDER).iterdir())
    assert [p.suffix for p in saved] == [".bin"], saved

    second, second_frames = _start(weights, root, tmp_path, "second", builds_from="first")
    assert second == {"warm_up": 0, "request": 0}
    np.testing.assert_array_equal(second_frames, first_frames)
    pipe = build_pipeline(VARIANTS[VARIANT], weights, CPU, "none")
    uncompiled = VideoGenerator(VARIANTS[VARIANT], pipe, CPU).render_frames(Request(**REQUEST))
    np.testing.assert_allclose(second_frames, uncompiled.frames, atol=1e-5)


def _key() -> dict:
    renders = [[49, 480, 720, 6.0, "default", 2], [9, 480, 720, 1.0, "default", 2]]
    return compile_cache.cache_key(CPU, VARIANT, "t2v", renders)


def test_the_key_names_gpu_torch_variant_mode_attention_offload_and_warm_up(tmp_path):
    key = _key()
    assert key["gpu"] == "cpu" and key["torch"] == torch.__version__
    path = compile_cache.artifact_path(tmp_path, key)
    others = [
        {**key, "gpu": "NVIDIA H100 80GB HBM3"},
        {**key, "torch": "0.0"},
        {**key, "variant": "cogvideox-2b"},
        {**key, "mode": "v2v"},
        {**key, "attention": "_native_cudnn"},
        {**key, "warm_up": [[49, 480, 720, 6.0, "default", 2]]},
        compile_cache.cache_key(CPU, VARIANT, "t2v", key["warm_up"], offload="sequential"),
    ]
    assert len({path} | {compile_cache.artifact_path(tmp_path, o) for o in others}) == 8


def test_the_key_takes_the_attention_backend_the_model_runs(tiny_weights):
    weights, variant = tiny_weights["1.0-t2v"], VARIANTS[VARIANT]
    math = AttentionBackendName._NATIVE_MATH
    native = build_pipeline(variant, weights, CPU, "none").transformer
    other = build_pipeline(variant, weights, CPU, "none", attention=math).transformer
    assert compile_cache.attention_of(native) == "native"
    assert compile_cache.attention_of(other) == "_native_math"


def test_a_video_split_over_several_gpus_has_a_cache_file_of_its_own(tmp_path):
    """Its graphs differ from one GPU's, and a file keeps only its writer's graphs: one file
    for both would be rewritten by each start, and the other deployment's next start would
    compile again."""
    renders = _key()["warm_up"]
    one = compile_cache.cache_key(CPU, VARIANT, "t2v", renders)
    split = compile_cache.cache_key(CPU, VARIANT, "t2v", renders, ranks=2)
    assert compile_cache.artifact_path(tmp_path, one) != compile_cache.artifact_path(
        tmp_path, split
    )


def test_each_gpu_of_a_group_has_a_cache_file_of_its_own(tmp_path, monkeypatch):
    """torch keys a compiled graph by its inputs' device, index included: what rank 1 compiles
    on cuda:1 is not found by rank 0 on cuda:0. One file for the group would keep the last
    writer's graphs only, and every other rank would compile again at each start."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    renders = _key()["warm_up"]
    keys = [
        compile_cache.cache_key(torch.device("cuda", rank), VARIANT, "t2v", renders, ranks=2)
        for rank in (0, 1)
    ]
    paths = {compile_cache.artifact_path(tmp_path, key) for key in keys}
    assert len(paths) == 2


def test_the_key_names_the_diffusers_version():
    """diffusers' model code is what torch traces: an upgrade compiles other graphs."""
    assert _key()["diffusers"] == diffusers.__version__


def test_a_gpu_named_without_an_index_is_keyed_as_the_current_one(tmp_path, monkeypatch):
    """torch.device("cuda") runs on the current GPU, whose index torch's graph keys name: a
    rank on cuda:1 that calls it "cuda" must find cuda:1's file, not cuda:0's."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    renders = _key()["warm_up"]
    unnamed = compile_cache.cache_key(torch.device("cuda"), VARIANT, "t2v", renders)
    named = compile_cache.cache_key(torch.device("cuda", 1), VARIANT, "t2v", renders)
    assert unnamed["gpu_index"] == 1
    assert compile_cache.artifact_path(tmp_path, unnamed) == compile_cache.artifact_path(
        tmp_path, named
    )


@pytest.mark.parametrize(
    "content",
    [
        compile_cache.MAGIC + json.dumps(_key(), sort_keys=True).encode() + b"\nnot torch's",
        compile_cache.MAGIC + b'{"gpu": "another"}\n',
        compile_cache.MAGIC + b"\x80 not text\n",
        b"\x00\x01 truncated",
        b"",
    ],
    ids=["corrupt payload", "foreign key", "key not text", "not ours", "empty"],
)
def test_a_bad_cache_file_is_ignored_with_a_log_line(tmp_path, caplog, content):
    key = _key()
    path = compile_cache.artifact_path(tmp_path, key)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
        assert compile_cache.load(path, key) is False
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_no_file_yet_means_compiling(tmp_path, caplog):
    key = _key()
    with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
        assert compile_cache.load(compile_cache.artifact_path(tmp_path, key), key) is False
    assert "none yet" in caplog.text


def _compile_then_save(path: Path, caplog) -> bool:
    """save() after one small compile, so that there are artifacts to save."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
        with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
            return compile_cache.save(path, _key())
    finally:
        torch._dynamo.reset()


@needs_cpp_compiler
def test_an_unwritable_volume_only_costs_the_next_start_a_compile(tmp_path, caplog):
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    path = compile_cache.artifact_path(blocked, _key())
    assert _compile_then_save(path, caplog) is False
    assert "cannot write" in caplog.text and not path.exists()


def test_a_cache_file_that_cannot_be_read_is_ignored_with_a_log_line(tmp_path, caplog):
    """A folder in its place (or a volume that fails the read): the start compiles."""
    key = _key()
    path = compile_cache.artifact_path(tmp_path, key)
    path.mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
        assert compile_cache.load(path, key) is False
    assert "cannot read" in caplog.text


@needs_cpp_compiler
def test_a_cache_file_copied_to_another_keys_name_is_not_loaded(tmp_path, caplog):
    """Its kernels were compiled for the key on its second line, not for the name's."""
    path = compile_cache.artifact_path(tmp_path, _key())
    assert _compile_then_save(path, caplog) is True
    other_key = {**_key(), "mode": "v2v"}
    copied = compile_cache.artifact_path(tmp_path, other_key)
    copied.write_bytes(path.read_bytes())
    with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
        assert compile_cache.load(copied, other_key) is False
    assert "not a compile cache for this key" in caplog.text


@needs_cpp_compiler
def test_a_first_start_creates_the_cache_folder_and_any_folder_above_it(tmp_path, caplog):
    """The weights root of a benchmark's cold start (or a fresh volume) may not exist yet."""
    path = compile_cache.artifact_path(tmp_path / "a new volume", _key())
    assert _compile_then_save(path, caplog) is True
    assert path.exists()


def test_a_start_that_compiled_nothing_writes_no_file(tmp_path):
    """A process that compiled nothing has no artifacts (torch returns None): an empty file
    would only be rejected by the next start. A fresh process, as torch's record of what it
    compiled lasts as long as the process."""
    script = (
        "import sys; from pathlib import Path; from cogvideox_cog import compile_cache;"
        "from tests.test_compile_cache import _key;"
        "path = compile_cache.artifact_path(Path(sys.argv[1]), _key());"
        "print(compile_cache.save(path, _key()), path.exists())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"]


def test_a_start_removes_files_killed_starts_left_half_written_of_any_key(tmp_path, caplog):
    """A start killed while writing a file (kill -9, the OOM killer) leaves its temporary
    file, which would hold a compile cache's size for good: the restart, soon after, finds it
    recent, and later starts load the file and never save. One no write has touched for an
    hour is removed by any start; one another start is writing now is left to it."""
    folder = tmp_path / compile_cache.FOLDER
    folder.mkdir()
    abandoned = folder / "cogvideox-5b-t2v-0123.bin.0123456789abcdef-7-1.tmp"
    being_written = folder / "cogvideox-5b-t2v-4567.bin.fedcba9876543210-7-1.tmp"
    for path in (abandoned, being_written):
        path.write_bytes(b"part of a compile cache")
    _age(abandoned, hours=1.1)
    with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
        compile_cache.tidy(tmp_path)
    assert not abandoned.exists() and being_written.exists()
    assert "half-written" in caplog.text


def test_a_start_removes_cache_files_no_start_used_for_30_days(tmp_path):
    """Each torch or diffusers upgrade, resolution or offload policy changes the key and
    leaves the old file on the volume."""
    folder = tmp_path / compile_cache.FOLDER
    folder.mkdir()
    unused, recent = folder / "cogvideox-5b-t2v-0123.bin", folder / "cogvideox-5b-t2v-4567.bin"
    for path in (unused, recent):
        path.write_bytes(b"a compile cache")
    _age(unused, hours=30 * 24 + 1)
    _age(recent, hours=30 * 24 - 1)
    compile_cache.tidy(tmp_path)
    assert not unused.exists() and recent.exists()


@needs_cpp_compiler
def test_loading_a_cache_file_marks_it_used(tmp_path, caplog):
    path = compile_cache.artifact_path(tmp_path, _key())
    assert _compile_then_save(path, caplog) is True
    _age(path, hours=31 * 24)
    assert compile_cache.load(path, _key())
    compile_cache.tidy(tmp_path)
    assert path.exists()


def test_every_start_tidies_the_compile_cache(tiny_weights, tmp_path):
    """Also a start that loads its file and never saves (here: nothing compiled to save)."""
    variant = VARIANTS[VARIANT]
    generator = VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )
    renders = generator.warm_up_renders()[:1]
    generator.warm_up_renders = lambda: renders
    folder = tmp_path / compile_cache.FOLDER
    folder.mkdir()
    abandoned = folder / "cogvideox-5b-t2v-0123.bin.0123456789abcdef-7-1.tmp"
    abandoned.write_bytes(b"part of a compile cache")
    _age(abandoned, hours=2)
    compile_cache.warm_up_with_cache(generator, tmp_path)
    assert not abandoned.exists()


def _tiny_generator(tiny_weights) -> VideoGenerator:
    variant = VARIANTS[VARIANT]
    return VideoGenerator(
        variant, build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, "none"), CPU
    )


@needs_cpp_compiler
def test_a_start_loads_its_own_file_however_long_no_start_used_it(tiny_weights, tmp_path, caplog):
    """A worker that served for a month without a restart, or a deployment scaled to zero for
    one, finds its file untouched for 30 days: its own start removed it before loading it,
    and compiled everything again."""
    generator = _tiny_generator(tiny_weights)
    generator.warm_up = lambda: torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    try:
        compile_cache.warm_up_with_cache(generator, tmp_path)
        (saved,) = (tmp_path / compile_cache.FOLDER).glob("*.bin")
        _age(saved, hours=31 * 24)
        with caplog.at_level(logging.INFO, logger="cogvideox_cog.compile_cache"):
            compile_cache.warm_up_with_cache(generator, tmp_path)
    finally:
        torch._dynamo.reset()
    assert "compile cache: loaded" in caplog.text and "none yet" not in caplog.text


def test_a_start_removes_no_unused_file_before_its_warm_up_is_done(tiny_weights, tmp_path):
    """The ranks of a group start together, and their files are as old as each other: rank 0
    removed rank 1's file, a month unused, before rank 1 loaded it. Each rank loads its file
    before its warm-up, whose steps wait for every rank."""
    generator = _tiny_generator(tiny_weights)
    folder = tmp_path / compile_cache.FOLDER
    folder.mkdir()
    other_rank = folder / "cogvideox-5b-t2v-0123.bin"
    other_rank.write_bytes(b"a compile cache")
    _age(other_rank, hours=31 * 24)
    seen = []
    generator.warm_up = lambda: seen.append(other_rank.exists())
    compile_cache.warm_up_with_cache(generator, tmp_path)
    assert seen == [True] and not other_rank.exists()


def _warm_up_compiling(generator: VideoGenerator, *functions) -> None:
    """Make the generator's warm-up compile `functions` (each on a small tensor)."""
    generator.warm_up = lambda: [torch.compile(f)(torch.ones(3)) for f in functions]


@needs_cpp_compiler
def test_a_start_that_found_its_graphs_in_inductors_own_cache_still_saves(tiny_weights, tmp_path):
    """A container whose inductor folder holds the graphs compiles none, but the volume has
    no file yet: without one, the next container compiles them all."""
    generator = _tiny_generator(tiny_weights)
    _warm_up_compiling(generator, lambda x: x * 2 + 1)
    try:
        generator.warm_up()
        torch._dynamo.reset()
        assert compile_cache.warm_up_with_cache(generator, tmp_path) == 0
    finally:
        torch._dynamo.reset()
    assert list((tmp_path / compile_cache.FOLDER).glob("*.bin"))


@needs_cpp_compiler
def test_a_start_that_loaded_its_file_and_compiled_more_saves_it_again(tiny_weights, tmp_path):
    """A warm-up that compiles a graph the file lacks: the next start would compile it too."""
    generator = _tiny_generator(tiny_weights)
    new_constant = time.time_ns() % 10**9 + 3  # a graph no earlier run compiled
    try:
        _warm_up_compiling(generator, lambda x: x * 2 + 1)
        compile_cache.warm_up_with_cache(generator, tmp_path)
        (path,) = (tmp_path / compile_cache.FOLDER).glob("*.bin")
        first = path.read_bytes()
        torch._dynamo.reset()
        _warm_up_compiling(generator, lambda x: x * 2 + 1, lambda x: x * new_constant)
        assert compile_cache.warm_up_with_cache(generator, tmp_path) > 0
    finally:
        torch._dynamo.reset()
    assert path.read_bytes() != first


@needs_cpp_compiler
def test_a_warm_up_counts_only_the_graphs_it_compiled_itself(tiny_weights, tmp_path):
    """What the process compiled before (a benchmark's earlier start) is not the warm-up's:
    counted, a start that loaded everything would report compiles and save again."""
    generator = _tiny_generator(tiny_weights)
    new_constant = time.time_ns() % 10**9 + 5  # a graph no earlier run compiled
    generator.warm_up = lambda: None
    try:
        torch.compile(lambda x: x * new_constant)(torch.ones(3))
        assert compile_cache.compiled_graphs() > 0
        assert compile_cache.warm_up_with_cache(generator, tmp_path) == 0
    finally:
        torch._dynamo.reset()


def _saved_key(tmp_path) -> dict:
    (path,) = (tmp_path / compile_cache.FOLDER).glob("*.bin")
    return json.loads(path.read_bytes().split(b"\n")[1])


@needs_cpp_compiler
@pytest.mark.parametrize(
    ("field", "offload", "attention", "expected"),
    [
        ("attention", "none", AttentionBackendName._NATIVE_MATH, "_native_math"),
        ("offload", "model", None, "model"),
    ],
    ids=["attention-backend", "offload-policy"],
)
def test_a_start_keys_its_file_by_how_the_model_was_built(
    tiny_weights, tmp_path, field, offload, attention, expected
):
    """The attention backend the model runs and the offload policy its weights were placed
    with change the graphs: a file compiled under others would not fit."""
    variant = VARIANTS[VARIANT]
    built = {"attention": attention} if attention else {}
    pipe = build_pipeline(variant, tiny_weights["1.0-t2v"], CPU, offload, **built)
    generator = VideoGenerator(variant, pipe, CPU)
    _warm_up_compiling(generator, lambda x: x * 2 + 1)
    try:
        compile_cache.warm_up_with_cache(generator, tmp_path)
    finally:
        torch._dynamo.reset()
    assert _saved_key(tmp_path)[field] == expected


def test_a_start_whose_warm_up_fails_still_tidies(tiny_weights, tmp_path):
    """A setup that fails (out of memory in the warm-up) is retried by a restart: each one
    would otherwise leave what killed starts left, for good."""
    generator = _tiny_generator(tiny_weights)
    folder = tmp_path / compile_cache.FOLDER
    folder.mkdir()
    abandoned = folder / "cogvideox-5b-t2v-0123.bin.0123456789abcdef-7-1.tmp"
    abandoned.write_bytes(b"part of a compile cache")
    _age(abandoned, hours=2)

    def fails():
        raise RuntimeError("out of memory in the warm-up")

    generator.warm_up = fails
    with pytest.raises(RuntimeError, match="out of memory"):
        compile_cache.warm_up_with_cache(generator, tmp_path)
    assert not abandoned.exists()


def _age(path: Path, hours: float) -> None:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def _start_as_a_rank(rank: int, port: int, weights: Path, root: Path) -> None:
    """A rank of a 2-rank group (gloo): its generator has the engine, and starts as setup
    does, with the compile cache in `root`."""
    torch.set_num_threads(1)
    join_ranks(rank, port, 2)
    try:
        variant = VARIANTS[VARIANT]
        engine = ContextParallel(2)
        pipe = build_pipeline(variant, weights, CPU, "none", before_placing=engine.install)
        generator = VideoGenerator(variant, pipe, CPU)
        generator.engine = engine
        _warm_up_compiling(generator, lambda x: x * 2 + 1)
        compile_cache.warm_up_with_cache(generator, root)
    finally:
        dist.destroy_process_group()


@needs_cpp_compiler
def test_a_group_of_two_ranks_loads_no_file_a_one_gpu_start_saved(tiny_weights, tmp_path):
    """Each rank compiles its half of the video's tokens: graphs of other shapes than one
    GPU's, so a file of the other kind would be loaded for nothing, and its graphs compiled
    again on the first request, after setup."""
    root = tmp_path / "weights"
    generator = _tiny_generator(tiny_weights)
    _warm_up_compiling(generator, lambda x: x * 2 + 1)
    try:
        compile_cache.warm_up_with_cache(generator, root)
    finally:
        torch._dynamo.reset()
    spawn_ranks(_start_as_a_rank, 2, tiny_weights["1.0-t2v"], root)
    keys = sorted(
        json.loads(path.read_bytes().split(b"\n")[1])["ranks"]
        for path in (root / compile_cache.FOLDER).glob("*.bin")
    )
    assert keys == [1, 2]
