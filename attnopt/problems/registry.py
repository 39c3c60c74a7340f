"""Named generators of seeded random problem instances.

``make(name, key, **options)`` builds an :class:`Instance`; ``attnopt check``
and the experiment configs use it. A generator is registered with
``@register("name")`` and takes ``key`` plus keyword options with defaults
(``dtype`` for the precision, where it has one). Registering a generator also
puts its problem under tests/test_problem_conformance.py.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Instance(NamedTuple):
    """A generated problem, a starting point, and the planted solution (or None)."""

    problem: Any
    x0: Any
    solution: Any


GENERATORS: dict[str, Callable[..., Instance]] = {}


def register(name: str):
    def decorate(fn):
        if name in GENERATORS:
            raise ValueError(f"problem generator {name!r} is already registered")
        GENERATORS[name] = fn
        return fn

    return decorate


def options(name: str) -> dict[str, Any]:
    """The options of generator ``name`` with their defaults."""
    _known(name)
    params = inspect.signature(GENERATORS[name]).parameters
    return {k: p.default for k, p in params.items() if k != "key"}


def make(name: str, key: jax.Array, **opts) -> Instance:
    """Build instance ``name`` from a PRNG key; unknown names or options raise ValueError."""
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for problem {name!r}; known: {sorted(allowed)}")
    return GENERATORS[name](key, **opts)


def _known(name):
    if name not in GENERATORS:
        raise ValueError(f"unknown problem {name!r}; known: {sorted(GENERATORS)}")


def noisy(key, target: jax.Array, noise: float) -> jax.Array:
    """``target∘(1 + noise * N(0, 1))``: multiplicative noise keeps the target's scale."""
    return target * (1 + noise * jax.random.normal(key, target.shape, target.dtype))


def conditioned_matrix(key, n: int, d: int, cond: float = 1.0, dtype="float64") -> jax.Array:
    """Random (n, d) matrix ``sqrt(n) Q1 diag(s) Q2^T`` with s log-spaced in [1/cond, 1].

    Q1 (n, d) and Q2 (d, d) have orthonormal columns, so the condition number
    of the result is ``cond`` and its entries are O(1).
    """
    if n < d:
        raise ValueError(f"conditioned_matrix needs n >= d, got n={n}, d={d}")
    if cond < 1:
        raise ValueError(f"cond must be >= 1, got {cond}")
    k1, k2 = jax.random.split(key)
    q1, _ = jnp.linalg.qr(jax.random.normal(k1, (n, d), dtype))
    q2, _ = jnp.linalg.qr(jax.random.normal(k2, (d, d), dtype))
    s = jnp.geomspace(1.0, 1.0 / cond, d).astype(dtype)
    return jnp.sqrt(n).astype(dtype) * (q1 * s) @ q2.T
