"""The state, status codes and solver type shared by every attnopt solver.

A solver is an ``(init, step)`` pair of pure functions over one pytree,
:class:`SolverState`, in the spirit of ``optax.GradientTransformation``::

    init(problem, params) -> SolverState        value and grad at params, count 0
    step(problem, state)  -> SolverState        one iteration, count + 1

Both work under ``jit`` and ``vmap``; ``step`` keeps the structure, shapes and
dtypes of the state, so one ``jax.lax.while_loop`` (``attnopt.solvers.solve``)
runs any solver.
"""
from __future__ import annotations

import enum
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Status(enum.IntEnum):
    """Why a solve stopped (``RUNNING`` while it goes on)."""

    RUNNING = 0
    CONVERGED = 1  # gradient norm <= tol
    MAX_STEPS = 2  # the step budget ran out
    NONFINITE = 3  # a non-finite value, gradient or parameter (bad start, bad data, or a step that left the domain)
    LINESEARCH_FAILED = 4  # no acceptable step along the search direction


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


class Solver(NamedTuple):
    """A named ``(init, step)`` pair; hashable, so it can be a static argument of ``jax.jit``.

    Constructors are cached (:func:`cached_solver`): calling one twice with the
    same options returns the same solver, so a solve is compiled once per solver
    configuration. ``attnopt.solvers.optax(tx)`` is the exception: build it once
    and reuse it, since every ``optax.adam(...)`` call makes a new transformation.
    """

    name: str
    init: Callable[[Any, Any], SolverState]
    step: Callable[[Any, SolverState], SolverState]


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


def cached_solver(constructor):
    """Cache a solver constructor on its arguments with defaults applied.

    ``newton()`` and ``newton(c1=1e-4)`` then return the same :class:`Solver`,
    so ``solve`` compiles once per solver configuration. Arguments must be hashable.
    """
    signature = inspect.signature(constructor)
    build = functools.cache(constructor)

    @functools.wraps(constructor)
    def cached(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return build(*bound.args, **bound.kwargs)

    return cached


def require(problem, method: str, solver: str) -> None:
    """Raise ValueError if ``problem`` lacks the optional ``method`` that ``solver`` needs."""
    if not hasattr(problem, method):
        raise ValueError(f"solver {solver!r} needs problem.{method}, which {type(problem).__name__} does not have")


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
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accepted, n, o), new, old)
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
