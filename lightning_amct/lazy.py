"""Package attributes imported on first use (PEP 562), so a light import stays light.

``import lightning_amct`` must not import Lightning (seconds per process): the ``plan`` command
and ``--help`` need only torch and protobuf. A package lists the modules that define its public
names; :func:`lazy_exports` returns its ``__all__`` and the module-level ``__getattr__`` and
``__dir__`` that import a name's module when the name is first read.

Example:
    >>> __all__, __getattr__, __dir__ = lazy_exports("pkg", {"math": ("sqrt", "pi")}, {})
    >>> __all__
    ['pi', 'sqrt']
    >>> __getattr__("sqrt")(9.0)
    3.0
    >>> __getattr__("nope")
    Traceback (most recent call last):
    ...
    AttributeError: module 'pkg' has no attribute 'nope'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence


def lazy_exports(
    package: str, modules: Mapping[str, Sequence[str]], namespace: MutableMapping[str, object]
) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: the package's name, for the error message.
        modules: each module that defines public names -> those names.
        namespace: the package's ``globals()``: an imported name is cached there, so the next
            read is an ordinary attribute lookup.
    """
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return sorted(exports), __getattr__, __dir__
