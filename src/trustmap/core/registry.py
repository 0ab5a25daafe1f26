"""The one registry of explainers.

Every explainer registers itself with :func:`register` under its canonical snake_case
name. Registering a name twice raises instead of silently replacing the first method.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from trustmap.errors import InputError, InputTypeError

if TYPE_CHECKING:
    from trustmap.core.base import Explainer

_REGISTRY: dict[str, type[Explainer]] = {}

FAMILIES = (
    "gradient",
    "cam",
    "perturbation",
    "relevance",
    "counterfactual",
    "attention",
    "anomaly",
)

#: What a method may need besides the explained classifier (``Explainer.needs``):
#: nothing, trainable attention inside the model, a trained autoencoder, or trained
#: counterfactual generators. ``--method all`` and the demo run the methods that need nothing.
NEEDS = ("", "attention", "autoencoder", "generators")

E = TypeVar("E", bound="type[Explainer]")


def register(
    name: str,
    *,
    family: str,
    summary: str,
    paper: str,
    output: str = "input",
    model_dependent: bool = True,
    needs: str = "",
) -> Callable[[E], E]:
    """Class decorator that registers an explainer under ``name``.

    Parameters
    ----------
    name:
        Canonical snake_case method name used by :func:`trustmap.explain`.
    family:
        One of :data:`FAMILIES`.
    summary:
        One line for ``trustmap methods``.
    paper:
        Short citation of the paper that defines the method.
    output:
        ``"input"`` when the map has the input's shape ``(B, C, *spatial)``,
        ``"single"`` when it is one channel ``(B, 1, *spatial)`` (CAM methods).
    model_dependent:
        Whether the map reads the explained model's weights. False for maps computed by
        something else (an autoencoder's reconstruction error, counterfactual
        generators): randomizing the classifier cannot change them, so a randomization
        test says nothing about them.
    needs:
        One of :data:`NEEDS`: what the method needs besides a classifier.
    """
    if not name.isidentifier() or name.lower() != name:
        raise InputError(f"method name {name!r} must be snake_case")
    if family not in FAMILIES:
        raise InputError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if output not in ("input", "single"):
        raise InputError(f"output must be 'input' or 'single', got {output!r}")
    if needs not in NEEDS:
        raise InputError(f"needs must be one of {NEEDS}, got {needs!r}")

    def decorator(cls: E) -> E:
        if name in _REGISTRY:
            raise InputError(
                f"explainer {name!r} is already registered by {_REGISTRY[name].__qualname__}"
            )
        cls.name = name
        cls.family = family
        cls.summary = summary
        cls.paper = paper
        cls.output = output
        cls.model_dependent = bool(model_dependent)
        cls.needs = needs
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_methods() -> list[str]:
    """Names of all registered explainers, sorted."""
    _ensure_methods_imported()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Explainer]:
    """The explainer class registered under ``name``.

    Raises
    ------
    ValueError
        If no method has that name; the message suggests the closest names.
    """
    _ensure_methods_imported()
    if not isinstance(name, str):
        raise InputTypeError(f"method name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise InputError(f"unknown method {name!r}{hint} (see trustmap.list_methods())")


def _ensure_methods_imported() -> None:
    # The methods package registers everything on import; importing it here lets
    # ``trustmap.core`` be used on its own without a circular import at load time.
    import trustmap.methods  # noqa: F401
