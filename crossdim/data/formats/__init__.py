"""One reader per dataset layout. `get_format(name)` returns the module (read_dataset, load_case)."""

from __future__ import annotations

import importlib
from types import ModuleType

FORMATS = ("msd", "brats", "camus", "chaos")


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}")
    return importlib.import_module(f"crossdim.data.formats.{name}")
