"""Control flow that skips work across a vmapped batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def run_if(pred, fn, default):
    """``fn()`` where ``pred`` (bool scalar) holds, else ``default`` (like fn's output).

    A while loop of zero or one trip: under ``vmap`` fn runs only when some element of the
    batch needs it (a ``lax.cond`` would run it for every element).
    """
    return jax.lax.while_loop(lambda s: s[0], lambda s: (jnp.zeros((), bool), fn()), (pred, default))[1]
