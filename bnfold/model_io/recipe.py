"""The rebuild recipe that bnfold's own files carry, read as data, and what a file may make bnfold build.

Folded checkpoints (``bnfold.folded/1``), trainer checkpoints (``bnfold.trained/1``)
and folded ``.safetensors`` say which architecture rebuilds them. A file is a
stranger's word: it may name a built-in zoo architecture (a fixed list in the
package, built with its keyword arguments as plain data), but code it names
(``package.module:callable``) is imported and called only when the user names the
same code (``--arch``) or opts in (``--trust-arch``, documented as running code).
Every field is checked for type and size before anything is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from bnfold import zoo
from bnfold.errors import BnfoldError

__all__ = [
    "FOLDED_FORMAT",
    "MAX_INPUT_ELEMENTS",
    "TRAINED_FORMAT",
    "Recipe",
    "choose_arch",
    "check_kwargs",
    "parse_recipe",
]

FOLDED_FORMAT = "bnfold.folded/1"
TRAINED_FORMAT = "bnfold.trained/1"
KNOWN_FORMATS = (FOLDED_FORMAT, TRAINED_FORMAT)
MAX_INPUT_ELEMENTS = 2**24  # one example's values: 3 x 2048 x 2048 fits
_MAX_TEXT = 65_536  # characters of a JSON field
_MAX_INT = 2**16  # a zoo keyword argument from a file (widths, depths)
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_ARCH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_.]*")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a self-describing file says rebuilds its model.

    Attributes:
        format: ``bnfold.folded/1`` or ``bnfold.trained/1``.
        arch: A zoo name or ``package.module:callable``.
        arch_kwargs: Keyword arguments for it (plain JSON values).
        replaced: Folded files: module name -> the kind of BN folded away.
        input_shape: Trainer files: one example's shape, without the batch axis.
    """

    format: str
    arch: str
    arch_kwargs: dict[str, Any]
    replaced: dict[str, str] = dataclasses.field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None

    @property
    def names_code(self) -> bool:
        """Whether the recipe names code rather than a zoo architecture."""
        return self.arch not in zoo.ZOO


def _json_field(raw: Mapping[str, Any], key: str, source: str) -> Any:
    value = raw.get(key)
    if isinstance(value, str):
        if len(value) > _MAX_TEXT:
            raise BnfoldError(f"{source}: the recipe's {key} is longer than {_MAX_TEXT} characters")
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise BnfoldError(f"{source}: the recipe's {key} is not valid JSON ({error.msg})") from None
        except RecursionError:
            raise BnfoldError(f"{source}: the recipe's {key} is nested too deeply") from None
    return value


def _plain(value: Any, depth: int = 0) -> bool:
    """JSON-plain data of bounded depth: what a zoo factory may receive from a file."""
    if depth > 4:
        return False
    if value is None or isinstance(value, bool | str):
        return not isinstance(value, str) or len(value) <= 256
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
    return False


def parse_recipe(raw: Mapping[str, Any], source: str) -> Recipe:
    """Validate a self-describing file's recipe as data.

    Args:
        raw: The checkpoint dict, or safetensors metadata (all strings).
        source: The file, for messages.

    Returns:
        The recipe.

    Raises:
        BnfoldError: A missing or mistyped field, an unknown format, or an
            implausible value; one line naming the field.
    """
    fmt = raw.get("format")
    if fmt not in KNOWN_FORMATS:
        raise BnfoldError(
            f"{source}: unknown bnfold format {str(fmt)[:40]!r} (this bnfold reads {', '.join(KNOWN_FORMATS)})"
        )
    arch = raw.get("arch")
    if not isinstance(arch, str) or not arch:
        raise BnfoldError(f"{source}: the recipe has no architecture name (field 'arch')")
    if arch not in zoo.ZOO and not _ARCH.fullmatch(arch):
        raise BnfoldError(
            f"{source}: the recipe's arch {arch[:80]!r} is neither a zoo name nor package.module:callable"
        )
    kwargs = _json_field(raw, "arch_kwargs", source)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise BnfoldError(f"{source}: the recipe's arch_kwargs is not a JSON object")
    replaced: dict[str, str] = {}
    if fmt == FOLDED_FORMAT:
        value = _json_field(raw, "replaced", source)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and _NAME.fullmatch(k) and isinstance(v, str) for k, v in value.items()
        ):
            raise BnfoldError(f"{source}: the recipe's 'replaced' is not a map of module names to BN kinds")
        replaced = dict(value)
    shape = None
    if fmt == TRAINED_FORMAT:
        value = _json_field(raw, "input_shape", source)
        if (
            not isinstance(value, list | tuple)
            or not 1 <= len(value) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
        ):
            raise BnfoldError(f"{source}: the recipe's input_shape is not a list of positive integers")
        shape = tuple(value)
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise BnfoldError(
                f"{source}: the recipe's input_shape {list(shape)} has over {MAX_INPUT_ELEMENTS} values an example"
            )
    return Recipe(fmt, arch, kwargs, replaced, shape)


def check_kwargs(arch: str, kwargs: dict[str, Any], source: str) -> None:
    """Refuse keyword arguments a zoo factory does not take, or values that are not small plain data.

    Raises:
        BnfoldError: An unknown keyword, a value that is not JSON-plain, or an
            integer too large to be a width or depth.
    """
    params = inspect.signature(zoo.ZOO[arch].factory).parameters
    for key, value in kwargs.items():
        if key not in params:
            raise BnfoldError(
                f"{source}: {arch} takes no argument {key[:40]!r} (it takes {', '.join(params) or 'none'})"
            )
        if not _plain(value):
            raise BnfoldError(f"{source}: {arch} argument {key} is not plain data")
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > _MAX_INT for v in numbers):
            raise BnfoldError(f"{source}: {arch} argument {key}={str(value)[:40]} is implausibly large")


def choose_arch(
    recipe: Recipe,
    source: str,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_arch: bool = False,
) -> tuple[str, dict[str, Any]]:
    """What to build for a self-describing file: what the user named, a zoo entry, or refuse.

    Args:
        recipe: What the file says.
        source: The file, for messages.
        arch: The user's ``--arch``: it wins, since the user names that code.
        arch_kwargs: The user's ``--arch-kwargs`` (else the file's, when the
            user's ``--arch`` is the file's).
        trust_arch: Build code the file names (``--trust-arch``).

    Returns:
        ``(arch, kwargs)``.

    Raises:
        BnfoldError: The file names code and the user did neither name it nor
            opt in.
    """
    if arch:
        if arch_kwargs:
            return arch, dict(arch_kwargs)
        kwargs = dict(recipe.arch_kwargs) if arch == recipe.arch else {}
        if arch in zoo.ZOO:
            check_kwargs(arch, kwargs, source)
        return arch, kwargs
    if recipe.names_code and not trust_arch:
        raise BnfoldError(
            f"{source}: its recipe names code ({recipe.arch}), which bnfold does not run on a file's word; "
            f"pass --arch {recipe.arch} (arch= in Python) if you trust that code, or --trust-arch to build what "
            "the file names"
        )
    if not recipe.names_code:
        check_kwargs(recipe.arch, recipe.arch_kwargs, source)
    return recipe.arch, dict(recipe.arch_kwargs)
