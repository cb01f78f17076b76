"""Budgets on what a file can make bnfold compute or hold; generous for real models, changeable by the user.

Each limit has an environment variable (read when a command starts) and can be set in
Python through :data:`LIMITS`:

- ``BNFOLD_MAX_CONSTANT_ELEMENTS`` (default 2**25 = 33.5 M values): the largest value the ONNX pass computes
  from constants (Expand, ConstantOfShape, arithmetic, ...). A larger one counts as not constant, and a fold
  that needs it is refused with that reason.
- ``BNFOLD_MAX_ZIP_RATIO`` (default 100): the largest inflated/compressed ratio of a compressed entry in a
  ``.pt``/``.pt2`` zip archive (torch.save stores entries uncompressed, ratio 1).
- ``BNFOLD_MAX_ZIP_INFLATED`` (default 2**36 = 64 GiB): the largest total a zip archive may declare.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["LIMITS", "Limits"]


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(float(text))
    except ValueError:
        return default
    return value if value > 0 else default


@dataclasses.dataclass
class Limits:
    """The budgets in force (see the module docstring)."""

    max_constant_elements: int = dataclasses.field(
        default_factory=lambda: _env_int("BNFOLD_MAX_CONSTANT_ELEMENTS", 2**25)
    )
    max_zip_ratio: int = dataclasses.field(default_factory=lambda: _env_int("BNFOLD_MAX_ZIP_RATIO", 100))
    max_zip_inflated: int = dataclasses.field(default_factory=lambda: _env_int("BNFOLD_MAX_ZIP_INFLATED", 2**36))


LIMITS = Limits()
