"""Argument checks run when a problem is built (outside jit), and the rules for generator options.

Every failure is a ``ValueError`` whose message starts with the argument's
name. Checks on values (finiteness, signs, range of the dtype) look at the
argument as given, so they also run while a generator is traced with
``jax.eval_shape`` on Python or NumPy values; they are skipped only for traced
arrays. Shape checks always run.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

#: The floating dtypes attnopt computes in.
SUPPORTED_DTYPES = (np.dtype("float32"), np.dtype("float64"))


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _given_dtype(name: str, value) -> np.dtype:
    """The dtype of ``value`` as given; ValueError naming it unless it is real numeric data."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(value).dtype
        except (TypeError, ValueError) as err:  # ragged nested lists
            raise ValueError(f"{name} must be a real number or array, got {type(value).__name__}: {err}") from None
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"{name}: complex data is not supported, got {dtype}")
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype.kind in "biu"):
        raise ValueError(f"{name} must be a real number or array, got {type(value).__name__} of dtype {dtype}")
    return dtype


def float_dtype(*values, **named):
    """The floating dtype the data promote to (integers go to the default float).

    Pass the data by name (``float_dtype(A=A, b=b)``) so that errors name the
    argument; positional values are named by position. Raises ValueError for
    data that is not real numbers (None, strings, complex) and for a result
    other than float32 or float64 (float16 and bfloat16 are not supported).
    """
    items = [(f"data argument {i + 1}", v) for i, v in enumerate(values)] + list(named.items())
    given = [(name, _given_dtype(name, v)) for name, v in items]
    dtype = jnp.result_type(*(v if hasattr(v, "dtype") else np.asarray(v) for _, v in items))
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    if np.dtype(dtype) not in SUPPORTED_DTYPES:
        names = ", ".join(name for name, d in given if d == dtype) or items[0][0]
        raise ValueError(f"{names}: dtype {np.dtype(dtype).name} is not supported; use float32 or float64")
    return dtype


def as_array(name: str, value, dtype, shape: tuple, *, nonnegative: bool = False) -> jax.Array:
    """`value` as a `dtype` array of `shape` (None matches any size), finite, within the range of `dtype`
    (and >= 0 with ``nonnegative``).

    Raises ValueError naming `name` (and the expected shape) otherwise.
    """
    _given_dtype(name, value)
    if is_concrete(value):
        given = np.asarray(value)
        if not np.all(np.isfinite(given)):
            raise ValueError(f"{name} contains non-finite entries (nan or inf)")
        largest = float(np.max(np.abs(given), initial=0))
        limit = float(jnp.finfo(dtype).max)
        if largest > limit:
            raise ValueError(
                f"{name} has entries beyond the range of {np.dtype(dtype).name} (largest magnitude {largest:.3g} > "
                f"{limit:.3g}); rescale the data or use float64 (jax.config.update('jax_enable_x64', True))"
            )
        if nonnegative and np.any(given < 0):
            raise ValueError(f"{name} must be nonnegative, got min {float(np.min(given))}")
    arr = jnp.asarray(value, dtype=dtype)
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        expected = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(arr.shape)}")
    if arr.size == 0 and arr.ndim > 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    return arr


def nonnegative(name: str, arr: jax.Array) -> jax.Array:
    if is_concrete(arr) and bool(np.any(np.asarray(arr) < 0)):
        raise ValueError(f"{name} must be nonnegative, got min {float(np.min(np.asarray(arr)))}")
    return arr


def weights(name: str, value, dtype, shape: tuple) -> jax.Array:
    """A nonnegative weight given as a scalar or a ``shape`` array, returned with ``shape``."""
    if np.ndim(value) == 0:
        return jnp.broadcast_to(as_array(name, value, dtype, (), nonnegative=True), shape)
    kind = "a vector" if len(shape) == 1 else "an array"
    return as_array(f"{name} (a scalar or {kind})", value, dtype, shape, nonnegative=True)


def params_shape(name: str, x, shape: tuple) -> None:
    """Raise ValueError naming ``name`` unless x (params, or an operator's input) has ``shape``.

    Checked at trace time, so it also runs inside jit.
    """
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def scalar(name: str, value, dtype) -> jax.Array:
    """A nonnegative finite scalar."""
    return as_array(name, value, dtype, (), nonnegative=True)


# --------------------------------------------------------------------------- generator options

#: Largest size option (n, d, T, ...) of a generator or a study.
MAX_SIZE = 2**31 - 1


def is_count(v) -> bool:
    """An int (not a bool) in [1, MAX_SIZE]."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE


def is_number(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


#: Rules for the generator options of the same name, shared by every generator (and the configs):
#: option -> (test, what it must be).
OPTION_RULES = {
    **{k: (is_count, f"an int in [1, {MAX_SIZE}]") for k in ("n", "d", "T")},
    "cond": (lambda v: is_number(v) and v >= 1, "a finite number >= 1"),
    **{k: (lambda v: is_number(v) and v >= 0, "a finite number >= 0")
       for k in ("reg", "ridge", "noise", "start_noise")},
    "scale": (is_number, "a finite number"),
    "dtype": (lambda v: isinstance(v, str) and v in [d.name for d in SUPPORTED_DTYPES], "'float32' or 'float64'"),
}


def option_error(key: str, value) -> str | None:
    """Why generator option ``key`` cannot be ``value`` ("must be ..."), or None if it can (or has no rule)."""
    rule = OPTION_RULES.get(key)
    if rule is None or rule[0](value):
        return None
    return f"must be {rule[1]}, got {value!r}"


def generator_options(**options) -> None:
    """Raise ValueError ``<key> must be ...`` for the first option that breaks its rule in :data:`OPTION_RULES`."""
    for key, value in options.items():
        error = option_error(key, value)
        if error:
            raise ValueError(f"{key} {error}")


def at_most(key: str, value: int, bound_key: str, bound: int) -> None:
    """Raise ValueError ``<key> must be <= <bound_key> ...`` unless ``value <= bound``."""
    if value > bound:
        raise ValueError(f"{key} must be <= {bound_key} ({bound}), got {value}")
