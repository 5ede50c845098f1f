"""Several named adapters over one base model, and which of them each row of a batch runs.

PEFT keeps adapters by name (`"default"` unless told otherwise) and runs the active one, or one per
row (`adapter_names=`). `NamedAdapters` is that state for lora_fx: an ordered name -> `AdapterSet`
table and a `Selection` (one adapter for every row, one name per row, or none: the base model).

Graphs over several adapters read every adapter's tensors as inputs plus an index saying which
adapter runs: a 0-d int64 (one adapter for the whole batch) or an int64 per row (a mixed batch),
-1 for the base model. The index is data, so switching adapters, or changing the per-row
assignment, recompiles nothing. An adapter's position in the table is its index; the table's
`layout` (names, and each adapter's tensors' shapes) is what graphs are built for: adding or
deleting an adapter changes it, and graphs are then built anew once.

Invariants: names are unique and never `"__base__"` (the per-row name of the base model); the
selection names only adapters in the table; every `AdapterSet` in the table has its own config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .adapters import AdapterSet
from .errors import ConfigError, LoraFxError

BASE_ROW = "__base__"  # a row that runs the base model (as `None`)
_MODULE_ATTRIBUTES = frozenset(vars(torch.nn.Module()))  # `training`, `_parameters`, ...: instance attributes
BASE_INDEX = -1


@dataclass(frozen=True)
class Selection:
    """What runs: `uniform` (one adapter, `names[0]`, every row), `mixed` (`names[i]` for row i;
    None: the base model), or `base` (no adapter)."""

    mode: str
    names: tuple[str | None, ...] = ()


class NamedAdapters:
    """The named adapters of one backend or program; see the module docstring.

    Example:
        >>> from lora_fx import LoraConfig
        >>> named = NamedAdapters()
        >>> named.add("a", AdapterSet(LoraConfig(r=2, target_modules=["q"])))
        >>> named.add("b", AdapterSet(LoraConfig(r=4, target_modules=["q"])))
        >>> named.set_rows(["b", None, "a"]); named.indices()
        [1, -1, 0]
    """

    def __init__(self):
        self.sets: dict[str, AdapterSet] = {}
        self.selection = Selection("base")
        self.disabled = 0  # `disable_adapter` blocks open: the base model runs, the selection is kept
        self.generation = 0  # bumped whenever the table changes (graphs built for it are stale)

    # -- the table -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sets)

    def __contains__(self, name: object) -> bool:
        return name in self.sets

    def __iter__(self) -> Iterator[str]:
        return iter(self.sets)

    def __getitem__(self, name: str) -> AdapterSet:
        return self.sets[self.check_name(name)]

    def items(self):
        return self.sets.items()

    def add(self, name: str, adapters: AdapterSet) -> None:
        """Add an adapter under a new name; the first one added becomes active."""
        self.check_new_name(name)
        self.sets[name] = adapters
        self.generation += 1
        if self.selection.mode == "base" and len(self.sets) == 1:
            self.selection = Selection("uniform", (name,))

    def check_new_name(self, name: str) -> None:
        """Refuse a name an adapter cannot have, or one already loaded.

        Raises:
            ConfigError: naming the name and the reason.
        """
        if not isinstance(name, str) or not name or name == BASE_ROW or "." in name:
            raise ConfigError(f"adapter name {name!r}: give a non-empty string without '.' (and not {BASE_ROW!r}, "
                              "which names the base model in a per-row list)")
        if hasattr(torch.nn.Module, name) or name in _MODULE_ATTRIBUTES:
            raise ConfigError(f"adapter name {name!r} is an attribute of every torch module, and the adapters live in "
                              "the model as PEFT names them (`q.lora_A.<name>.weight`); choose another name")
        if name in self.sets:
            raise ConfigError(f"an adapter named {name!r} is already loaded; load_adapter(dir, adapter_name={name!r}) "
                              "replaces its values in place, delete_adapter removes it")

    def delete(self, name: str) -> AdapterSet:
        """Remove an adapter that no row runs.

        Raises:
            LoraFxError: unknown name, or the adapter is active (switch to another one first).
        """
        self.check_name(name)
        if name in self.active:
            raise LoraFxError(f"adapter {name!r} is active (some row runs it, also after a disable_adapter block); "
                              "set_adapter another one before deleting it")
        self.generation += 1
        return self.sets.pop(name)

    def check_name(self, name: str) -> str:
        if name not in self.sets:
            raise LoraFxError(f"no adapter named {name!r}; the loaded adapters are {list(self.sets)}")
        return name

    def position(self, name: str | None) -> int:
        """The index of `name` in graphs (-1: the base model)."""
        if name is None:
            return BASE_INDEX
        return list(self.sets).index(name)

    # -- what runs -------------------------------------------------------------------------------
    @property
    def active(self) -> list[str]:
        """The adapters some row runs, in table order (PEFT's `active_adapters`; also while
        disabled, when they run again afterwards)."""
        return [n for n in self.sets if n in self.selection.names]

    @property
    def running(self) -> Selection:
        """What runs now: the selection, or the base model inside `disable_adapter`."""
        return Selection("base") if self.disabled else self.selection

    def set_uniform(self, name: str) -> None:
        self.selection = Selection("uniform", (self.check_name(name),))

    def set_rows(self, names: Sequence[str | None]) -> None:
        """One adapter name per row of the batch (`None` / `"__base__"`: the base model)."""
        if isinstance(names, str) or not isinstance(names, Sequence) or not len(names):
            raise ConfigError(f"set_adapter takes an adapter name, or a non-empty list of names (one per row of the "
                              f"batch); got {names!r}")
        rows = tuple(None if n in (None, BASE_ROW) else self.check_name(n) for n in names)
        self.selection = Selection("mixed", rows)

    def indices(self) -> list[int]:
        """The per-row indices of a mixed selection."""
        return [self.position(n) for n in self.running.names]

    def row_index(self, rows: int, device) -> torch.Tensor:
        """The index a graph reads now: 0-d for a uniform selection, one per row for a mixed one.

        Raises:
            LoraFxError: a per-row list whose length is not the batch's.
        """
        sel = self.running
        if sel.mode == "uniform":
            return torch.tensor(self.position(sel.names[0]), dtype=torch.int64, device=device)
        if len(sel.names) != rows:
            raise LoraFxError(f"set_adapter was given {len(sel.names)} adapter names (one per row), but this batch has "
                              f"{rows} rows")
        return torch.tensor(self.indices(), dtype=torch.int64, device=device)

    def layout(self) -> tuple:
        """What graphs over these adapters are built for: names and tensor shapes, in order."""
        return tuple((name, tuple((layer, tuple((k, tuple(t.shape)) for k, t in e.tensors.items()))
                                  for layer, e in s.entries.items()))
                     for name, s in self.sets.items())

    def primary(self) -> AdapterSet:
        """The adapter whose config the backend reports (`lora.config`): the first active one, else
        the first loaded."""
        names = self.active or list(self.sets)
        if not names:
            raise LoraFxError("no adapter is loaded")
        return self.sets[names[0]]
