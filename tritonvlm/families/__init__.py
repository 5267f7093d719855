"""Model families: one module per family, found here by ``config.json``'s ``model_type``.

Every module of this package that defines a :class:`~tritonvlm.families.base.Family` subclass with a
``name`` is registered: adding a family is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from tritonvlm.families.base import Family

__all__ = [
    "Family",
    "UnsupportedModelError",
    "families",
    "family_for_config",
    "family_for_model",
    "family_names",
    "get_family",
]


class UnsupportedModelError(ValueError):
    """The checkpoint's ``model_type`` is not one this server knows how to serve."""


def family_names() -> list[str]:
    """The family names, without importing any family (a family's module is named after it)."""
    return sorted(
        i.name for i in pkgutil.iter_modules(__path__) if i.name != "base" and not i.name.startswith("_")
    )


@cache
def families() -> dict[str, type[Family]]:
    """Every registered family by its name, e.g. ``{"qwen2_5_vl": Qwen2_5_VLFamily, ...}``."""
    found: dict[str, type[Family]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Family)
                and value.name
                and value.__module__ == module.__name__
            ):
                found[value.name] = value
    return dict(sorted(found.items()))


def supported_model_types() -> dict[str, str]:
    """``model_type`` → family name."""
    return {t: name for name, fam in families().items() for t in fam.model_types}


def get_family(name: str) -> type[Family]:
    """The family class registered under ``name`` (e.g. ``"gemma3"``)."""
    try:
        return families()[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; known: {', '.join(families())}"
        ) from None


def family_for_config(config: Any) -> Family:
    """The family instance serving a loaded transformers config."""
    model_type = getattr(config, "model_type", None)
    name = supported_model_types().get(model_type)
    if name is None:
        supported = ", ".join(f"{t} ({f})" for t, f in sorted(supported_model_types().items()))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {supported}"
        )
    return families()[name](config)


def family_for_model(path_or_id: str, **kwargs: Any) -> Family:
    """The family of a checkpoint (a local directory or a hub id), from its ``config.json``."""
    from transformers import AutoConfig

    return family_for_config(AutoConfig.from_pretrained(path_or_id, **kwargs))
