"""Solvers: one state, one driver, and the solver families.

Every solver is an ``(init, step)`` pair over :class:`SolverState`;
:func:`solve` runs any of them in one ``jax.lax.while_loop`` and
:func:`solve_batch` runs a batch of instances sharded over devices.
"""
from attnopt.solvers.alternating import alternating
from attnopt.solvers.approx_newton import approx_newton, sketched_hessian
from attnopt.solvers.first_order import optax
from attnopt.solvers.loop import SolveResult, Trace, solve, solve_batch
from attnopt.solvers.newton import gauss_newton, newton
from attnopt.solvers.newton_cg import newton_cg
from attnopt.solvers.regularized_newton import regularized_newton
from attnopt.solvers.state import Sealed, Solver, SolverState, Status
from attnopt.solvers.zeroth_order import zeroth_order

__all__ = [
    "Sealed",
    "SolveResult",
    "Solver",
    "SolverState",
    "Status",
    "Trace",
    "alternating",
    "approx_newton",
    "gauss_newton",
    "newton",
    "newton_cg",
    "optax",
    "regularized_newton",
    "sketched_hessian",
    "solve",
    "solve_batch",
    "zeroth_order",
]
