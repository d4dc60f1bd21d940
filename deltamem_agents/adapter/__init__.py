"""δ-mem adapter: configuration, the attention hooks, state, and save/load."""

from .architectures import ARCHITECTURES, ArchitectureSpec, UnsupportedArchitectureError, resolve_architecture
from .config import DeltaMemConfig
from .io import (
    AdapterMismatchError,
    adapter_fingerprint,
    base_model_fingerprint,
    load_adapter,
    read_adapter_metadata,
    save_adapter,
)
from .kernel_choice import KERNELS, KernelUnavailableError
from .layer import DeltaMemLayer
from .model import DeltaMemModel, attach
from .official import (
    OfficialTensorError,
    UnsupportedOfficialConfigError,
    config_from_official,
    import_official_adapter,
)
from .resolve import fresh_adapter, resolve_adapter
from .state import DeltaMemState

__all__ = [
    "ARCHITECTURES",
    "AdapterMismatchError",
    "ArchitectureSpec",
    "DeltaMemConfig",
    "DeltaMemLayer",
    "DeltaMemModel",
    "DeltaMemState",
    "KERNELS",
    "KernelUnavailableError",
    "OfficialTensorError",
    "UnsupportedArchitectureError",
    "UnsupportedOfficialConfigError",
    "adapter_fingerprint",
    "attach",
    "base_model_fingerprint",
    "config_from_official",
    "fresh_adapter",
    "import_official_adapter",
    "load_adapter",
    "read_adapter_metadata",
    "resolve_adapter",
    "resolve_architecture",
    "save_adapter",
]
