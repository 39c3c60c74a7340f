"""Solvers: one state, one driver, the solver families, and a registry by name.

Every solver is a pytree (:class:`Solver`) with ``init``/``step``/``terminate``
over :class:`SolverState`; :func:`solve` runs any of them in one
``jax.lax.while_loop``, :func:`solve_batch` runs a batch sharded over devices,
and :func:`get` builds any solver (attnopt's or an optax alias) by name.
"""
from attnopt.solvers import capabilities
from attnopt.solvers.alternating import alternating
from attnopt.solvers.approx_newton import approx_newton, sketched_hessian
from attnopt.solvers.first_order import from_optax, normalized_gd
from attnopt.solvers.mirror import mirror_descent, mirror_descent_transform
from attnopt.solvers.loop import MAX_TRACE, SolveError, SolveResult, Trace, solve, solve_batch
from attnopt.solvers.newton import gauss_newton, newton
from attnopt.solvers.newton_cg import newton_cg
from attnopt.solvers.regularized_newton import regularized_newton
from attnopt.solvers.registry import chain, constructor, get, names, optax_names, register
from attnopt.solvers.state import Sealed, Solver, SolverState, Status, Tolerance, solver_class, static
from attnopt.solvers.trust_region import trust_region
from attnopt.solvers.zeroth_order import zeroth_order

for _constructor in (
    newton, newton_cg, gauss_newton, approx_newton, regularized_newton, zeroth_order, alternating, normalized_gd, mirror_descent, chain, trust_region,
):
    register(_constructor.__name__)(_constructor)

__all__ = [
    "MAX_TRACE",
    "Sealed",
    "SolveError",
    "SolveResult",
    "Solver",
    "SolverState",
    "Status",
    "Tolerance",
    "Trace",
    "alternating",
    "approx_newton",
    "capabilities",
    "chain",
    "constructor",
    "from_optax",
    "gauss_newton",
    "get",
    "mirror_descent",
    "mirror_descent_transform",
    "names",
    "newton",
    "newton_cg",
    "normalized_gd",
    "optax_names",
    "register",
    "regularized_newton",
    "sketched_hessian",
    "solve",
    "solve_batch",
    "solver_class",
    "static",
    "trust_region",
    "zeroth_order",
]
