"""`ServerSettings`: every option of ``deltamem serve``, from ``DELTAMEM_*`` environment variables and flags.

Precedence: command-line flags (passed as keyword arguments) over environment variables over the defaults here.
The names follow the engine's options (``docs/engine.md``) where they are the engine's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..store.base import validate_identifier

__all__ = ["ServerSettings"]

#: Requests running in the engine at once unless ``max_concurrency`` says otherwise.
DEFAULT_CONCURRENCY = 4

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class ServerSettings(BaseSettings):
    """Options of the OpenAI-compatible server (``deltamem serve``; environment: ``DELTAMEM_<NAME>``).

    Attributes:
        host, port: where to listen. Without API keys the server only binds a loopback host.
        store: session store URL (SQLite file or ``postgresql://``); API keys live in the same database.
            ``None``: the SQLite file in the deltamem cache dir.
        model, adapter: as :class:`~deltamem_agents.engine.MemoryEngine` (``None``: the embedded model and the
            shipped adapter).
        device, dtype: where and in which precision a model given by name is loaded (``None``: CUDA when
            present, else the CPU; bfloat16 on CUDA, float32 on the CPU). The adapter and the memory state stay
            float32 whatever the base's dtype.
        mode, window_tokens, kv_tokens, kv_cache_bytes, kv_cache_dir, max_message_tokens, max_new_tokens: the
            engine's options (``max_new_tokens`` is the default answer length when a request names none).
        protocol: the engine's ``protocol``: ``"deltamem"`` (default) or ``"authors"`` (the authors' chat
            protocol, an option; ``mode="online"`` only and not with ``batch_decode``).
        threads: torch CPU threads (``None``: half the CPUs, 1-4, as every ``deltamem`` command).
        namespace: the namespace of local single-user mode (no API keys); keys carry their own.
        max_queue: requests admitted to the model at once, running plus waiting; one more gets 503.
        max_concurrency: of those, how many run in the engine at the same time (the rest wait in order);
            ``None``: ``min(4, max_queue)``, or ``min(batch_max_rows, max_queue)`` with ``batch_decode``. Without
            batching, forward calls of different sessions interleave on one model lock anyway, so more only
            helps while sessions load, commit or wait for a slow client; with it, this bounds the batch.
        batch_decode: run the decode steps of concurrent requests as one batched forward (the engine's
            ``batch_decode``; off by default: each answer then equals its one-at-a-time answer within a
            floating-point tolerance, not bitwise; it pays on a GPU with many concurrent sessions).
        batch_max_rows: ``batch_decode``: most sessions in one batched step.
        on_divergence: what a chat completion whose messages diverge from what the session holds does, unless
            the request says (``on_divergence`` body field, ``X-DeltaMem-On-Divergence`` header):
            ``"reject"`` (default: 409 ``history_conflict``, nothing written) or ``"rollback"`` (roll back and
            replay the request's history: for chat UIs whose users edit and regenerate, one client per session).
        max_messages_per_call: most messages one request may carry (413 ``too_many_messages`` beyond).
        retry_after_s: the ``Retry-After`` header of a 503.
        max_import_bytes: largest session file ``POST /v1/sessions/import`` accepts (413 beyond).
        require_keys: refuse requests without a valid key even while no key exists (no local mode).
        log_level: uvicorn's and the server's log level.
    """

    model_config = SettingsConfigDict(env_prefix="DELTAMEM_", extra="ignore", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    store: str | None = None
    model: str | None = None
    adapter: str | None = None
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    mode: Literal["online", "windowed", "state-only"] = "online"
    protocol: Literal["deltamem", "authors"] = "deltamem"
    threads: int | None = Field(None, ge=0)
    namespace: str = "default"
    window_tokens: int = Field(1024, ge=0)
    kv_tokens: int | None = Field(None, ge=64)
    kv_cache_bytes: int = Field(2 * 1024**3, ge=0)
    kv_cache_dir: str | None = None
    max_message_tokens: int = Field(8192, ge=1)
    max_new_tokens: int = Field(512, ge=0)
    max_queue: int = Field(64, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    batch_decode: bool = False
    batch_max_rows: int = Field(16, ge=1)
    on_divergence: Literal["reject", "rollback"] = "reject"
    max_messages_per_call: int = Field(1000, ge=1)
    retry_after_s: int = Field(1, ge=0)
    max_import_bytes: int = Field(64 * 1024**2, ge=1)
    require_keys: bool = False
    log_level: LogLevel = "info"

    @field_validator("namespace")
    @classmethod
    def _namespace_is_an_identifier(cls, value: str) -> str:
        return validate_identifier(value, "namespace")

    @field_validator("device")
    @classmethod
    def _device_is_a_torch_device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import torch

        try:
            return str(torch.device(value))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"not a torch device: {value!r} ({exc})") from None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: object) -> object:
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
        return aliases.get(value.lower(), value.lower()) if isinstance(value, str) else value

    @field_validator("store", "model", "adapter", "device", "dtype", "kv_cache_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An empty environment variable (DELTAMEM_STORE=) means "the default", not a path named "".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kv_cache_dir")
    @classmethod
    def _none_word(cls, value: str | None) -> str | None:
        return None if value is not None and value.lower() == "none" else value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_alias(cls, value: object) -> object:
        return "state-only" if value in ("state_only", "stateonly") else value

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("host must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.protocol == "authors" and (self.mode != "online" or self.batch_decode):
            raise ValueError("protocol 'authors' runs in mode 'online' only, without batch_decode")
        if self.max_concurrency is None:
            # with batching, the requests running in the engine at once are the batch: let it fill
            wanted = self.batch_max_rows if self.batch_decode else DEFAULT_CONCURRENCY
            self.max_concurrency = min(wanted, self.max_queue)
        elif self.max_concurrency > self.max_queue:
            # more could never run than are admitted; say so rather than silently capping
            raise ValueError(f"max_concurrency ({self.max_concurrency}) must be <= max_queue ({self.max_queue})")
        return self
