"""Checks that a folder holds complete diffusers weights, with or without a manifest.

Without sizes and hashes we can still catch what an interrupted or corrupted transfer leaves:
model_index.json and each component's config must be there and parse, each model component
must hold weights, every safetensors header must parse and describe exactly the bytes its
file holds, and every shard index must name only shards that are present. A manifest adds
the files it lists, their sizes and their sha256.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadSource, WeightsError
from .manifest import Manifest, sha256_file

MODEL_INDEX = "model_index.json"
HIDDEN_PREFIX = ".cogvideox-"  # our marker and journal, never part of the weights
_MAX_HEADER = 100 << 20  # the safetensors format's own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


@dataclass
class Verified:
    root: Path
    checks: list[str]
    files: dict[str, dict]  # relative to root: {"size": n, "sha256": hex or None}

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


def find_model_root(directory: Path, source: str) -> Path:
    """The folder holding model_index.json: the top, or a single folder the tar wrapped."""
    if (directory / MODEL_INDEX).is_file():
        return directory
    children = [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
    children = [p for p in children if not p.name.startswith(".")]
    if len(children) == 1 and (children[0] / MODEL_INDEX).is_file():
        return children[0]
    raise WeightsError(
        f"{source} holds no {MODEL_INDEX} at its top (nor in a single top folder): it is not "
        f"a diffusers CogVideoX pipeline."
    )


def check_contained(directory: Path, source: str) -> None:
    """Refuse links that leave `directory` and special files, whoever wrote them (pget, hub)."""
    top = os.path.realpath(directory)
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(path)
                if os.path.commonpath([top, target]) != top:
                    rel = os.path.relpath(path, top)
                    raise BadSource(
                        f"refusing unsafe weights from {source}: {rel} links to {target}, "
                        f"outside the weights folder"
                    )
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BadSource(
                    f"refusing unsafe weights from {source}: {os.path.relpath(path, top)} "
                    f"is not a regular file or folder"
                )


def verify(
    directory: Path,
    manifest: Manifest,
    source: str,
    hashes: dict[str, str | None] | None = None,
    hash_missing: bool = True,
    in_place: bool = False,
) -> Verified:
    """Check `directory` and return what was verified, or raise naming every failed check.

    `hashes`: sha256 already computed while the files were written, by path relative to
    `directory`. Files the manifest gives a sha256 for and that are not in `hashes` are read
    and hashed when `hash_missing`, else only their size is checked. `in_place`: a folder
    of the user's, used where it is (the error then says to fix it, not that it is dropped).
    """
    root = find_model_root(directory, source)
    checks = ["layout", "configs", "safetensors", "shard indexes"]
    files = _files(root)
    for path, digest in (hashes or {}).items():
        rel = Path(os.path.relpath(Path(directory, path), root)).as_posix()
        if rel in files and digest:
            files[rel]["sha256"] = digest
    problems = _check_components(root)
    for rel in sorted(files):
        if rel.endswith(".safetensors"):
            problems += [f"{rel}: {p}" for p in check_safetensors(root / rel)]
        elif rel.endswith(".index.json"):
            problems += [f"{rel}: {p}" for p in check_shard_index(root / rel)]
    if manifest.files:
        checks.append("manifest files")
    if any(spec.size is not None for spec in manifest.files.values()):
        checks.append("sizes")
    if any(spec.sha256 for spec in manifest.files.values()):
        checks.append("sha256" if hash_missing else "sha256 (where computed)")
    problems += _check_against_manifest(root, files, manifest, hash_missing)
    if problems:
        raise _failed(directory, source, problems, in_place)
    return Verified(root=root, checks=checks, files=files)


def _check_against_manifest(
    root: Path, files: dict[str, dict], manifest: Manifest, hash_missing: bool
) -> list[str]:
    """Each file the manifest lists: present, of its size, and of its sha256 where given."""
    problems = []
    for rel, spec in sorted(manifest.files.items()):
        found = files.get(rel)
        if found is None:
            problems.append(f"{rel}: missing (the manifest lists it)")
            continue
        if spec.size is not None and found["size"] != spec.size:
            problems.append(f"{rel}: {found['size']:,} bytes, the manifest says {spec.size:,}")
            continue
        if spec.sha256:
            if found["sha256"] is None and hash_missing:
                found["sha256"] = sha256_file(root / rel).hexdigest()
            if found["sha256"] is not None and found["sha256"] != spec.sha256.lower():
                problems.append(
                    f"{rel}: sha256 {found['sha256']}, the manifest says {spec.sha256.lower()}"
                )
    return problems


def _failed(directory: Path, source: str, problems: list[str], in_place: bool) -> BadSource:
    shown = "\n".join(f"  - {p}" for p in problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    advice = (
        f"Fix {directory}, or set COGVIDEOX_WEIGHTS_URL to another copy."
        if in_place
        else "They were not published; the next setup downloads them again. If this keeps "
        "happening the source itself is bad: check it, or set COGVIDEOX_WEIGHTS_URL to "
        "another copy."
    )
    return BadSource(f"weights from {source} failed verification:\n{shown}{more}\n{advice}")


def _files(root: Path) -> dict[str, dict]:
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(HIDDEN_PREFIX):
                continue
            path = Path(folder, name)
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                found[rel] = {"size": path.stat().st_size, "sha256": None}
    return found


def _config_name(cls: str) -> str:
    """Where diffusers and transformers look for a component's config."""
    if cls.endswith("Scheduler"):
        return "scheduler_config.json"
    if "Tokenizer" in cls:
        return "tokenizer_config.json"
    if cls.endswith(("ImageProcessor", "FeatureExtractor", "Processor")):
        return "preprocessor_config.json"
    return "config.json"


def _check_components(root: Path) -> list[str]:
    try:
        index = json.loads((root / MODEL_INDEX).read_text())
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        return [f"{MODEL_INDEX}: unreadable ({error})"]
    problems = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if value[0] is None or value[1] is None:
            continue  # a component the pipeline does without
        folder, config = root / name, _config_name(str(value[1]))
        try:
            json.loads((folder / config).read_text())
        except FileNotFoundError:
            problems.append(f"{name}/{config}: missing ({value[1]} needs it)")
            continue
        except (OSError, ValueError) as error:
            problems.append(f"{name}/{config}: unreadable ({error})")
            continue
        if config == "config.json" and not any(
            p.name.endswith((".safetensors", ".bin", ".index.json")) for p in folder.iterdir()
        ):
            problems.append(f"{name}/: no weights file (.safetensors or .bin)")
    return problems


def check_safetensors(path: Path) -> list[str]:
    """The header parses and accounts for every byte of the file.

    Hand-written rather than safetensors.safe_open, which does the length check too but
    memory-maps the file and reports only "MetadataIncompleteBuffer": we want the expected
    and actual sizes in the message.
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return [f"{size} bytes: too short for a safetensors file"]
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER):
            return [f"header length {length:,} does not fit the file ({size:,} bytes)"]
        try:
            header = json.loads(file.read(length))
            tensors = [(k, v) for k, v in header.items() if k != "__metadata__"]
            end = max((int(v["data_offsets"][1]) for _, v in tensors), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
            return [f"safetensors header does not parse ({error})"]
    problems = []
    for name, tensor in tensors:
        begin, stop = (int(x) for x in tensor["data_offsets"])
        width = _DTYPE_BYTES.get(tensor.get("dtype"))
        if width is not None and stop - begin != width * math.prod(tensor.get("shape", [])):
            problems.append(f"tensor {name}: {stop - begin} bytes for its shape and dtype")
            break
    if 8 + length + end != size:
        problems.append(
            f"the header describes {end:,} bytes of tensor data, the file holds "
            f"{size - 8 - length:,} (truncated or corrupt)"
        )
    return problems


def check_shard_index(path: Path) -> list[str]:
    try:
        shards = set(json.loads(path.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"shard index does not parse ({error})"]
    missing = sorted(s for s in shards if not (path.parent / s).is_file())
    return [f"names shard {s}, which is missing" for s in missing]
