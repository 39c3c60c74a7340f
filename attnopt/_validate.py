"""Argument checks run when a problem is built (outside jit).

Checks on values (finiteness, signs) are skipped for traced arrays, so a
problem can still be built inside a jitted function; shape checks always run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def float_dtype(*values):
    """The floating dtype the arrays (or nested lists) promote to; integers go to the default float.

    Complex data raises ValueError.
    """
    dtype = jnp.result_type(*(v if hasattr(v, "dtype") else jnp.asarray(v) for v in values))
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"complex data is not supported, got {dtype}")
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return dtype


def as_array(name: str, value, dtype, shape: tuple) -> jax.Array:
    """`value` as a `dtype` array of `shape` (None matches any size), finite.

    Raises ValueError naming `name` and the expected shape otherwise.
    """
    arr = jnp.asarray(value, dtype=dtype)
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        expected = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(arr.shape)}")
    if arr.size == 0 and arr.ndim > 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    if is_concrete(arr) and not bool(np.all(np.isfinite(np.asarray(arr)))):
        raise ValueError(f"{name} contains non-finite entries (nan or inf)")
    return arr


def nonnegative(name: str, arr: jax.Array) -> jax.Array:
    if is_concrete(arr) and bool(np.any(np.asarray(arr) < 0)):
        raise ValueError(f"{name} must be nonnegative, got min {float(np.min(np.asarray(arr)))}")
    return arr


def weights(name: str, value, dtype, shape: tuple) -> jax.Array:
    """A nonnegative weight given as a scalar or a ``shape`` array, returned with ``shape``."""
    arr = jnp.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = jnp.broadcast_to(arr, shape)
    kind = "a vector" if len(shape) == 1 else "an array"
    return nonnegative(name, as_array(f"{name} (a scalar or {kind})", arr, dtype, shape))


def params_shape(name: str, x, shape: tuple) -> None:
    """Raise ValueError naming ``name`` unless x (params, or an operator's input) has ``shape``.

    Checked at trace time, so it also runs inside jit.
    """
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def scalar(name: str, value, dtype) -> jax.Array:
    return nonnegative(name, as_array(name, value, dtype, ()))
