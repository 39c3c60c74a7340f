"""The state, status codes, tolerances and base class shared by every attnopt solver.

A solver is a frozen dataclass (a pytree) whose fields are its options, with
pure methods over one state pytree, :class:`SolverState`, in the spirit of
``optax.GradientTransformation`` and optimistix's solvers::

    init(problem, params)                         -> SolverState   value and grad at params, count 0
    step(problem, state)                          -> SolverState   one iteration, count + 1
    terminate(problem, state, previous, tolerance) -> bool          converged? (default: docs/math.md, Stopping rules)

Numeric options (learning rates, line-search constants, PRNG seeds) are
pytree leaves: the same solver built twice compiles once, and ``jax.vmap``
over a stack of options runs as one compiled program. Options that change
shapes or control flow are static (``dataclasses.field(metadata={"static": True})``).
``step`` keeps the structure, shapes and dtypes of the state, so one
``jax.lax.while_loop`` (:func:`attnopt.solvers.solve`) runs any solver.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Status(enum.IntEnum):
    """Why a solve stopped (``RUNNING`` while it goes on); ``Status(code).message`` says it in words."""

    RUNNING = 0
    CONVERGED = 1
    MAX_STEPS = 2
    NONFINITE = 3
    LINESEARCH_FAILED = 4
    COMPLETED = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.RUNNING: "still running",
    Status.CONVERGED: "converged: a stopping tolerance was met",
    Status.MAX_STEPS: "the step budget ran out before any stopping tolerance was met",
    Status.NONFINITE: (
        "a non-finite value, gradient, parameter or curvature (bad start, bad data, or a step that left the "
        "problem's domain); the last finite iterate is kept"
    ),
    Status.LINESEARCH_FAILED: "no acceptable step along the search direction; the iterate is kept",
    Status.COMPLETED: "ran the whole step budget (every stopping tolerance is 0)",
}


class Tolerance(NamedTuple):
    """Stopping tolerances; 0 turns a test off (all 0: run the whole budget).

    grad: stop when ``||g|| <= grad``.
    rtol, atol: stop when ``|f_k - f_{k-1}| <= atol + rtol |f_k|`` and
      ``||x_k - x_{k-1}|| <= atol + rtol ||x_k||`` (the Cauchy-type test of optimistix).
    """

    grad: Any = 1e-8
    rtol: Any = 0.0
    atol: Any = 0.0

    def active(self) -> jax.Array:
        """Whether any test is on (bool scalar)."""
        return (self.grad > 0) | (self.rtol > 0) | (self.atol > 0)


class SolverState(NamedTuple):
    """The one state pytree of every solver.

    Attributes:
      params: the current iterate (an array or a pytree of arrays).
      value: ``problem.loss(params)``, a scalar.
      grad: ``problem.grad(params)`` (an estimate for zeroth-order solvers), like params.
      count: int32 scalar, number of steps taken.
      status: int32 scalar, a :class:`Status` code; a step sets it to stop the loop.
      step_size: scalar, ``||x_k - x_{k-1}||_2`` of the last step (0 at the start).
      inner: solver-specific pytree (an optax state, a Levenberg damping, a PRNG key, ...).

    The names ``count``, ``value`` and ``grad`` are the ones optax utilities
    look up, so ``optax.tree.get(state, "count")`` returns the step count. An
    optax state in ``inner`` is wrapped in :class:`Sealed` so that its own
    ``count``/``value``/``grad`` fields do not make that lookup ambiguous.
    """

    params: Any
    value: jax.Array
    grad: Any
    count: jax.Array
    status: jax.Array
    step_size: jax.Array
    inner: Any


def solver_class(cls):
    """Make ``cls`` a frozen dataclass registered as a pytree: fields are leaves unless
    declared ``dataclasses.field(metadata={"static": True})``."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def static(default=dataclasses.MISSING):
    """A static (non-traced) solver option: it changes shapes or control flow, so each value compiles anew."""
    return dataclasses.field(default=default, metadata={"static": True})


class Solver:
    """Base class of every solver (see the module docstring).

    Subclasses are :func:`solver_class` dataclasses implementing ``init`` and
    ``step``; they may override ``terminate`` and ``line_search_step``, and
    declare in ``needs`` the protocols of :mod:`attnopt.solvers.capabilities`
    a problem must satisfy.
    """

    name: ClassVar[str] = "solver"
    needs: ClassVar[tuple[type, ...]] = ()

    def init(self, problem, params) -> SolverState:
        raise NotImplementedError

    def step(self, problem, state: SolverState) -> SolverState:
        raise NotImplementedError

    def terminate(self, problem, state: SolverState, previous: SolverState, tolerance: Tolerance) -> jax.Array:
        """Gradient-norm or Cauchy-type convergence (bool scalar); ``previous`` is ``state`` at the start."""
        del problem
        return gradient_small(state, tolerance) | cauchy(state, previous, tolerance)

    def line_search_step(self, state: SolverState) -> jax.Array:
        """The step length t the last step's line search accepted (NaN for solvers without one)."""
        return jnp.full((), jnp.nan, state.value.dtype)


def gradient_small(state: SolverState, tolerance: Tolerance) -> jax.Array:
    """``||g|| <= tol.grad`` with ``tol.grad > 0``."""
    return (tolerance.grad > 0) & (tree_norm(state.grad) <= tolerance.grad)


def cauchy(state: SolverState, previous: SolverState, tolerance: Tolerance) -> jax.Array:
    """Both ``|f_k - f_{k-1}|`` and ``||x_k - x_{k-1}||`` within ``atol + rtol * |current|`` after a step."""
    on = ((tolerance.rtol > 0) | (tolerance.atol > 0)) & (state.count > previous.count)
    value_ok = jnp.abs(state.value - previous.value) <= tolerance.atol + tolerance.rtol * jnp.abs(state.value)
    params_ok = state.step_size <= tolerance.atol + tolerance.rtol * tree_norm(state.params)
    return on & value_ok & params_ok


def is_concrete(*values) -> bool:
    """True if no value is a tracer (option checks are skipped for traced options, e.g. inside a sweep)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def check_option(name: str, value, ok: Callable[[Any], bool], expected: str) -> None:
    """Raise ValueError ``name must be <expected>`` unless ``ok(value)`` (skipped for traced values)."""
    if is_concrete(value) and not bool(np.all(ok(np.asarray(value)))):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_count(name: str, value, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    """A static integer option in ``[minimum, maximum]`` (int32 range by default), as a Python int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not minimum <= int(value) <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value!r}")
    return int(value)


@jax.tree_util.register_pytree_node_class
class Sealed:
    """A pytree whose children are the bare leaves of ``content`` (its structure is static).

    Tree searches by field name (``optax.tree.get``) do not look inside it.
    """

    def __init__(self, content):
        self.content = content

    def tree_flatten(self):
        leaves, treedef = jax.tree.flatten(self.content)
        return leaves, treedef

    @classmethod
    def tree_unflatten(cls, treedef, leaves):
        return cls(jax.tree.unflatten(treedef, leaves))

    def __repr__(self):
        return f"Sealed({self.content!r})"


def tree_norm(tree) -> jax.Array:
    """Euclidean norm of all leaves together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def all_finite(*trees) -> jax.Array:
    """True iff every entry of every leaf is finite (bool scalar)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(trees)]))


def where_needed(pred: jax.Array, fn: Callable[..., Any], args: tuple, default: Any) -> Any:
    """``fn(*args)`` if ``pred`` else ``default`` (same structure), evaluating ``fn`` at most once.

    Under ``jax.vmap`` a ``lax.cond`` on a batched predicate becomes a select
    that evaluates ``fn`` for every instance, always. This is a ``while_loop``
    of at most one trip instead: batched, its body runs (for the whole batch,
    each instance keeping its own result) only if some instance has ``pred``,
    so it costs nothing once no instance needs ``fn``. The optimization
    barrier ties ``args`` to the loop's carry, so that XLA's loop-invariant
    code motion cannot hoist ``fn`` out of the loop and run it unconditionally.
    """

    def body(carry):
        todo, _ = carry
        _, args_ = jax.lax.optimization_barrier((todo, args))
        return jnp.zeros_like(todo), fn(*args_)

    _, out = jax.lax.while_loop(lambda carry: carry[0], body, (jnp.asarray(pred), default))
    return out


def start(problem, params, inner, grad=None) -> SolverState:
    """The state at ``params`` before any step: value, gradient (``problem.grad`` unless given), count 0."""
    value = problem.loss(params)
    return SolverState(
        params=params,
        value=value,
        grad=problem.grad(params) if grad is None else grad,
        count=jnp.zeros((), jnp.int32),
        status=jnp.asarray(Status.RUNNING, jnp.int32),
        step_size=jnp.zeros((), value.dtype),
        inner=inner,
    )


def advance(state: SolverState, params, value, grad, inner, accepted=True, finite=True) -> SolverState:
    """The state after one step to ``params``.

    If ``accepted`` is False the iterate is kept and the status becomes
    ``LINESEARCH_FAILED``; if ``finite`` is False (the step's curvature model or
    direction was not finite) the iterate is kept and the status becomes
    ``NONFINITE``. Both may be traced bools."""
    accepted = jnp.asarray(accepted) & jnp.asarray(finite)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accepted, n, o).astype(o.dtype), new, old)
    params, value, grad = keep((params, value, grad), (state.params, state.value, state.grad))
    step = jax.tree.map(jnp.subtract, params, state.params)
    failed = jnp.asarray(Status.LINESEARCH_FAILED, jnp.int32)
    return SolverState(
        params=params,
        value=value,
        grad=grad,
        count=state.count + 1,
        status=jnp.where(finite, jnp.where(accepted, state.status, failed), jnp.int32(Status.NONFINITE)),
        step_size=tree_norm(step).astype(state.step_size.dtype),
        inner=inner,
    )
