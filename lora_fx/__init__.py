"""lora_fx: LoRA as a compiler pass for torch.compile and torch.export.

Public API:
    LoraConfig, BdLoraConfig, backend, LoraBackend, transform, merge, unmerge, save_adapter, load_adapter,
    add_weighted_adapter, adapter_state, aoti_package, and the errors.
"""

from .adapter_files import load_adapter, save_adapter
from .backend import LoraBackend, backend
from .config import BdLoraConfig, LoraConfig
from .errors import AdapterFileError, ConfigError, LoraFxError, TargetNotFoundError, UnsupportedFeatureError
from .merging import merge, unmerge
from .named_programs import adapter_state, aoti_package
from .program import transform
from .weighted import add_weighted_adapter

__all__ = [
    "AdapterFileError", "BdLoraConfig", "ConfigError", "LoraBackend", "LoraConfig", "LoraFxError",
    "TargetNotFoundError", "UnsupportedFeatureError", "adapter_state", "add_weighted_adapter", "aoti_package",
    "backend", "load_adapter", "merge", "save_adapter", "transform", "unmerge",
]
__version__ = "0.1.0"
