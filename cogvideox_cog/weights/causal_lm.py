"""The prompt-enhancement language model's weights: fetched, verified and cached in setup.

The same cache as the video weights (an entry published by one rename, with a completion
marker checked on every setup, under the entry's lock) and the same sources: hf://org/repo
[@revision], an http(s) URL or path of a tar, or a local directory used in place. Only the
verification differs: a transformers checkpoint has config.json and a tokenizer at its top,
not a diffusers model_index.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path

from ..errors import BadSource, WeightsError
from . import (
    Resolved,
    T,
    cache,
    content_check,
    download,
    fetch_hub,
    fetch_tar,
    from_cache,
    hash_unhashed,
    load_healing,
    not_writable,
    weights_root,
    writable,
)
from .hub import parse_hf_url
from .manifest import Manifest
from .verify import Verified, check_contained, check_safetensors, check_shard_index

log = logging.getLogger(__name__)

# What a hub snapshot of an instruct model needs: config, tokenizer, chat template, weights.
HF_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.safetensors",
    "*.safetensors.index.json",
)
CHECKS = ["layout", "config", "tokenizer", "safetensors", "shard indexes"]


def source_problem(source: str) -> str | None:
    """Why `source` cannot name a checkpoint, or None. Also asked when setup starts, so a
    mistyped setting fails before the video weights' download, not after it."""
    if Path(source).expanduser().exists():
        return None
    if source.startswith("hf://"):
        return None if parse_hf_url(source) else "is not hf://org/repo[@revision]"
    if download.is_http(source):
        return download.url_problem(source)
    return "is neither hf://org/repo[@revision], an http(s) URL, nor an existing tar or directory"


def ensure_causal_lm(source: str, setting: str) -> Path:
    """A directory holding the checkpoint at `source` (named by the env var `setting` in
    errors), downloaded into the weights cache and verified if it is not there yet."""
    return _resolve(source, setting).root


def load_causal_lm(source: str, setting: str, load: Callable[[Path], T]) -> T:
    """load(ensure_causal_lm(...)), healing the cache as the video weights' is: a cached
    checkpoint that fails to load is discarded and fetched again, once."""
    return load_healing(lambda: _resolve(source, setting), load, setting, "not a causal LM")


def _resolve(source: str, setting: str) -> Resolved:
    local = Path(source).expanduser()
    if local.is_dir():
        return Resolved(verify_causal_lm(local, source).root)
    if problem := source_problem(source):
        raise WeightsError(f"{setting}={download.shown(source)!r} {problem}.")
    manifest = Manifest(variant="prompt-enhancer")  # nothing known beyond the layout
    check = content_check()
    root_dir = weights_root()
    key = download.identity(source)  # as for the video weights: a renewed URL, the same file
    entry = root_dir / f"prompt-enhancer-{sha256(key.encode()).hexdigest()[:12]}"
    root = cache.published(entry, [key], manifest, check)
    if root is not None:
        log.info(f"prompt enhancer: using cached {root}")
        return from_cache(root, entry)
    if not writable(root_dir):
        cache.published(entry, [key], manifest, check, explain=True)  # logs why
        raise not_writable(root_dir, "the prompt enhancer's model", explained=True)
    root_dir.mkdir(parents=True, exist_ok=True)
    with cache.entry_lock(entry):
        root = cache.published(entry, [key], manifest, check, explain=True)
        if root is not None:
            return from_cache(root, entry)
        cache.discard(entry)
        cache.remove_leftovers(entry)
        return Resolved(_fetch(source, entry, manifest, check, setting), entry, source)


def _fetch(source: str, entry: Path, manifest: Manifest, check: str, setting: str) -> Path:
    staging = entry.parent / f".{entry.name}.staging"
    started = time.monotonic()
    shown = download.shown(source)
    log.info(f"prompt enhancer: fetching {shown} into {entry}")
    version = download.local_version(source)  # before the copy: a change during it shows later
    try:
        if source.startswith("hf://"):
            fetch_hub(source, staging, HF_PATTERNS)
            hashes = {}
        else:
            hashes = fetch_tar(source, staging, setting)
        verified = verify_causal_lm(staging, source, hashes)
    except BadSource:
        cache.discard(staging)
        raise
    if check == "sha256":  # pget and the Hub give no hashes: read the files back
        hash_unhashed(verified)
    key = download.identity(source)  # never a presigned URL's signature
    marker = {"format": cache.MARKER_FORMAT, "variant": entry.name, "source": key}
    if version is not None:
        marker["validator"] = version
    marker.update(cache.marker_fields(verified, staging, manifest))
    cache.publish(staging, entry, marker)
    log.info(
        f"prompt enhancer: {shown} ready in {time.monotonic() - started:.1f} s "
        f"({verified.size / 1e9:.2f} GB; checked: {', '.join(verified.checks)})"
    )
    return entry / verified.root.relative_to(staging)


def verify_causal_lm(
    directory: Path, source: str, hashes: dict[str, str | None] | None = None
) -> Verified:
    """Check a transformers causal-LM checkpoint: config, tokenizer, whole safetensors."""
    check_contained(directory, download.shown(source))
    root = _model_root(directory)
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        # Not our marker and journal (.cogvideox-*), nor the hub's download state (.cache/).
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = {"size": path.stat().st_size, "sha256": None}
    for path, digest in (hashes or {}).items():
        try:
            rel = (directory / path).relative_to(root).as_posix()
        except ValueError:
            continue
        if digest and rel in files:
            files[rel]["sha256"] = digest
    problems = _layout_problems(root, files)
    for rel in sorted(files):
        if rel.endswith(".safetensors"):
            problems += [f"{rel}: {p}" for p in check_safetensors(root / rel)]
        elif rel.endswith(".index.json"):
            problems += [f"{rel}: {p}" for p in check_shard_index(root / rel)]
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:12])
        raise BadSource(
            f"{download.shown(source)} is not a complete transformers checkpoint:\n{shown}"
        )
    return Verified(root=root, checks=list(CHECKS), files=files)


def _model_root(directory: Path) -> Path:
    """The folder holding config.json: the top, or a single folder a tar wrapped it in."""
    if (directory / "config.json").is_file():
        return directory
    children = [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(children) == 1 and (children[0] / "config.json").is_file():
        return children[0]
    return directory  # _layout_problems names what is missing


def _layout_problems(root: Path, files: dict[str, dict]) -> list[str]:
    problems = []
    try:
        config = json.loads((root / "config.json").read_text())
        if not isinstance(config, dict) or "model_type" not in config:
            problems.append("config.json: no model_type (not a transformers config)")
    except FileNotFoundError:
        problems.append("config.json: missing")
    except (OSError, ValueError) as error:
        problems.append(f"config.json: unreadable ({error})")
    tokenizer = {"tokenizer.json", "tokenizer.model", "vocab.json"} & set(files)
    if not tokenizer:
        problems.append("no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if not any(rel.endswith(".safetensors") for rel in files):
        problems.append("no weights (.safetensors)")
    return problems
