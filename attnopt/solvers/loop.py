"""The driver: run any solver inside one ``jax.lax.while_loop``, alone, vmapped, sharded or differentiated."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnopt.solvers import capabilities
from attnopt.solvers.implicit import implicit_gradients
from attnopt.solvers.state import Solver, SolverState, Status, Tolerance, all_finite, check_count, tree_norm, where_needed

#: Default trace length cap: without ``record_every`` a solve records every step up to this many,
#: and every ``ceil(max_steps / MAX_TRACE)``-th step beyond.
MAX_TRACE = 10_000


class Trace(NamedTuple):
    """History of a solve at the recorded steps, each column of length ``ceil(max_steps / record_every) + 1``
    (batched: a leading batch axis).

    step: int32 step index of each entry (0 = the start; every ``record_every``-th step, and the last
      step taken); -1 where empty.
    loss, grad_norm, step_size: the loss, ``||grad||`` and ``||x_k - x_{k-1}||``; NaN where empty.
    line_search: the step length t accepted by the solver's line search (NaN for solvers without one).
    metrics: ``{name: (length, *shape)}`` from the ``metrics`` function of :func:`solve`; NaN where empty.
    """

    step: jax.Array
    loss: jax.Array
    grad_norm: jax.Array
    step_size: jax.Array
    line_search: jax.Array
    metrics: dict


class SolveResult(NamedTuple):
    """Outcome of :func:`solve`.

    state: the final :class:`SolverState` (on NONFINITE: the last finite iterate, or the start).
    converged: bool, ``status == Status.CONVERGED``.
    status: int32 :class:`Status` code (``Status(int(status)).message`` in words).
    steps: int32, number of steps taken (``state.count``).
    trace: a :class:`Trace`.
    """

    state: SolverState
    converged: jax.Array
    status: jax.Array
    steps: jax.Array
    trace: Trace


class SolveError(RuntimeError):
    """Raised by ``solve(..., throw=True)`` when a solve neither converged nor completed its budget."""


def _status(solver: Solver, problem, state: SolverState, previous: SolverState, tolerance: Tolerance, max_steps: int):
    """The state's status after the stopping tests, in priority order: non-finite, a status the
    step set, the solver's convergence test, the step budget (COMPLETED when no test is on)."""
    code = lambda s: jnp.asarray(s, jnp.int32)
    budget = jnp.where(tolerance.active(), code(Status.MAX_STEPS), code(Status.COMPLETED))
    status = jnp.where(state.count >= max_steps, budget, state.status)
    status = jnp.where(solver.terminate(problem, state, previous, tolerance), code(Status.CONVERGED), status)
    status = jnp.where(state.status != Status.RUNNING, state.status, status)
    return jnp.where(all_finite(state.params, state.value, state.grad), status, code(Status.NONFINITE))


def _entry(solver: Solver, problem, state: SolverState, metrics) -> Trace:
    """One trace entry for ``state``."""
    values = {} if metrics is None else dict(metrics(problem, state.params))
    return Trace(
        state.count, state.value, tree_norm(state.grad), state.step_size, solver.line_search_step(state), values
    )


def _record(trace: Trace, slot, entry: Trace) -> Trace:
    """Write ``entry`` at index ``slot`` of each column; a slot past the end writes nothing."""
    return jax.tree.map(lambda column, x: column.at[slot].set(jnp.asarray(x, column.dtype), mode="drop"), trace, entry)


def _empty_trace(entry: Trace, length: int) -> Trace:
    """Columns of ``length`` like ``entry``'s leaves: -1 for integers (booleans become int32), NaN for floats."""

    def column(x):
        x = jnp.asarray(x)
        dtype = jnp.int32 if x.dtype == jnp.bool_ else x.dtype
        fill = -1 if jnp.issubdtype(dtype, jnp.integer) else jnp.nan
        return jnp.full((length,) + x.shape, fill, dtype)

    return jax.tree.map(column, entry)


def _where(mask, new, old):
    """Per-instance select between two states; ``mask`` is () or (batch,), leaves lead with its shape."""

    def pick(n, o):
        return jnp.where(jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(n) - mask.ndim)), n, o)

    return jax.tree.map(pick, new, old)


class _Options(NamedTuple):
    """The static part of a solve."""

    max_steps: int
    record_every: int
    metrics: Callable | None


def _run(problem, x0, solver, tolerance, options: _Options, batch=None) -> SolveResult:
    """One solve (``batch=None``), or a batch in lockstep.

    ``batch`` is ``(size, axes)`` with ``axes`` the ``vmap`` ``in_axes`` of
    ``(problem, x0, solver, tolerance)`` (0 or None per leaf): init, step and the stopping tests are
    vmapped, and one ``while_loop`` runs while any instance is RUNNING; a step changes only the
    instances still running (a select on the state, one trace entry each, scattered). This is
    what ``jax.vmap`` of the single loop computes, but ``vmap`` of a ``while_loop`` with a batched
    predicate selects *every* carry at every iteration, copying the whole trace each time.
    """
    max_steps, every, metrics = options
    length = -(-max_steps // every) + 1
    size, (p_axes, x_axes, s_axes, t_axes) = (None, (None,) * 4) if batch is None else batch
    each = (lambda f, in_axes: f) if batch is None else (lambda f, in_axes: jax.vmap(f, in_axes, axis_size=size))
    init = each(lambda s, p, x: s.init(p, x), (s_axes, p_axes, x_axes))
    step = each(lambda s, p, state: s.step(p, state), (s_axes, p_axes, 0))
    status = each(lambda s, p, state, prev, tol: _status(s, p, state, prev, tol, max_steps), (s_axes, p_axes, 0, 0, t_axes))
    entry = each(lambda s, p, state: _entry(s, p, state, metrics), (s_axes, p_axes, 0))
    record = each(_record, 0)

    state = init(solver, problem, x0)
    state = state._replace(status=status(solver, problem, state, state, tolerance))
    first = entry(solver, problem, state)
    empty = _empty_trace(jax.tree.map(lambda x: x[0], first) if batch is not None else first, length)
    trace = record(jax.tree.map(lambda c: jnp.broadcast_to(c, state.count.shape + c.shape), empty), jnp.zeros_like(state.count), first)

    def cond(carry):
        state, _ = carry
        return jnp.any(state.status == Status.RUNNING)

    def body(carry):
        state, trace = carry
        running = state.status == Status.RUNNING
        new = step(solver, problem, state)
        new = new._replace(status=status(solver, problem, new, state, tolerance))
        # A step that produced non-finite values: keep the last finite iterate, report NONFINITE.
        bad = new.status == Status.NONFINITE
        write = running & ~bad & (new.count % every == 0)
        slot = jnp.where(write, new.count // every, length)
        if every == 1:
            trace = record(trace, slot, entry(solver, problem, new))
        else:  # compute the entry (and its metrics) only at recorded steps
            skip = jax.tree.map(lambda c: c[0] if batch is None else c[:, 0], trace)
            trace = record(trace, slot, where_needed(jnp.any(write), entry, (solver, problem, new), skip))
        new = _where(bad, state._replace(status=new.status), new)
        return _where(running, new, state), trace

    state, trace = jax.lax.while_loop(cond, body, (state, trace))
    if every > 1:  # the last step taken, unless it fell on a recorded step already
        trace = record(trace, -(-state.count // every), entry(solver, problem, state))
    return SolveResult(state, state.status == Status.CONVERGED, state.status, state.count, trace)


@functools.cache
def _solver_function(options: _Options):
    """``(problem, x0, solver, tolerance) -> SolveResult`` whose ``vmap`` is the lockstep batch of
    :func:`_run` and whose derivatives with respect to the problem come from the implicit function theorem."""
    run = jax.custom_batching.custom_vmap(lambda problem, x0, solver, tol: _run(problem, x0, solver, tol, options))

    @run.def_vmap
    def run_batch(axis_size, in_batched, problem, x0, solver, tol):
        axes = jax.tree.map(lambda batched: 0 if batched else None, tuple(in_batched))
        result = _run(problem, x0, solver, tol, options, (axis_size, axes))
        return result, jax.tree.map(lambda _: True, result)

    return implicit_gradients(run)


@functools.partial(jax.jit, static_argnames=("options",))
def _solve(problem, x0, solver, tolerance, *, options):
    return _solver_function(options)(problem, x0, solver, tolerance)


def _prepare(problem, x0, solver, max_steps, tol, rtol, atol, record_every, metrics):
    """Check the arguments (before any work) and put them in the form the loop takes."""
    if not isinstance(solver, Solver):
        raise ValueError(
            f"solver must be an attnopt Solver (e.g. attnopt.solvers.newton() or attnopt.solvers.get('adam', "
            f"learning_rate=0.1)), got {type(solver).__name__}"
        )
    capabilities.check(problem, solver)
    max_steps = check_count("max_steps", max_steps, 0)
    if record_every is None:
        record_every = max(1, math.ceil(max_steps / MAX_TRACE))
    record_every = check_count("record_every", record_every, 1)
    if metrics is not None and not callable(metrics):
        raise ValueError(f"metrics must be a function (problem, params) -> dict of arrays, got {metrics!r}")
    if isinstance(x0, list) and all(isinstance(leaf, (int, float)) for leaf in jax.tree.leaves(x0)):
        x0 = np.asarray(x0)  # a (nested) list of numbers is an array, not a pytree of scalars
    leaves = jax.tree.leaves(x0)
    if not leaves:
        raise ValueError("x0 must be an array or a pytree of arrays, got an empty pytree")
    dtype = getattr(problem, "dtype", None)
    dtype = jnp.result_type(*leaves) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"the problem's dtype must be floating, got {dtype}")
    try:
        x0 = jax.tree.map(lambda x: jnp.asarray(x, dtype), x0)
    except (TypeError, ValueError) as err:
        raise ValueError(f"x0 cannot be cast to the problem's dtype {dtype}: {err}") from None
    for name, value in (("tol", tol), ("rtol", rtol), ("atol", atol)):
        if not isinstance(value, jax.core.Tracer) and not bool(np.all(np.asarray(value) >= 0)):
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    tolerance = jax.tree.map(lambda t: jnp.asarray(t, dtype), Tolerance(tol, rtol, atol))
    solver = jax.tree.map(lambda h: jnp.asarray(h, dtype if jnp.issubdtype(jnp.result_type(h), jnp.floating) else None), solver)
    return x0, solver, tolerance, _Options(max_steps, record_every, metrics)


def solve(
    problem,
    x0,
    solver: Solver,
    *,
    max_steps: int = 100,
    tol: float = 1e-8,
    rtol: float = 0.0,
    atol: float = 0.0,
    metrics: Callable | None = None,
    record_every: int | None = None,
    throw: bool = False,
) -> SolveResult:
    """Minimise ``problem.loss`` from ``x0`` with ``solver``, in one compiled ``jax.lax.while_loop``.

    Stops when the solver's test says converged (default: ``||grad|| <= tol``, or the Cauchy test
    on rtol/atol; docs/math.md, Stopping rules) with CONVERGED, after ``max_steps`` steps (MAX_STEPS,
    or COMPLETED when tol = rtol = atol = 0: the whole budget was asked for), on a non-finite value,
    gradient or parameter (NONFINITE), or on a status the step sets (LINESEARCH_FAILED).

    Compiled once per problem type and shapes, solver type and static options, ``max_steps``,
    ``record_every`` and ``metrics``: numeric solver options and tolerances are traced, so
    ``jax.vmap`` over stacked problems (``attnopt.stack``), starts, learning rates or seeds is one
    compiled program. ``jax.grad`` of a function of ``result.state.params`` or ``result.state.value``
    with respect to the problem's data uses the implicit function theorem at the returned point
    (NaN unless the status is CONVERGED; docs/math.md, Differentiating through a solve).

    Args:
      problem: a problem pytree (``loss``, ``grad``, and what ``solver.needs``).
      x0: initial params (an array or pytree of arrays), cast to the problem's dtype.
      solver: a :class:`Solver`, e.g. ``attnopt.solvers.newton()`` or ``attnopt.solvers.get("adam", learning_rate=0.1)``.
      max_steps: step budget.
      tol, rtol, atol: stopping tolerances (see :class:`Tolerance`); 0 turns a test off.
      metrics: optional ``fn(problem, params) -> {name: scalar or small array}`` recorded at every
        recorded step into ``result.trace.metrics[name]``. Define it once and reuse it: each new
        function object compiles anew.
      record_every: record every k-th step (the trace then has ``ceil(max_steps / k) + 1`` entries);
        default 1 up to ``max_steps = MAX_TRACE``, then coarser so the trace stays about that long.
      throw: raise :class:`SolveError` with the status message unless the solve converged or
        completed its budget (only outside ``jit``/``vmap``, where the result is concrete).
    """
    x0, solver, tolerance, options = _prepare(problem, x0, solver, max_steps, tol, rtol, atol, record_every, metrics)
    result = _solve(problem, x0, solver, tolerance, options=options)
    if throw:
        _raise_on_failure(result)
    return result


def _raise_on_failure(result: SolveResult) -> None:
    if isinstance(result.status, jax.core.Tracer):
        raise ValueError("solve(..., throw=True) needs a concrete result: call it outside jit and vmap")
    codes = np.unique(np.asarray(result.status))
    failed = [Status(int(c)) for c in codes if c not in (Status.CONVERGED, Status.COMPLETED)]
    if failed:
        raise SolveError("; ".join(f"{s.name}: {s.message}" for s in failed))


@functools.partial(jax.jit, static_argnames=("options", "mesh", "chunk_size"))
def _solve_sharded(problems, x0s, solver, tolerance, *, options, mesh, chunk_size):
    run = _solver_function(options)
    each = lambda args: run(*args, solver, tolerance)

    def local(problems, x0s):  # one device's share of the batch
        if chunk_size is None:
            return jax.vmap(run, in_axes=(0, 0, None, None))(problems, x0s, solver, tolerance)
        if chunk_size == 1:  # one instance after another, each its own (unbatched) loop
            return jax.lax.map(each, (problems, x0s))
        return jax.lax.map(each, (problems, x0s), batch_size=chunk_size)

    batch = PartitionSpec("batch")
    # check_vma=False: the solvers' loops start carries from replicated constants; every value is per-device.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(batch, batch), out_specs=batch, check_vma=False)
    return sharded(problems, x0s)


#: CPU plan of :func:`auto_chunk_size`: lockstep groups of about this many elements of work per step
#: (instance data elements x parameters), at most ``MAX_CPU_CHUNK`` instances.
CPU_CHUNK_WORK = 1 << 22
MAX_CPU_CHUNK = 16


def auto_chunk_size(problems, x0s, platform: str) -> int | None:
    """The execution plan :func:`solve_batch` picks by default (``chunk_size="auto"``).

    Accelerators: None, the whole (per-device) batch in lockstep. CPU: groups of
    ``2^floor(log2(CPU_CHUNK_WORK / w))`` instances, clipped to [1, MAX_CPU_CHUNK],
    with ``w`` = (elements of one instance's data) x (its parameter count), a proxy
    for the work of a Newton-type step (``n d^2`` for a vector problem with A (n, d)).
    On a CPU a lockstep batch runs every step for all its instances at once with
    worse cache use and waits for its slowest instance, so large instances go one
    at a time (1: ``lax.map`` of the single solve inside one program) and small
    ones in small groups, whose shared loop overhead is what the batching saves.
    """
    if platform != "cpu":
        return None
    data = sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(problems))
    params = sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(x0s))
    work = max(data * params, 1)
    return int(min(MAX_CPU_CHUNK, 2 ** max(0, math.floor(math.log2(CPU_CHUNK_WORK / work)))))


def solve_batch(
    problems, x0s, solver: Solver, *, max_steps: int = 100, tol: float = 1e-8, rtol: float = 0.0, atol: float = 0.0,
    metrics: Callable | None = None, record_every: int | None = None, devices=None, chunk_size="auto",
) -> SolveResult:
    """Solve a stack of problems (leading batch axis on every leaf) sharded over devices.

    The batch axis is split over a one-axis ``Mesh`` of ``devices`` (default:
    all of ``jax.devices()``) with ``NamedSharding``; it is padded (by
    repeating the first instance) to a multiple of the device count, and the
    padding is dropped from the result. Each device solves its share by the
    plan ``chunk_size`` names:

    - ``None``: the vmapped :func:`solve`, all instances in lockstep until the last one stops;
    - an int k: consecutive lockstep groups of k (``jax.lax.map(..., batch_size=k)``), or for
      k = 1 one instance after another, each its own loop, inside one compiled program;
    - ``"auto"`` (default): :func:`auto_chunk_size` from the devices' platform and the sizes:
      lockstep on accelerators; on CPU one at a time for large instances and small groups
      for small ones, where a lockstep batch is several times slower than a loop of single solves.

    Every plan gives each instance what :func:`solve` gives for it (the other
    arguments as there). The result has a leading batch axis on every leaf.
    """
    leaves = jax.tree.leaves((problems, x0s))
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError("solve_batch needs problems and x0s with a leading batch axis on every leaf")
    batch = {leaf.shape[0] for leaf in leaves}
    if len(batch) != 1:
        raise ValueError(f"problems and x0s must share the batch size, got sizes {sorted(batch)}")
    if chunk_size is not None and chunk_size != "auto":
        chunk_size = check_count("chunk_size", chunk_size)
    x0s, solver, tolerance, options = _prepare(problems, x0s, solver, max_steps, tol, rtol, atol, record_every, metrics)
    (size,) = batch
    devices = list(jax.devices() if devices is None else devices)
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(problems, x0s, devices[0].platform)
    padded = -(-size // len(devices)) * len(devices)
    pad = lambda leaf: jnp.concatenate([leaf, jnp.repeat(leaf[:1], padded - size, axis=0)]) if padded > size else leaf
    mesh = Mesh(np.array(devices), ("batch",))
    problems, x0s = jax.device_put(jax.tree.map(pad, (problems, x0s)), NamedSharding(mesh, PartitionSpec("batch")))
    result = _solve_sharded(problems, x0s, solver, tolerance, options=options, mesh=mesh, chunk_size=chunk_size)
    return jax.tree.map(lambda leaf: leaf[:size], result)
