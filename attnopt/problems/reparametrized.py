"""Underdetermined least squares through the diagonal reparametrisation ``w = u∘u - v∘v``.

Data X (n, d) with n < d and full row rank, y (n,); params ``(u, v)``, each (d,).
See (docs/math.md, Reparametrised least squares and implicit bias). With
``w = u∘u - v∘v``, ``r = X w - y`` and ``g = X^T r`` (the gradient in w):

    L(u, v) = 1/2 ||r||^2
    grad    = (2 u∘g, -2 v∘g)                                                    O(nd)
    hvp     = (2 a∘g + 2 u∘δg, -2 b∘g - 2 v∘δg),  δg = X^T X (2 u∘a - 2 v∘b)     O(nd)
    hessian = J^T X^T X J + blockdiag(2 diag(g), -2 diag(g)),  J = [2 diag(u), -2 diag(v)]   O(n d^2)

in ``ravel_pytree`` order (u first). Gradient flow from ``u = v = α 1`` keeps
``u_i v_i = α^2`` and is mirror flow on w for the hyperbolic entropy

    Q_α(w) = sum_i 2α^2 - sqrt(4α^4 + w_i^2) + w_i arcsinh(w_i / (2α^2)),   ∇Q_α(w) = arcsinh(w / (2α^2))

so its limit is ``argmin Q_α(w) s.t. X w = y`` (:meth:`ReparametrizedLeastSquares.implicit_bias_limit`):
the minimum-l1 solution as α -> 0 (:meth:`~ReparametrizedLeastSquares.min_l1`) and the minimum-l2
one as α -> ∞ (:meth:`~ReparametrizedLeastSquares.min_l2`).
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnopt import _validate
from attnopt.problems.base import Problem
from attnopt.problems.registry import Instance, register

#: Iteration cap of the dual Newton method, halvings allowed in its line search, and the largest
#: change of an exponent (X^T μ)_i that a step may try first.
NEWTON_STEPS = 100
LINE_SEARCH_HALVINGS = 40
MAX_EXPONENT_STEP = 8.0


class ReparametrizedParams(NamedTuple):
    """The params ``(u, v)`` of :class:`ReparametrizedLeastSquares`, each (d,); a plain tuple works too."""

    u: jax.Array
    v: jax.Array


class BiasLimit(NamedTuple):
    """``argmin Q_α(w) s.t. X w = y`` from the dual Newton method.

    w: (d,) the minimiser, ``2α^2 sinh(X^T multiplier)``.
    multiplier: (n,) μ with ``∇Q_α(w) = X^T μ``.
    residual: ``||X w - y|| / ||y||`` (``||X w - y||`` for y = 0).
    iterations: int32, Newton steps taken.
    converged: bool, the residual reached the rounding level of X w - y; False (with the last
      iterate) when the step cap or the line search ran out, or for a traced α <= 0 (w then NaN).
    """

    w: jax.Array
    multiplier: jax.Array
    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


def hyperbolic_entropy(w: jax.Array, alpha) -> jax.Array:
    """``Q_α(w) = sum_i 2α^2 - sqrt(4α^4 + w_i^2) + w_i arcsinh(w_i / (2α^2))`` for w (..., d): (...)."""
    c = 2 * jnp.asarray(alpha, w.dtype) ** 2
    return jnp.sum(c - jnp.sqrt(c * c + w * w) + w * jnp.arcsinh(w / c), axis=-1)


def balanced_factors(w: jax.Array, alpha) -> ReparametrizedParams:
    """The params (u, v) >= 0 with ``u∘u - v∘v = w`` and ``u∘v = α^2`` (the invariant of gradient flow
    from ``u = v = α 1``), for w (d,): with ``p = (sqrt(w^2 + 4α^4) + |w|) / 2`` and ``q = α^4 / p``
    (so ``p - q = |w|`` without cancellation), ``(u^2, v^2) = (p, q)`` where w >= 0, else ``(q, p)``."""
    a2 = jnp.asarray(alpha, w.dtype) ** 2
    p = 0.5 * (jnp.sqrt(w * w + 4 * a2 * a2) + jnp.abs(w))
    q = a2 * a2 / p
    big, small = jnp.sqrt(p), jnp.sqrt(q)
    return ReparametrizedParams(jnp.where(w >= 0, big, small), jnp.where(w >= 0, small, big))


class ReparametrizedLeastSquares(Problem):
    """``L(u, v) = 1/2 ||X (u∘u - v∘v) - y||^2``: underdetermined least squares in the diagonal
    reparametrisation.

    Args:
      X: (n, d) data with n < d and full row rank n.
      y: (n,) targets.

    Params: a pair ``(u, v)`` of (d,) arrays, as :class:`ReparametrizedParams` or a plain tuple;
    ``grad`` and ``hvp`` return the same structure. Every exact solution has loss 0.
    """

    leaves: ClassVar = ("X", "y")
    lower_bound: ClassVar = 0.0  # a sum of squares

    def __init__(self, X, y):
        dtype = _validate.float_dtype(X=X, y=y)
        X = _validate.as_array("X", X, dtype, (None, None))
        n, d = X.shape
        if n >= d:
            raise ValueError(f"X must have fewer rows than columns (an underdetermined system), got shape {(n, d)}")
        rank = np.linalg.matrix_rank(np.asarray(X, np.float64)) if _validate.is_concrete(X) else n
        if rank < n:
            raise ValueError(f"X must have full row rank {n}, got rank {rank}")
        self._set(X=X, y=_validate.as_array(f"y (X has {n} rows)", y, dtype, (n,)))

    def split_params(self, params, name="params"):
        """(u, v) from a pair, shape-checked, and a function rebuilding params' structure."""
        leaves, treedef = jax.tree.flatten(params)
        if len(leaves) != 2:
            raise ValueError(f"{name} must be a pair (u, v), got a pytree with {len(leaves)} leaves")
        d = self.X.shape[-1]
        _validate.params_shape(f"{name}[0] (u)", leaves[0], (d,))
        _validate.params_shape(f"{name}[1] (v)", leaves[1], (d,))
        return leaves[0], leaves[1], lambda u, v: jax.tree.unflatten(treedef, [u, v])

    def weights(self, params) -> jax.Array:
        """``w = u∘u - v∘v``, (d,)."""
        u, v, _ = self.split_params(params)
        return u * u - v * v

    def _residual_gradient(self, u, v):
        r = self.X @ (u * u - v * v) - self.y
        return r, r @ self.X

    @jax.jit
    def loss(self, params):
        """``1/2 ||X w - y||^2``, ()."""
        u, v, _ = self.split_params(params)
        r, _ = self._residual_gradient(u, v)
        return 0.5 * (r @ r)

    @jax.jit
    def grad(self, params):
        """``(2 u∘g, -2 v∘g)``, g = X^T (X w - y), like params."""
        u, v, like = self.split_params(params)
        _, g = self._residual_gradient(u, v)
        return like(2 * u * g, -2 * v * g)

    @jax.jit
    def hvp(self, params, direction):
        """Hessian-vector product in direction (a, b), like params, O(nd)."""
        u, v, like = self.split_params(params)
        a, b, _ = self.split_params(direction, "direction")
        _, g = self._residual_gradient(u, v)
        dg = (self.X @ (2 * u * a - 2 * v * b)) @ self.X
        return like(2 * a * g + 2 * u * dg, -2 * b * g - 2 * v * dg)

    @jax.jit
    def hessian(self, params):
        """Hessian (2d, 2d), u block first: ``(X J)^T (X J) + blockdiag(2 diag(g), -2 diag(g))``, O(n d^2)."""
        u, v, _ = self.split_params(params)
        _, g = self._residual_gradient(u, v)
        XJ = jnp.concatenate([self.X * (2 * u), self.X * (-2 * v)], axis=-1)
        return XJ.T @ XJ + jnp.diag(jnp.concatenate([2 * g, -2 * g]))

    @jax.jit
    def min_l2(self) -> jax.Array:
        """The minimum-l2 solution ``X^+ y`` of X w = y, (d,)."""
        return jnp.linalg.lstsq(self.X, self.y)[0]

    @jax.jit
    def min_l1(self) -> jax.Array:
        """The minimum-l1 solution of X w = y, (d,).

        Solved on the host in float64 by SciPy's HiGHS dual simplex (``scipy.optimize.linprog``,
        through ``jax.pure_callback``, so it works under jit and vmap, one instance at a time) as
        the LP ``min 1^T (p + q) s.t. X (p - q) = y, p, q >= 0``, w = p - q. The simplex returns a
        vertex, so its entries are exact up to the rounding of the basis solve. A unique minimiser
        is assumed (true for X in general position); a failed LP raises RuntimeError.
        """
        shape = jax.ShapeDtypeStruct(self.X.shape[-1:], self.X.dtype)
        return jax.pure_callback(_min_l1_host, shape, self.X, self.y, vmap_method="sequential")

    def implicit_bias_limit(self, alpha) -> BiasLimit:
        """``argmin Q_α(w) s.t. X w = y`` for a scalar α > 0 (traced: vmap over α works), a :class:`BiasLimit`.

        At the minimiser ``arcsinh(w / (2α^2)) = X^T μ``, so ``w = 2α^2 sinh(X^T μ)`` and μ (n,) is the
        root of ``F(μ) = X 2α^2 sinh(X^T μ) - y``, the gradient of the convex dual
        ``φ(μ) = 2α^2 sum_i (cosh((X^T μ)_i) - 1) - <y, μ>``. From μ = 0, damped Newton steps
        ``μ <- μ - t (X diag(2α^2 cosh(X^T μ)) X^T)^{-1} F(μ)`` take the largest t in {t0, t0/2, ...}
        with Armijo decrease of φ (up to its rounding), where t0 <= 1 keeps the first trial change of
        every exponent ``(X^T μ)_i`` at most 8 (no overflow from the huge first steps of small α),
        until ``||F|| <= 8 eps (||X||_F ||w|| + ||y||)``. Tested for α from 1e-12 to 1e4.
        A non-scalar α, or a concrete one that is not a finite number > 0, raises ValueError.
        """
        if jnp.ndim(alpha) != 0:
            raise ValueError(f"alpha must be a scalar, got shape {jnp.shape(alpha)}; vmap over α for several")
        if _validate.is_concrete(alpha) and not (np.isfinite(float(alpha)) and float(alpha) > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        return _dual_newton(self.X, self.y, jnp.asarray(alpha, self.X.dtype))


def _min_l1_host(X, y):
    """The LP of :meth:`ReparametrizedLeastSquares.min_l1` on NumPy arrays (SciPy imported only here)."""
    import scipy.optimize

    dtype, d = X.dtype, X.shape[1]
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    out = scipy.optimize.linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None), method="highs-ds")
    if out.status != 0:
        raise RuntimeError(f"min_l1: linprog failed: {out.message}")
    return (out.x[:d] - out.x[d:]).astype(dtype)


@jax.jit
def _dual_newton(X, y, alpha) -> BiasLimit:
    """The method of :meth:`ReparametrizedLeastSquares.implicit_bias_limit`."""
    eps = jnp.finfo(X.dtype).eps
    c = 2 * alpha * alpha

    def primal(mu):
        z = X.T @ mu
        w = c * jnp.sinh(z)
        return z, w, X @ w - y

    def dual(mu):  # φ and the sum of its terms' magnitudes (its rounding scale); cosh z - 1 = 2 sinh(z/2)^2
        s = jnp.sinh(0.5 * (X.T @ mu))
        curve, linear = 2 * c * (s @ s), y @ mu
        return curve - linear, curve + jnp.abs(linear)

    def tolerance(w):
        return 8 * eps * (jnp.linalg.norm(X) * jnp.linalg.norm(w) + jnp.linalg.norm(y))

    def newton_step(mu):
        z, _, F = primal(mu)
        H = (X * (c * jnp.cosh(z))) @ X.T
        step = -jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(H), True), F)
        value, scale = dual(mu)
        slope = F @ step  # <∇φ, step> = -(Newton decrement)^2

        def rejected(t):
            new, _ = dual(mu + t * step)
            return ~(new <= value + 1e-4 * t * slope + 8 * eps * scale)

        def halve(state):
            t, k = state
            return 0.5 * t, k + 1

        first = jnp.minimum(1, MAX_EXPONENT_STEP / jnp.max(jnp.abs(X.T @ step)))
        t, k = jax.lax.while_loop(lambda s: rejected(s[0]) & (s[1] < LINE_SEARCH_HALVINGS), halve, (first, 0))
        ok = (k < LINE_SEARCH_HALVINGS) & jnp.all(jnp.isfinite(step))
        return jnp.where(ok, mu + t * step, mu), ok

    def done(mu):
        _, w, F = primal(mu)
        return jnp.linalg.norm(F) <= tolerance(w)

    def body(state):
        mu, k, _ = state
        new, ok = newton_step(mu)
        return new, k + 1, ok

    mu, steps, ok = jax.lax.while_loop(
        lambda s: s[2] & (s[1] < NEWTON_STEPS) & ~done(s[0]),
        body,
        (jnp.zeros(X.shape[:1], X.dtype), jnp.zeros((), jnp.int32), alpha > 0),
    )
    _, w, F = primal(mu)
    converged = (jnp.linalg.norm(F) <= tolerance(w)) & (alpha > 0)
    scale = jnp.linalg.norm(y)
    residual = jnp.linalg.norm(F) / jnp.where(scale > 0, scale, 1)
    return BiasLimit(jnp.where(alpha > 0, w, jnp.nan), mu, residual, steps, converged)


@register("reparametrized_least_squares")
def reparametrized_instance(key, n=5, d=12, alpha=0.1, nonzeros=3, dtype="float64"):
    """ReparametrizedLeastSquares with a planted sparse w*: X (n, d) with N(0, 1/n) entries, w* with
    ``nonzeros`` entries ±U(0.5, 1.5) at random positions, y = X w*; x0 = (α 1, α 1), the start
    whose gradient-descent limit has the implicit bias of Q_α; solution ``balanced_factors(w*, α)``
    (params with loss 0; ``problem.weights(solution)`` is w*). Gradient descent does not go there
    in general: its limit is near ``problem.implicit_bias_limit(α)``.
    """
    _validate.generator_options(n=n, d=d, dtype=dtype)
    if not (_validate.is_number(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not _validate.is_count(nonzeros):
        raise ValueError(f"nonzeros must be an int >= 1, got {nonzeros!r}")
    _validate.at_most("nonzeros", nonzeros, "d", d)
    if n >= d:
        raise ValueError(f"n must be < d (an underdetermined system), got n={n}, d={d}")
    k_x, k_support, k_sign, k_size = jax.random.split(key, 4)
    X = jax.random.normal(k_x, (n, d), dtype) / jnp.sqrt(jnp.asarray(n, dtype))
    support = jax.random.permutation(k_support, d)[:nonzeros]
    sizes = jax.random.uniform(k_size, (nonzeros,), dtype, 0.5, 1.5)
    values = jax.random.rademacher(k_sign, (nonzeros,), dtype) * sizes
    w_star = jnp.zeros(d, dtype).at[support].set(values)
    start = jnp.full((d,), alpha, dtype)
    problem = ReparametrizedLeastSquares(X, X @ w_star)
    return Instance(problem, ReparametrizedParams(start, start), balanced_factors(w_star, alpha))
