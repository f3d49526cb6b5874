"""The three facades: each public name lives in exactly one, and what a facade's functions
take and return is importable from that facade (or from the facades it builds on).

Like trio's test_exports: the facades only re-export (tests/test_layers.py checks that),
and this checks what they re-export.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
import warnings

import pytest

FACADES = ("pyautofs", "pyautofs.restore", "pyautofs.lowlevel")


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def test_each_public_name_lives_in_exactly_one_facade() -> None:
    seen: dict[str, str] = {}
    for facade in FACADES:
        for name in _module(facade).__all__:
            if name == "__version__":
                continue
            assert name not in seen, f"{name} is in both {seen[name]} and {facade}"
            seen[name] = facade


def _package_types(hint: object) -> typing.Iterator[type]:
    """The classes of the pyautofs package that a type hint names, however nested."""
    # A class named with a leading underscore is opaque: callers never name it.
    if (
        isinstance(hint, type)
        and hint.__module__.startswith("pyautofs")
        and not hint.__name__.startswith("_")
    ):
        yield hint
    for arg in typing.get_args(hint):
        yield from _package_types(arg)


def _signatures(obj: object) -> typing.Iterator[tuple[str, object]]:
    """(where, hint) for every annotation of a public function, class or method."""
    if inspect.isclass(obj):
        members = [(n, m) for n, m in vars(obj).items() if not n.startswith("_")]
        members.append(("__init__", getattr(obj, "__init__", None)))
        for name, member in members:
            func = member.fget if isinstance(member, property) else member
            if isinstance(func, (staticmethod, classmethod)):
                func = func.__func__
            if inspect.isfunction(func):
                for arg, hint in typing.get_type_hints(func).items():
                    yield f"{obj.__name__}.{name}({arg})", hint
        if hasattr(obj, "__attrs_attrs__"):
            for arg, hint in typing.get_type_hints(obj).items():
                yield f"{obj.__name__}.{arg}", hint
    elif inspect.isfunction(obj):
        for arg, hint in typing.get_type_hints(obj).items():
            yield f"{obj.__name__}({arg})", hint


# What each facade's signatures may name besides its own exports: the everyday types
# everywhere, and for restore tools the raw bindings they work with (docs/design/index.rst).
MAY_USE = {
    "pyautofs": ("pyautofs",),
    "pyautofs.restore": ("pyautofs.restore", "pyautofs", "pyautofs.lowlevel"),
    "pyautofs.lowlevel": ("pyautofs.lowlevel", "pyautofs"),
}


@pytest.mark.parametrize("facade", FACADES)
def test_what_a_facade_takes_and_returns_is_importable_from_it(facade: str) -> None:
    module = _module(facade)
    exported = {
        id(getattr(_module(other), n))
        for other in MAY_USE[facade]
        for n in _module(other).__all__
        if n != "__version__"
    }
    missing = set()
    for name in module.__all__:
        for where, hint in _signatures(getattr(module, name)):
            for cls in _package_types(hint):
                if id(cls) not in exported:
                    missing.add(f"{where}: {cls.__module__}.{cls.__qualname__}")
    assert not missing, f"{facade} uses types it does not export:\n" + "\n".join(sorted(missing))


def test_moved_names_still_import_from_the_old_place_with_a_warning() -> None:
    import pyautofs
    import pyautofs.restore

    with pytest.warns(DeprecationWarning, match=r"pyautofs\.restore\.install_fds"):
        old = pyautofs.install_fds
    assert old is pyautofs.restore.install_fds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from pyautofs.restore import snapshot_pipe  # the new place: no warning

        assert callable(snapshot_pipe)
    with pytest.raises(AttributeError):
        _ = pyautofs.no_such_name
