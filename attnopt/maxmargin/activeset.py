"""Active-set refinement of an interior-point answer, shared by the native solvers."""
from __future__ import annotations

import jax
import jax.numpy as jnp

ROUNDS = 4


def refine(polish, residual, slack, active, start, target):
    """Polish on a guessed active set, correcting the guess until the KKT residual reaches ``target``.

    polish(active) -> (solution, lam) solves the problem with the constraints in ``active`` (K,)
    as equalities; residual(solution, lam) -> () (inf when not finite); slack(solution) -> (K,);
    ``start`` = (solution, lam, residual), the interior-point answer. Each round drops the
    constraints whose multiplier came out negative and adds those that the solution violates
    (a constraint whose interior-point slack and multiplier were of one size can go either
    way). At most ``ROUNDS`` rounds; returns the best (solution, lam, residual), ``start``
    included. Every round depends on ``start``, so no factorization of the rounds runs
    concurrently with the caller's (see :mod:`attnopt.maxmargin._lax`).
    """

    def round_(state):
        active, it, best = state
        sol, lam = polish(active)
        res = residual(sol, lam)
        better = res < best[2]
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), (sol, lam, res), best)
        active = jnp.where(active, lam >= 0, slack(sol) < 0)
        return active, it + 1, best

    _, _, best = jax.lax.while_loop(
        lambda s: (s[1] < ROUNDS) & (s[2][2] > target), round_, (active, jnp.zeros((), jnp.int32), start)
    )
    return best
