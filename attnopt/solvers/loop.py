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


def _entry(state: SolverState) -> Trace:
    return Trace(state.value, tree_norm(state.grad), state.step_size)


def _record(trace: Trace, k, entry: Trace) -> Trace:
    """Write one entry at index k of each column; an index past the end writes nothing."""
    return jax.tree.map(lambda column, x: column.at[k].set(x.astype(column.dtype), mode="drop"), trace, entry)


def _where(mask, new, old):
    """Per-instance select between two states; ``mask`` is () or (batch,), leaves lead with its shape."""

    def pick(n, o):
        return jnp.where(jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(n) - mask.ndim)), n, o)

    return jax.tree.map(pick, new, old)


def _run(problem, x0, tol, solver: Solver, max_steps: int, batch=None) -> SolveResult:
    """One solve (``batch=None``), or a batch in lockstep.

    ``batch`` is ``(size, axes)`` with ``axes`` the ``vmap`` ``in_axes`` of
    ``(problem, x0, tol)`` (0 or None per leaf): init, step and the stopping tests are vmapped, and one ``while_loop`` runs
    while any instance is RUNNING; a step changes only the instances still
    running (a select on the state, one trace entry each, scattered). This is
    what ``jax.vmap`` of the single loop computes, but ``vmap`` of a
    ``while_loop`` with a batched predicate selects *every* carry at every
    iteration, copying the whole (batch, max_steps + 1) trace each time.
    """
    size, (p_axes, x_axes, tol_axes) = (None, (None, None, None)) if batch is None else batch
    each = (lambda f, in_axes: f) if batch is None else (lambda f, in_axes: jax.vmap(f, in_axes, axis_size=size))
    step = each(solver.step, (p_axes, 0))
    status = each(lambda state, tol: _status(state, tol, max_steps), (0, tol_axes))
    entry, record = each(_entry, 0), each(_record, 0)

    state = each(solver.init, (p_axes, x_axes))(problem, x0)
    tol = jnp.asarray(tol, state.value.dtype)
    state = state._replace(status=status(state, tol))
    empty = jnp.full(state.value.shape + (max_steps + 1,), jnp.nan, state.value.dtype)
    trace = record(Trace(empty, empty, empty), jnp.zeros_like(state.count), entry(state))

    def cond(carry):
        state, _ = carry
        return jnp.any(state.status == Status.RUNNING)

    def body(carry):
        state, trace = carry
        running = state.status == Status.RUNNING
        new = step(problem, state)
        new = new._replace(status=status(new, tol))
        # A step that produced non-finite values: keep the last finite iterate, report NONFINITE,
        # leave its trace entry empty.
        bad = new.status == Status.NONFINITE
        trace = record(trace, jnp.where(running & ~bad, new.count, max_steps + 1), entry(new))
        new = _where(bad, state._replace(status=new.status), new)
        return _where(running, new, state), trace

    state, trace = jax.lax.while_loop(cond, body, (state, trace))
    return SolveResult(state, state.status == Status.CONVERGED, state.status, state.count, trace)


@functools.cache
def _batchable_run(solver: Solver, max_steps: int):
    """``_run`` as a function of (problem, x0, tol) whose ``vmap`` is the lockstep batch of ``_run``."""
    run = jax.custom_batching.custom_vmap(lambda problem, x0, tol: _run(problem, x0, tol, solver, max_steps))

    @run.def_vmap
    def run_batch(axis_size, in_batched, problem, x0, tol):
        axes = jax.tree.map(lambda batched: 0 if batched else None, tuple(in_batched))
        result = _run(problem, x0, tol, solver, max_steps, (axis_size, axes))
        return result, jax.tree.map(lambda _: True, result)

    return run


@functools.partial(jax.jit, static_argnames=("solver", "max_steps"))
def _solve(problem, x0, tol, *, solver, max_steps):
    return _batchable_run(solver, max_steps)(problem, x0, tol)


@functools.partial(jax.jit, static_argnames=("solver", "max_steps", "mesh", "chunk_size"))
def _solve_sharded(problems, x0s, tol, *, solver, max_steps, mesh, chunk_size):
    run = _batchable_run(solver, max_steps)

    def local(problems, x0s, tol):  # one device's share of the batch
        if chunk_size is None:
            return jax.vmap(run, in_axes=(0, 0, None))(problems, x0s, tol)
        return jax.lax.map(lambda args: run(*args, tol), (problems, x0s), batch_size=chunk_size)

    batch = PartitionSpec("batch")
    # check_vma=False: the solvers' loops start carries from replicated constants; every value is per-device.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, PartitionSpec()), out_specs=batch, check_vma=False)
    return sharded(problems, x0s, tol)


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


def solve_batch(
    problems, x0s, solver: Solver, *, max_steps: int = 100, tol: float = 1e-8, devices=None, chunk_size=None
) -> SolveResult:
    """Solve a stack of problems (leading batch axis on every leaf) sharded over devices.

    The batch axis is split over a one-axis ``Mesh`` of ``devices`` (default:
    all of ``jax.devices()``) with ``NamedSharding``; it is padded (by
    repeating the first instance) to a multiple of the device count, and the
    padding is dropped from the result. Each device solves its share with the
    vmapped :func:`solve`, whose instances step in lockstep until the last one
    stops, or, with ``chunk_size``, in consecutive groups of that many
    (``jax.lax.map(..., batch_size=chunk_size)``). Small groups waste fewer
    steps and keep their data in cache: on CPU, groups of 1 to 16 are
    typically faster than the whole batch; on accelerators, keep the default.
    Each instance gives what :func:`solve` gives for it. The result has a
    leading batch axis on every leaf.
    """
    _check_options(solver, max_steps, tol)
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
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
    mesh = Mesh(np.array(devices), ("batch",))
    problems, x0s = jax.device_put(jax.tree.map(pad, (problems, x0s)), NamedSharding(mesh, PartitionSpec("batch")))
    result = _solve_sharded(
        problems, x0s, tol, solver=solver, max_steps=int(max_steps), mesh=mesh,
        chunk_size=None if chunk_size is None else int(chunk_size),
    )
    return jax.tree.map(lambda leaf: leaf[:size], result)
