"""setup()'s weights step: download, extract, cache; a partial copy is never taken for weights."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from cogvideox_cog import weights
from cogvideox_cog.variants import VARIANTS
from cogvideox_cog.weights import COMPLETE_MARKER, WeightsError, ensure_weights
from tests.file_server import FileServer

VARIANT = VARIANTS["cogvideox-5b"]


def _pipeline_files() -> dict[str, bytes]:
    """The shape of a diffusers pipeline folder; the weights step only reads model_index.json."""
    return {
        "model_index.json": json.dumps({"_class_name": "CogVideoXPipeline"}).encode(),
        "transformer/config.json": b"{}",
        "transformer/diffusion_pytorch_model.safetensors": bytes(range(256)) * 4096,
    }


def _tar(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    _tar(root / "model.tar", _pipeline_files())
    _tar(root / "wrapped.tar", _pipeline_files(), prefix="model_cache/")
    server = FileServer(root)
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_DIR", str(cache))
    monkeypatch.delenv("COGVIDEOX_WEIGHTS_URL", raising=False)
    monkeypatch.setattr(weights.shutil, "which", lambda name: None)  # built-in downloader
    return cache


def test_http_tar_is_downloaded_extracted_and_marked_complete(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    assert (root / "model_index.json").is_file()
    assert (root / "transformer/diffusion_pytorch_model.safetensors").stat().st_size == 256 * 4096
    assert json.loads((root / COMPLETE_MARKER).read_text())["source"] == served.url("model.tar")


def test_cached_weights_are_reused_without_any_network(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    first = ensure_weights(VARIANT)
    sent = served.bytes_sent
    served.stop()  # a second setup must not need the server at all
    assert ensure_weights(VARIANT) == first
    assert served.bytes_sent == sent


def test_a_tar_wrapping_one_folder_is_found_inside_it(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("wrapped.tar"))
    root = ensure_weights(VARIANT)
    assert root.name == "model_cache"
    assert (root / "model_index.json").is_file()


def test_a_download_cut_short_fails_clearly_and_leaves_nothing_cached(served, cache, monkeypatch):
    served.truncate_after("model.tar", 300_000)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    cut_short = r"model.tar (failed|ended) after [\d,]+ of [\d,]+ bytes"
    with pytest.raises(WeightsError, match=cut_short):
        ensure_weights(VARIANT)
    assert [p.name for p in cache.iterdir()] == []


def test_a_failed_download_is_retried_from_scratch_by_the_next_setup(served, cache, monkeypatch):
    served.truncate_after("model.tar", 300_000)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    with pytest.raises(WeightsError):
        ensure_weights(VARIANT)
    served.truncate_after("model.tar", 10**12)
    assert (ensure_weights(VARIANT) / "model_index.json").is_file()


def test_a_missing_url_names_the_url(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("nope.tar"))
    with pytest.raises(
        WeightsError, match=r"could not download http://127.0.0.1:\d+/nope.tar.*404"
    ):
        ensure_weights(VARIANT)
    assert not any(cache.iterdir())


def test_an_entry_without_completion_marker_is_not_used(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    root = ensure_weights(VARIANT)
    (root / COMPLETE_MARKER).unlink()
    (root / "transformer/diffusion_pytorch_model.safetensors").write_bytes(b"half")
    sent = served.bytes_sent
    root = ensure_weights(VARIANT)
    assert served.bytes_sent > sent
    assert (root / "transformer/diffusion_pytorch_model.safetensors").stat().st_size == 256 * 4096


def test_a_local_tar_is_extracted_into_the_cache(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(_tar(tmp_path / "m.tar", _pipeline_files())))
    root = ensure_weights(VARIANT)
    assert root.parent == cache
    assert (root / "model_index.json").is_file()


def test_a_local_directory_is_used_in_place(tmp_path, cache, monkeypatch):
    local = tmp_path / "local"
    for name, data in _pipeline_files().items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(local))
    assert ensure_weights(VARIANT) == local
    assert not cache.exists()


def test_a_directory_that_is_not_a_pipeline_is_refused(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tmp_path))
    with pytest.raises(WeightsError, match=r"no model_index\.json"):
        ensure_weights(VARIANT)


def test_a_tar_escaping_its_folder_is_refused_and_nothing_is_written_outside(
    tmp_path, cache, monkeypatch
):
    evil = _tar(tmp_path / "evil.tar", {**_pipeline_files(), "../escaped.txt": b"x"})
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(evil))
    with pytest.raises(WeightsError, match="unsafe weights tar"):
        ensure_weights(VARIANT)
    assert not (cache.parent / "escaped.txt").exists()
    assert not any(cache.iterdir())


def test_a_variant_without_public_tar_says_how_to_supply_weights(cache):
    expected = r"cogvideox-2b has no public weights tar.*THUDM/CogVideoX-2b"
    with pytest.raises(WeightsError, match=expected):
        ensure_weights(VARIANTS["cogvideox-2b"])


def test_a_changed_source_does_not_reuse_another_sources_cache(served, cache, monkeypatch):
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("model.tar"))
    first = ensure_weights(VARIANT)
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", served.url("wrapped.tar"))
    assert ensure_weights(VARIANT) != first
