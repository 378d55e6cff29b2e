"""One vocabulary for attributor arguments, and deprecation aliases for the names it replaced.

Every attributor names the same idea the same way (enforced by ``tests/test_attributor_contract.py`` through
signature introspection):

* ``num_samples``: how many random samples / masks / perturbations are drawn (formerly ``samples``,
  ``n_samples``, ``n_masks``);
* ``baseline``: the value that replaces removed input (formerly ``fill``).

Old keyword names keep working for one deprecation period: :func:`renamed_arguments` maps them to the new ones
and warns with a :class:`DeprecationWarning`; :func:`renamed_attribute` does the same for reading the attribute;
the class decorator :func:`renamed` does both for a class.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DEPRECATED_NAMES", "renamed", "renamed_arguments", "renamed_attribute"]

#: Argument names that the vocabulary replaced, with their replacement.
DEPRECATED_NAMES: dict[str, str] = {
    "samples": "num_samples",
    "n_samples": "num_samples",
    "n_masks": "num_samples",
    "fill": "baseline",
}

_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound=type)


def renamed_arguments(**renames: str) -> Callable[[_F], _F]:
    """Decorate an ``__init__`` so that the old keyword names ``renames`` (``old="new"``) still work.

    Passing an old name warns (``DeprecationWarning``) and forwards the value to the new name; passing both is a
    ``TypeError``. A ``ValueError`` raised for a value given under its old name names the old name too, so the
    message matches what the caller wrote. ``inspect.signature`` shows the new names only.
    """

    def decorate(init: _F) -> _F:
        @functools.wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            owner = type(self).__name__
            used: dict[str, str] = {}
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{owner}: got both {old!r} (deprecated) and {new!r}; pass {new!r} only")
                    warnings.warn(
                        f"{owner}: argument {old!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=2
                    )
                    kwargs[new] = kwargs.pop(old)
                    used[new] = old
            try:
                return init(self, *args, **kwargs)
            except ValueError as err:
                message = str(err)
                hits = [(new, old) for new, old in used.items() if new in message]
                if not hits:
                    raise
                for new, old in hits:
                    message = message.replace(new, old, 1) + f" ({old!r} is the deprecated name of {new!r})"
                raise ValueError(message) from err

        wrapper.__renamed_arguments__ = dict(renames)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attribute(old: str, new: str) -> property:
    """A read-only property ``old`` that warns (``DeprecationWarning``) and returns ``self.<new>``."""

    def fget(self: Any) -> Any:
        warnings.warn(
            f"{type(self).__name__}.{old} is deprecated, use .{new}", DeprecationWarning, stacklevel=2
        )
        return getattr(self, new)

    return property(fget, doc=f"Deprecated alias of ``{new}``.")


def renamed(**renames: str) -> Callable[[_C], _C]:
    """Class decorator: the old names ``renames`` (``old="new"``) keep working as keywords of the class's own
    ``__init__`` (:func:`renamed_arguments`) and as read-only attributes (:func:`renamed_attribute`)."""

    def decorate(cls: _C) -> _C:
        cls.__init__ = renamed_arguments(**renames)(cls.__dict__["__init__"])  # type: ignore[misc]
        for old, new in renames.items():
            setattr(cls, old, renamed_attribute(old, new))
        return cls

    return decorate
