"""Any optax optimiser as an attnopt solver."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import optax as _optax

from attnopt.solvers.state import Sealed, Solver, SolverState, advance, start


def _value_and_grad(problem, params, opt_state):
    """Loss and gradient at params, reused from the optax state when it stores them
    (line-search optimisers such as ``optax.lbfgs`` do) and they are finite."""
    value, grad = _optax.tree.get(opt_state, "value"), _optax.tree.get(opt_state, "grad")
    if value is None or grad is None:
        return problem.loss(params), problem.grad(params)
    return jax.lax.cond(
        jnp.isfinite(value),
        lambda: (value, grad),
        lambda: (problem.loss(params), problem.grad(params)),
    )


def optax(tx: _optax.GradientTransformation, name: str = "optax") -> Solver:
    """Run an optax transformation: ``updates, s = tx.update(g, s, x, value=f, grad=g, value_fn=loss)``.

    Args:
      tx: any ``optax.GradientTransformation``; plain ones (``optax.adam``,
        ``optax.sgd``) and ones needing extra arguments (``optax.lbfgs()``,
        line searches) both work. The optax state is kept, sealed, in ``state.inner``.
      name: the solver's name (for traces and tables).
    """
    if not isinstance(tx, _optax.GradientTransformation):
        raise ValueError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")
    tx = _optax.with_extra_args_support(tx)

    def init(problem, params) -> SolverState:
        return start(problem, params, Sealed(tx.init(params)))

    def step(problem, state: SolverState) -> SolverState:
        updates, opt_state = tx.update(
            state.grad, state.inner.content, state.params,
            value=state.value, grad=state.grad, value_fn=problem.loss,
        )
        params = _optax.apply_updates(state.params, updates)
        value, grad = _value_and_grad(problem, params, opt_state)
        return advance(state, params, value, grad, Sealed(opt_state))

    return Solver(name, init, step)
