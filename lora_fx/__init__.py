"""lora_fx: LoRA as a compiler pass for torch.compile and torch.export.

Public API:
    LoraConfig, BdLoraConfig, backend, LoraBackend, transform, merge, unmerge, save_adapter, load_adapter, and
    the errors.
"""

from .adapter_files import load_adapter, save_adapter
from .backend import LoraBackend, backend
from .config import BdLoraConfig, LoraConfig
from .errors import AdapterFileError, ConfigError, LoraFxError, TargetNotFoundError, UnsupportedFeatureError
from .merging import merge, unmerge
from .program import transform
from .weighted import add_weighted_adapter

__all__ = [
    "AdapterFileError", "BdLoraConfig", "ConfigError", "LoraBackend", "LoraConfig", "LoraFxError",
    "TargetNotFoundError", "UnsupportedFeatureError", "add_weighted_adapter", "backend", "load_adapter", "merge",
    "save_adapter", "transform", "unmerge",
]
__version__ = "0.1.0"
