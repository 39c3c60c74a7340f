"""Solvers by name: ``attnopt.solvers.get(name, **options)`` for configs, the CLI and users.

Names are the attnopt solvers registered with :func:`register` and every optax
optimiser alias (``adam``, ``adamw``, ``sgd``, ``lbfgs``, ...). A list of
specs ``{"name": ..., **options}`` is an ``optax.chain``; an option given as
``{"name": <optax schedule>, **options}`` is that schedule.
"""
from __future__ import annotations

import inspect
from typing import Callable

import optax

from attnopt.solvers.first_order import from_optax, schedule_option
from attnopt.solvers.state import Solver

_CONSTRUCTORS: dict[str, Callable[..., Solver]] = {}


def register(name: str):
    """Register a solver constructor under ``name`` (it then appears in :func:`names` and configs)."""

    def decorate(constructor):
        if name in _CONSTRUCTORS or name in optax_names():
            raise ValueError(f"solver name {name!r} is already taken")
        _CONSTRUCTORS[name] = constructor
        return constructor

    return decorate


def optax_names() -> tuple[str, ...]:
    """The optax optimiser aliases (functions of ``optax`` defined in its alias module)."""
    return tuple(
        n for n in dir(optax)
        if callable(getattr(optax, n)) and getattr(getattr(optax, n), "__module__", "") == "optax._src.alias"
    )


def names() -> tuple[str, ...]:
    """Every solver name :func:`get` accepts: attnopt's, then optax's."""
    return tuple(_CONSTRUCTORS) + optax_names()


def constructor(name: str) -> Callable:
    """The function whose signature lists the options of solver ``name`` (attnopt's, or the optax alias)."""
    if name in _CONSTRUCTORS:
        return _CONSTRUCTORS[name]
    if name in optax_names():
        return getattr(optax, name)
    raise ValueError(f"unknown solver {name!r}; known: {', '.join(names())}")


def chain(transforms: list) -> Solver:
    """``optax.chain`` of optax specs ``{"name": ..., **options}`` (or bare names), run as one solver."""
    if not isinstance(transforms, list) or not transforms:
        raise ValueError(f"transforms must be a non-empty list of optax specs, got {transforms!r}")
    return from_optax(transforms)


def get(name: str | list, **options) -> Solver:
    """The solver ``name`` with ``options``; a list of optax specs gives their ``optax.chain``.

    Unknown names and options raise ValueError listing what exists.
    """
    if isinstance(name, list):
        if options:
            raise ValueError("a chain takes its options inside each spec, not as keywords")
        return chain(name)
    build = constructor(name)
    params = inspect.signature(build).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for solver {name!r}; known: {sorted(params)}")
    if name in _CONSTRUCTORS:
        return build(**{k: schedule_option(v) for k, v in options.items()})
    return from_optax(name, **options)
