"""Encoder registry: names -> ModalityEncoder factories, built-ins plus third-party entry points.

Built-in encoders register themselves with `@register_encoder("name")` when `encoders` is imported. A
third-party package adds an encoder without touching mmr1 by declaring an entry point in its metadata:

    [project.entry-points."mmr1.encoders"]
    depth_cnn = "my_package:DepthEncoder"

Entry points are looked up lazily (when a name is not registered, and by `list_encoders`) and loaded only when
that name is asked for, so a broken plug-in cannot break `import encoders` or the other encoders. Nothing is
cached between lookups: a package installed (or put on sys.path) later in the process is still found.
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, TypeVar

from encoders.base import ModalityEncoder

ENTRY_POINT_GROUP = "mmr1.encoders"

EncoderFactory = Callable[..., ModalityEncoder]  # a ModalityEncoder subclass or a function returning one
F = TypeVar("F", bound=EncoderFactory)

_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[F], F]:
    """Decorator: register a ModalityEncoder subclass (or a factory returning one) under `name`.

    Registering the same object twice is a no-op (so is re-registering a reloaded module's class); a
    different object under a taken name is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")

    def decorator(factory: F) -> F:
        _add(name, factory, origin="register_encoder")
        return factory

    return decorator


def create_encoder(name: str, **kwargs: Any) -> ModalityEncoder:
    """Build the encoder registered (or declared as an entry point) under `name` with `kwargs`."""
    factory = _lookup(name)
    encoder = factory(**kwargs)
    if not isinstance(encoder, ModalityEncoder):
        raise TypeError(f"encoder {name!r} ({_describe(factory)}) returned {type(encoder).__name__}, "
                        "expected a ModalityEncoder instance")
    return encoder


def list_encoders() -> list[str]:
    """Every available encoder name, sorted: registered ones and those declared by installed entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _lookup(name: str) -> EncoderFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    declared = _entry_points()
    if name not in declared:
        available = ", ".join(sorted(set(_REGISTRY) | set(declared))) or "(none)"
        raise ValueError(f"unknown encoder {name!r}; available encoders: {available}. Third-party encoders are "
                         f"found through the {ENTRY_POINT_GROUP!r} entry-point group of an installed package")
    if len(declared[name]) > 1:
        targets = " and ".join(repr(ep.value) for ep in declared[name])
        raise ImportError(f"encoder entry point {name!r} (group {ENTRY_POINT_GROUP!r}) is declared by more than one "
                          f"installed package, with targets {targets}; uninstall one of them")
    ep = declared[name][0]
    factory = _load(ep)
    _add(name, factory, origin=f"entry point {ep.value!r}")
    return factory


def _entry_points() -> dict[str, list[EntryPoint]]:
    """Entry points of the group by name (a name declared by two packages with different targets lists both)."""
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets = found.setdefault(ep.name, [])
        if all(ep.value != other.value for other in targets):
            targets.append(ep)
    return found


def _load(ep: EntryPoint) -> EncoderFactory:
    try:
        factory = ep.load()
    except Exception as e:  # a plug-in can fail in any way at import; report it with its origin
        raise ImportError(f"cannot load encoder entry point {ep.name!r} = {ep.value!r} (group "
                          f"{ENTRY_POINT_GROUP!r}): {type(e).__name__}: {e}") from e
    if not callable(factory):
        raise TypeError(f"encoder entry point {ep.name!r} = {ep.value!r} is a {type(factory).__name__}, expected "
                        "a ModalityEncoder subclass or a function returning one")
    return factory


def _add(name: str, factory: EncoderFactory, origin: str) -> None:
    if not callable(factory):
        raise TypeError(f"cannot register encoder {name!r}: {factory!r} is not callable")
    current = _REGISTRY.get(name)
    if current is not None and not _same(current, factory):
        raise ValueError(f"encoder name {name!r} is already registered to {_describe(current)}; cannot register "
                         f"{_describe(factory)} ({origin}) under the same name")
    _REGISTRY[name] = factory


def _same(a: Any, b: Any) -> bool:
    # A reloaded module yields a new class object with the same qualified name: treat it as the same encoder.
    return a is b or _describe(a) == _describe(b)


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
