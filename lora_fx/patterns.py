"""The regular expressions of PEFT's target rules, in one place.

`config.py` compiles them to validate a config when it is built; `rules.py` matches with them.
Keeping the forms here means a pattern that validates is exactly the pattern that is matched.
"""

from __future__ import annotations

import re


def pattern_key_regex(key: str) -> str:
    """A `rank_pattern` / `alpha_pattern` key as PEFT's `get_pattern_key` matches it (`re.match`)."""
    return rf"(.*\.)?({key})$"


def layer_index_regex(layers_pattern: str | None) -> str:
    """The layer index of a module name (`re.match`), after `layers_pattern` if one is given."""
    if not layers_pattern:
        return r".*?\.[^.]*\.(?P<idx>\d+)\."
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def saved_module_regex(name: str) -> str:
    """A `modules_to_save` entry as PEFT keeps it out of LoRA's targets (`re.match`): the module
    and everything under it."""
    return rf"(^|.*\.){name}($|\..*)"


def compile_or_none(regex: str) -> re.error | None:
    """The `re.error` this regex raises when compiled, or None if it compiles."""
    try:
        re.compile(regex)
    except re.error as e:
        return e
    return None
