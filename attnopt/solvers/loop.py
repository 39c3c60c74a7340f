"""The driver: run any solver inside one ``jax.lax.while_loop``, alone, vmapped or sharded."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnopt.solvers.state import Solver, SolverState, Status, all_finite, tree_norm


class Trace(NamedTuple):
    """Per-iteration history, each of shape (max_steps + 1,) (batched: (batch, max_steps + 1)).

    Entry 0 is the start, entry k the state after step k; entries after the last step are NaN.
    """

    loss: jax.Array
    grad_norm: jax.Array
    step_size: jax.Array


class SolveResult(NamedTuple):
    """Outcome of :func:`solve`.

    state: the final :class:`SolverState` (on NONFINITE: the last finite iterate, or the start).
    converged: bool, ``status == Status.CONVERGED``.
    status: int32 :class:`Status` code.
    steps: int32, number of steps taken (``state.count``).
    trace: a :class:`Trace`.
    """

    state: SolverState
    converged: jax.Array
    status: jax.Array
    steps: jax.Array
    trace: Trace


def _status(state: SolverState, tol, max_steps: int) -> jax.Array:
    """The state's status after the stopping tests, in priority order:
    non-finite, a status the step set, gradient tolerance, step budget."""
    code = lambda s: jnp.asarray(s, jnp.int32)
    status = jnp.where(state.count >= max_steps, code(Status.MAX_STEPS), state.status)
    status = jnp.where(tree_norm(state.grad) <= tol, code(Status.CONVERGED), status)
    status = jnp.where(state.status != Status.RUNNING, state.status, status)
    finite = all_finite(state.params, state.value, state.grad)
    return jnp.where(finite, status, code(Status.NONFINITE))


def _record(trace: Trace, k, state: SolverState) -> Trace:
    entry = Trace(state.value, tree_norm(state.grad), state.step_size)
    return jax.tree.map(lambda column, x: column.at[k].set(x.astype(column.dtype)), trace, entry)


def _run(problem, x0, tol, solver: Solver, max_steps: int) -> SolveResult:
    state = solver.init(problem, x0)
    tol = jnp.asarray(tol, state.value.dtype)
    state = state._replace(status=_status(state, tol, max_steps))
    empty = jnp.full((max_steps + 1,), jnp.nan, state.value.dtype)
    trace = _record(Trace(empty, empty, empty), 0, state)

    def cond(carry):
        state, _ = carry
        return state.status == Status.RUNNING

    def body(carry):
        state, trace = carry
        new = solver.step(problem, state)
        new = new._replace(status=_status(new, tol, max_steps))
        bad = new.status == Status.NONFINITE
        # A step that produced non-finite values: keep the last finite iterate, report NONFINITE.
        new = jax.tree.map(lambda old, n: jnp.where(bad, old, n), state._replace(status=new.status), new)
        trace = jax.tree.map(lambda old, n: jnp.where(bad, old, n), trace, _record(trace, new.count, new))
        return new, trace

    state, trace = jax.lax.while_loop(cond, body, (state, trace))
    return SolveResult(state, state.status == Status.CONVERGED, state.status, state.count, trace)


@functools.partial(jax.jit, static_argnames=("solver", "max_steps"))
def _solve(problem, x0, tol, *, solver, max_steps):
    return _run(problem, x0, tol, solver, max_steps)


@functools.partial(jax.jit, static_argnames=("solver", "max_steps"))
def _solve_vmapped(problems, x0s, tol, *, solver, max_steps):
    return jax.vmap(lambda p, x: _run(p, x, tol, solver, max_steps))(problems, x0s)


def _check_options(solver, max_steps, tol):
    if not isinstance(solver, Solver):
        raise ValueError(f"solver must be an attnopt Solver (e.g. attnopt.solvers.newton()), got {type(solver).__name__}")
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 0:
        raise ValueError(f"max_steps must be a nonnegative int, got {max_steps!r}")
    if not isinstance(tol, jax.core.Tracer) and not float(tol) >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")


def solve(problem, x0, solver: Solver, *, max_steps: int = 100, tol: float = 1e-8) -> SolveResult:
    """Minimise ``problem.loss`` from ``x0`` with ``solver``.

    Runs ``solver.step`` in one ``jax.lax.while_loop`` until ``||grad||_2 <= tol``
    (CONVERGED), ``max_steps`` steps (MAX_STEPS), a non-finite value, gradient
    or parameter (NONFINITE), or a status the step sets (LINESEARCH_FAILED).
    Compiled once per problem type, shapes, dtypes, solver and ``max_steps``
    (``tol`` is traced). Works under ``jax.vmap`` over stacked problems
    (``attnopt.stack``) and initial points.

    Args:
      problem: a problem pytree with ``loss`` and ``grad`` (and what the solver needs).
      x0: initial params (an array or pytree of arrays).
      solver: a :class:`Solver`, e.g. ``attnopt.solvers.newton()``.
      max_steps: step budget; the trace has ``max_steps + 1`` entries.
      tol: gradient-norm tolerance.
    """
    _check_options(solver, max_steps, tol)
    return _solve(problem, x0, tol, solver=solver, max_steps=int(max_steps))


def solve_batch(problems, x0s, solver: Solver, *, max_steps: int = 100, tol: float = 1e-8, devices=None) -> SolveResult:
    """Solve a stack of problems (leading batch axis on every leaf) sharded over devices.

    The batch axis is split over a one-axis ``Mesh`` of ``devices`` (default:
    all of ``jax.devices()``) with ``NamedSharding``; it is padded (by
    repeating the first instance) to a multiple of the device count, and the
    padding is dropped from the result. Each instance gives what :func:`solve`
    gives for it. The result has a leading batch axis on every leaf.
    """
    _check_options(solver, max_steps, tol)
    leaves = jax.tree.leaves((problems, x0s))
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError("solve_batch needs problems and x0s with a leading batch axis on every leaf")
    batch = {leaf.shape[0] for leaf in leaves}
    if len(batch) != 1:
        raise ValueError(f"problems and x0s must share the batch size, got sizes {sorted(batch)}")
    (size,) = batch
    devices = list(jax.devices() if devices is None else devices)
    padded = -(-size // len(devices)) * len(devices)
    pad = lambda leaf: jnp.concatenate([leaf, jnp.repeat(leaf[:1], padded - size, axis=0)]) if padded > size else leaf
    sharding = NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec("batch"))
    problems, x0s = jax.device_put(jax.tree.map(pad, (problems, x0s)), sharding)
    result = _solve_vmapped(problems, x0s, tol, solver=solver, max_steps=int(max_steps))
    return jax.tree.map(lambda leaf: leaf[:size], result)
