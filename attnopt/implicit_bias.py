"""The implicit bias of gradient descent on ``w = u∘u - v∘v`` (Woodworth et al. 2020): from
``u = v = α 1`` on underdetermined least squares it ends at ``argmin Q_α(w) s.t. X w = y``, which moves
from the minimum-l1 solution (α -> 0) to the minimum-l2 one (α -> ∞).

``attnopt run configs/implicit_bias.toml`` runs the study (see :mod:`attnopt.studies`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnopt import _validate
from attnopt.problems.registry import make
from attnopt.problems.reparametrized import ReparametrizedParams
from attnopt.solvers import get, solve
from attnopt.studies import experiment

#: Nonzeros of the planted w* (fewer when d is smaller).
NONZEROS = 3
#: Points per decade of α for the theory curves.
CURVE_DENSITY = 12
#: The coordinate panel shows the coordinates that reach this fraction of the largest one.
SHOWN = 0.05


def _check(alphas, instances, n, d, learning_rate, max_steps, dtype):
    """ValueError naming the first bad setting."""
    if not isinstance(alphas, (list, tuple)) or not alphas:
        raise ValueError(f"alphas must be a non-empty list of numbers > 0, got {alphas!r}")
    for i, a in enumerate(alphas):
        if not (_validate.is_number(a) and a > 0):
            raise ValueError(f"alphas[{i}] must be a finite number > 0, got {a!r}")
    for key, value in (("instances", instances), ("max_steps", max_steps)):
        if not _validate.is_count(value):
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    _validate.generator_options(n=n, d=d, dtype=dtype)
    if n >= d:
        raise ValueError(f"n must be < d (an underdetermined system), got n={n}, d={d}")
    if not (_validate.is_number(learning_rate) and 0 < learning_rate <= 1):
        raise ValueError(f"learning_rate must be a number in (0, 1], got {learning_rate!r}")


def _relative(a, b):
    """``||a - b|| / ||b||`` over the last axis."""
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def _tile(problems, times):
    """The stacked problems repeated ``times`` times along the batch axis (run ``k * I + i`` is instance i)."""
    return jax.tree.map(lambda x: jnp.tile(x, (times,) + (1,) * (x.ndim - 1)), problems)


@jax.jit
def _limits(problems, alphas):
    """argmin Q_α for every (α, instance): a stacked BiasLimit over ``len(alphas) * I`` runs."""
    runs = _tile(problems, alphas.shape[0])
    return jax.vmap(lambda p, a: p.implicit_bias_limit(a))(runs, jnp.repeat(alphas, problems.y.shape[0]))


@functools.partial(jax.jit, static_argnames="max_steps")
def _gd_runs(problems, alphas, limits, learning_rate, *, max_steps):
    """GD on (u, v) from (α 1, α 1) for every (α, instance), one vmapped solve; limits (runs, d).

    Each run's step is ``learning_rate / (4 ||X||_2^2 S)`` with ``S = max_i sqrt(w_i^2 + 4α^4)`` at
    its limit w, where ``u_i^2 + v_i^2 = sqrt(w_i^2 + 4α^4)`` under the flow: ``4 ||X||^2 S`` bounds
    the Hessian there, so learning_rate is a fraction of the stable step. Since ``u_i^2 + v_i^2 >= 2 u_i v_i
    ≈ 2α^2``, ``||grad|| = 2 ||(u, v)∘g|| >= 2 sqrt(2) α ||g||`` bounds the w-gradient g = X^T r, and
    the run stops at ``||grad|| <= ||X|| ||y|| max(2 sqrt(2) α eps^(3/4), 512 eps S^(3/2))``: g at
    relative level eps^(3/4), or a few times the rounding floor of the gradient (w = u∘u - v∘v
    carries errors of about eps S, which dominate for large or small α). Returns the SolveResult
    and the step sizes (runs,).
    """
    runs = _tile(problems, alphas.shape[0])
    alpha = jnp.repeat(alphas, problems.y.shape[0])
    eps = jnp.finfo(alphas.dtype).eps
    S = jnp.max(jnp.sqrt(limits * limits + 4 * alpha[:, None] ** 4), axis=-1)
    norm_X = jax.vmap(lambda X: jnp.linalg.norm(X, 2))(runs.X)
    rates = learning_rate / (4 * norm_X**2 * S)
    floor = jnp.maximum(2 * jnp.sqrt(2.0) * alpha * eps**0.75, 512 * eps * S**1.5)
    tols = norm_X * jnp.linalg.norm(runs.y, axis=-1) * floor
    starts = jnp.broadcast_to(alpha[:, None], limits.shape)

    def run(problem, start, rate, tol):
        solver = get("sgd", learning_rate=rate)
        return solve(problem, ReparametrizedParams(start, start), solver, max_steps=max_steps, tol=tol)

    return jax.vmap(run)(runs, starts, rates, tols), rates


def _band(ax, x, values, label, **style):
    """Median over instances (axis 1) with the 10-90% band."""
    lo, mid, hi = np.nanpercentile(values, [10, 50, 90], axis=1)
    line = ax.plot(x, mid, label=label, **style)
    ax.fill_between(x, lo, hi, color=line[0].get_color(), alpha=0.2, lw=0)


def _figure(alphas, distances, curve_alphas, curves, path):
    """Left: distances against α (GD limits: markers and bands; argmin Q_α: dashed). Right: one
    instance's coordinates of argmin Q_α against α (those in ``path``), its GD limits, and the min-l1 /
    min-l2 solutions."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for key, label, color in (("l1", "min-l1 solution", "C0"), ("l2", "min-l2 solution", "C1")):
        _band(left, alphas, distances[key], f"GD limit to the {label}", color=color, marker="o", ms=4)
        left.plot(curve_alphas, np.median(curves[key], axis=1), color=color, ls="--", lw=1,
                  label=f"argmin Q_α to the {label}")
    _band(left, alphas, distances["limit"], "GD limit to argmin Q_α (step bias; rounding floor)", color="C3",
          marker="s", ms=4)
    left.set(xscale="log", yscale="log", xlabel="initialisation scale α",
             ylabel="relative distance ||w - w_ref|| / ||w_ref||",
             title=f"distances of w = u∘u - v∘v (median, 10-90% of {distances['l1'].shape[1]} instances)")
    left.legend(fontsize="small")
    lo, hi = curve_alphas[0], curve_alphas[-1]
    colors = colormaps["tab10"].colors
    for i in range(path["curve"].shape[1]):
        color = colors[i % len(colors)]
        right.plot(curve_alphas, path["curve"][:, i], color=color, lw=1.2, ls="-" if i < len(colors) else "--")
        right.plot(alphas, path["gd"][:, i], "o", ms=5, mfc="none", color=color)
        right.plot(lo, path["l1"][i], "<", ms=7, color=color, clip_on=False)
        right.plot(hi, path["l2"][i], ">", ms=7, color=color, clip_on=False)
    right.plot([], [], "k-", lw=1.2, label="argmin Q_α")
    right.plot([], [], "ko", mfc="none", label="GD limit")
    right.plot([], [], "k<", label="min-l1 solution")
    right.plot([], [], "k>", label="min-l2 solution")
    right.axhline(0, color="k", lw=0.5)
    right.set(xscale="log", xlabel="initialisation scale α", ylabel="w_i",
              title="instance 0: every coordinate along α")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
    return fig


@experiment
def implicit_bias(
    *, alphas: list = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0), instances: int = 8,
    n: int = 5, d: int = 12, learning_rate: float = 0.1, max_steps: int = 2_000_000, seed: int = 0,
    dtype: str = "float64",
):
    """Gradient descent on ``1/2 ||X (u∘u - v∘v) - y||^2`` from ``u = v = α 1`` for every α in
    ``alphas`` (sorted) and ``instances`` random instances (X (n, d) Gaussian, y = X w* with a
    3-sparse w*), all in one vmapped solve of at most ``max_steps`` steps, each run with its own
    step (a ``learning_rate`` fraction of the stable step at its limit; see ``_gd_runs``) until its
    gradient is at rounding level.

    Reports, per α, the relative distance of the GD limit w = u∘u - v∘v to argmin Q_α (the dual
    Newton solution), to the min-l1 and to the min-l2 solution (median and 10-90% over instances),
    the distances of argmin Q_α itself to both, and the GD runs' convergence, largest relative
    residual ``||X w - y|| / ||y||``, steps and step sizes. The GD-to-argmin-Q_α distance is the
    O(step) bias of finite steps; for large α it reaches the rounding floor of u∘u - v∘v (errors of
    about eps 2α^2 in w, amplified by the conditioning of X). In float32 that floor is about 1e-3 at
    α = 1 and the results mean little beyond.
    """
    _check(alphas, instances, n, d, learning_rate, max_steps, dtype)
    alphas = sorted(float(a) for a in alphas)
    A, I = len(alphas), instances
    generate = lambda k: make("reparametrized_least_squares", k, n=n, d=d, nonzeros=min(NONZEROS, d), dtype=dtype)
    problems = jax.jit(jax.vmap(lambda k: generate(k).problem))(jax.random.split(jax.random.key(seed), I))
    alpha_grid = jnp.asarray(alphas, dtype)
    decades = np.log10(max(alphas) / min(alphas))
    curve_alphas = np.geomspace(min(alphas), max(alphas), int(CURVE_DENSITY * decades) + 2)
    limits = _limits(problems, alpha_grid)
    curve_limits = _limits(problems, jnp.asarray(curve_alphas, dtype))
    l1 = np.asarray(jax.vmap(lambda p: p.min_l1())(problems))
    l2 = np.asarray(jax.vmap(lambda p: p.min_l2())(problems))
    runs, rates = _gd_runs(problems, alpha_grid, limits.w, jnp.asarray(learning_rate, dtype), max_steps=max_steps)

    u, v = runs.state.params
    w = np.asarray(u * u - v * v).reshape(A, I, d)
    reference = np.asarray(limits.w).reshape(A, I, d)
    curve_w = np.asarray(curve_limits.w).reshape(len(curve_alphas), I, d)
    distances = {"limit": _relative(w, reference), "l1": _relative(w, l1), "l2": _relative(w, l2)}
    theory = {"l1": _relative(reference, l1), "l2": _relative(reference, l2)}
    curves = {"l1": _relative(curve_w, l1), "l2": _relative(curve_w, l2)}
    X, y = np.asarray(problems.X), np.asarray(problems.y)
    residual = _relative(np.einsum("ind,aid->ain", X, w), np.broadcast_to(y, (A, I, n)))
    converged = np.asarray(runs.converged).reshape(A, I)
    steps_taken = np.asarray(runs.steps).reshape(A, I)
    rates = np.asarray(rates).reshape(A, I)

    shown = np.flatnonzero(np.max(np.abs(curve_w[:, 0]), axis=0) > SHOWN * np.max(np.abs(curve_w[:, 0])))
    path = {"curve": curve_w[:, 0, shown], "gd": w[:, 0, shown], "l1": l1[0, shown], "l2": l2[0, shown]}
    fig = _figure(np.asarray(alphas, float), distances, curve_alphas, curves, path)

    stats = lambda x: dict(zip(("p10", "median", "p90"), map(float, np.percentile(x, [10, 50, 90]))))
    results = {
        "per_alpha": [
            {
                "alpha": float(a),
                "gd_to_limit": stats(distances["limit"][j]),
                "gd_to_min_l1": stats(distances["l1"][j]),
                "gd_to_min_l2": stats(distances["l2"][j]),
                "limit_to_min_l1": stats(theory["l1"][j]),
                "limit_to_min_l2": stats(theory["l2"][j]),
                "gd_converged": int(np.sum(converged[j])),
                "gd_max_residual": float(np.max(residual[j])),
                "gd_max_steps": int(np.max(steps_taken[j])),
                "gd_step_median": float(np.median(rates[j])),
            }
            for j, a in enumerate(alphas)
        ],
        "runs": A * I,
        "gd_converged": int(np.sum(converged)),
        "limit_converged": bool(np.all(limits.converged)) and bool(np.all(curve_limits.converged)),
        "limit_max_residual": float(max(np.max(limits.residual), np.max(curve_limits.residual))),
    }
    return results, fig
