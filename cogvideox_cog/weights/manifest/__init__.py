"""What complete weights are, per variant: where they come from and which files they hold.

The manifests live in `manifests/<variant>.json` beside this package. Each lists the sources
tried in order and the files a complete copy must hold, with size and sha256 where known;
a file without them is checked for presence and structure only (see verify.py).
COGVIDEOX_WEIGHTS_MANIFEST replaces the built-in manifest with one of your own, e.g. for a
private mirror whose hashes you know: `python -m cogvideox_cog.weights.manifest DIR VARIANT`
writes one for a directory of weights you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...errors import WeightsError
from ...settings import setting

MANIFEST_ENV = "COGVIDEOX_WEIGHTS_MANIFEST"
MANIFEST_DIR = Path(__file__).resolve().parents[1] / "manifests"
HASH_BLOCK = 8 << 20
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")  # a sha256 as written: 64 hex digits


@dataclass(frozen=True)
class FileSpec:
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    variant: str
    sources: tuple[str, ...] = ()
    # Paths relative to the model root (the folder holding model_index.json).
    files: dict[str, FileSpec] = field(default_factory=dict)
    origin: str = "built-in"

    @property
    def digest(self) -> str:
        """Identifies what a cache entry was verified against (recorded in its marker)."""
        files = {k: [v.size, v.sha256] for k, v in sorted(self.files.items())}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    def layout_only(self) -> Manifest:
        """The same files without sizes and hashes: what still holds for another source."""
        files = {name: FileSpec() for name in self.files}
        return replace(self, files=files, origin=f"{self.origin} (layout only)")


def load_manifest(variant: str) -> Manifest:
    """The manifest for `variant`: COGVIDEOX_WEIGHTS_MANIFEST if set, else the built-in one."""
    override = setting(MANIFEST_ENV)
    path = Path(override).expanduser() if override else MANIFEST_DIR / f"{variant}.json"
    try:
        data = json.loads(path.read_text())
        files = {name: _file_spec(name, spec) for name, spec in data.get("files", {}).items()}
        sources = data.get("sources", [])
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ValueError('"sources" must be a list of URLs')
        manifest = Manifest(
            variant=data.get("variant", variant),
            sources=tuple(sources),
            files=files,
            origin=str(path) if override else "built-in",
        )
    except FileNotFoundError:
        if override:
            raise WeightsError(f"{MANIFEST_ENV}={override}: no such file") from None
        return Manifest(variant=variant)
    except (OSError, ValueError, AttributeError, TypeError) as error:
        where = f"{MANIFEST_ENV}={override}" if override else f"built-in manifest {path.name}"
        raise WeightsError(f"{where} is not a valid weights manifest: {error}") from error
    if manifest.variant != variant:
        raise WeightsError(
            f"{MANIFEST_ENV}={override} describes {manifest.variant!r}, not {variant!r}"
        )
    return manifest


def _file_spec(name: str, spec) -> FileSpec:
    size, sha256 = spec.get("size"), spec.get("sha256") or None
    if size is not None and (type(size) is not int or size < 0):
        raise ValueError(f"{name}: size {size!r} is not a number of bytes")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)):
        raise ValueError(f"{name}: sha256 {sha256!r} is not 64 hex digits")
    return FileSpec(size=size, sha256=sha256)


def sha256_file(path: Path, prefix: int | None = None) -> hashlib._Hash:
    """A sha256 of the file (or of its first `prefix` bytes) to finish or compare.

    Not hashlib.file_digest: a resumed download hashes the part already on disk, a prefix.
    """
    digest = hashlib.sha256()
    remaining = path.stat().st_size if prefix is None else prefix
    with path.open("rb", buffering=0) as file:
        buffer = bytearray(HASH_BLOCK)
        view = memoryview(buffer)
        while remaining > 0:
            got = file.readinto(view[: min(remaining, HASH_BLOCK)])
            if not got:
                break
            digest.update(view[:got])
            remaining -= got
    return digest


def manifest_of_directory(directory: Path, variant: str, sources: list[str]) -> dict:
    """A manifest (as JSON data) with the size and sha256 of every file of the weights in
    `directory`.

    Paths are relative to the model root, as verify() reads them: a cache entry of a tar that
    wrapped the weights in one top folder holds them there. Hidden files and folders are left
    out, as verify() leaves them: `hf download --local-dir` keeps its own state in `.cache/`,
    which no copy fetched from the Hub has. The top's other files (a repository's README.md,
    LICENSE) are left out too: no part of the pipeline, and not fetched from the Hub.
    """
    from ..verify import MODEL_INDEX, find_model_root  # verify.py imports this module

    root = find_model_root(directory, str(directory))
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folder == str(root):
            names = [MODEL_INDEX]
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(folder, name)
            if path.is_file():
                files[path.relative_to(root).as_posix()] = {
                    "size": path.stat().st_size,
                    "sha256": sha256_file(path).hexdigest(),
                }
    return {"variant": variant, "sources": sources, "files": dict(sorted(files.items()))}


def main(argv: list[str] | None = None) -> None:
    """Print a manifest of DIR.

    Usage: python -m cogvideox_cog.weights.manifest DIR VARIANT [SOURCE ...]
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.exit(main.__doc__)
    try:
        data = manifest_of_directory(Path(args[0]), args[1], args[2:])
    except WeightsError as error:
        sys.exit(str(error))
    print(json.dumps(data, indent=2))
