"""The method registry: adding a method is one file and one ``@register_method`` line.

The built-in methods register when ``hybrid_peft.methods`` is imported, which importing ``hybrid_peft`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from hybrid_peft.errors import ConfigError

if TYPE_CHECKING:
    from hybrid_peft.config import AdapterConfig
    from hybrid_peft.layer import AdapterLayer

LayerT = TypeVar("LayerT", bound="type[AdapterLayer]")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[AdapterConfig]
    layer_class: type[AdapterLayer]


_METHODS: dict[str, MethodSpec] = {}


def register_method(config_class: type[AdapterConfig]):  # noqa: ANN201 - decorator
    """Class decorator for an :class:`~hybrid_peft.layer.AdapterLayer` that implements ``config_class.method``."""

    def decorator(layer_class: LayerT) -> LayerT:
        name = config_class.method
        if not name:
            raise TypeError(f"{config_class.__name__}.method is empty; set it to the method's name")
        if name in _METHODS and _METHODS[name].layer_class is not layer_class:
            raise TypeError(f"method {name!r} is already registered by {_METHODS[name].layer_class.__name__}")
        layer_class.config_class = config_class
        _METHODS[name] = MethodSpec(name, config_class, layer_class)
        return layer_class

    return decorator


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available methods: {sorted(_METHODS)}") from None


def available_methods() -> list[str]:
    return sorted(_METHODS)


def methods_in_registration_order() -> list[str]:
    """The methods in the order they registered (``methods/__init__.py`` imports the built-in ones simplest first)."""
    return list(_METHODS)
