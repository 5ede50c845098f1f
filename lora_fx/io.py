"""PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

Loading never unpickles (a directory holding only `adapter_model.bin` is refused). Saving is
atomic: files are written into a temporary sibling directory, flushed, then swapped in, so an
interrupted save leaves either the old directory or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LoraConfig
from .errors import AdapterFileError, ConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# What `backend` and `transform` take: a config (a fresh adapter) or a PEFT adapter directory.
Spec = LoraConfig | str | os.PathLike


def is_adapter_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path)


def read_spec(spec: Spec) -> tuple[LoraConfig, dict[str, torch.Tensor] | None]:
    """A `LoraConfig` (fresh adapter, no tensors) or a PEFT adapter directory (config + tensors)."""
    if isinstance(spec, LoraConfig):
        return spec, None
    if isinstance(spec, (str, os.PathLike)):
        if not is_adapter_dir(spec):
            raise AdapterFileError(f"adapter directory {os.fspath(spec)!r} does not exist")
        return read_adapter_dir(spec)
    raise ConfigError(f"spec must be a LoraConfig or a PEFT adapter directory, got {type(spec).__name__}")


def read_adapter_dir(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory.

    Raises:
        AdapterFileError: missing directory/file, pickle-only weights, truncated or corrupt file.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterFileError(f"adapter directory {path!r} does not exist")
    cfg = LoraConfig.from_pretrained(path)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise AdapterFileError(
                f"{path}: only adapter_model.bin (a pickle) is present; lora_fx never unpickles. "
                "Re-save the adapter with safe_serialization=True")
        raise AdapterFileError(f"{path}: no {WEIGHTS_NAME}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{weights}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return cfg, tensors


def write_adapter_dir(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a PEFT adapter directory atomically (other files already in `path` are kept)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise AdapterFileError(f"cannot save adapter: {path!r} exists and is not a directory")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
        save_file(cpu, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(path):
            for name in os.listdir(path):  # keep e.g. a README next to the adapter
                if name not in (WEIGHTS_NAME, CONFIG_NAME):
                    src = os.path.join(path, name)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
