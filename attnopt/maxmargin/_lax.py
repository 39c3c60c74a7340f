"""Control flow that skips work across a vmapped batch.

A note on the solvers' structure: XLA:CPU runs independent operations concurrently, and
jaxlib's batched LAPACK kernels (Cholesky, SVD, ... under ``vmap``) split their batch over
the same thread pool and block a worker while they wait. Two independent batched
factorizations can then hold every worker of a small pool and deadlock (seen on 2 cores).
The solvers therefore keep their factorizations in one chain of data dependencies:
several factorizations of one shape are stacked into one batched call, and each stage
consumes the previous stage's result. The dependency must be on a value the next stage
computes with: XLA:CPU orders its thunks by the buffers they read, and a
``jax.lax.optimization_barrier`` (whose outputs alias its inputs) did not keep a solve from
starting beside the QP's Farkas certificate (seen on 2 cores). Separate solves (the QP,
then the nuclear-norm SVM of the same constraints) are separate compiled calls, each
waited for.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def run_if(pred, fn, default):
    """``fn()`` where ``pred`` (bool scalar) holds, else ``default`` (like fn's output).

    A while loop of zero or one trip: under ``vmap`` fn runs only when some element of the
    batch needs it (a ``lax.cond`` would run it for every element).
    """
    return jax.lax.while_loop(lambda s: s[0], lambda s: (jnp.zeros((), bool), fn()), (pred, default))[1]
