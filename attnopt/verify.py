"""Check a problem's hand-derived derivatives against JAX autodiff of its own loss."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

#: (rtol, atol) per dtype: a quantity passes when max|ours - autodiff| <= max(rtol * max|autodiff|, atol).
TOLERANCES = {
    jnp.dtype("float64"): (1e-10, 1e-12),
    jnp.dtype("float32"): (1e-4, 1e-6),
}

QUANTITIES = ("grad", "hvp", "hessian")


@dataclasses.dataclass(frozen=True)
class DerivativeReport:
    """Result of :func:`check_derivatives`.

    ``errors[q]`` is the max relative error of quantity q in {grad, hvp,
    hessian}: ``max|ours - autodiff| / max(max|autodiff|, atol / rtol)``,
    so a quantity passes when its error is at most ``rtol``.
    """

    name: str
    dtype: str
    errors: dict
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return all(np.isfinite(e) and e <= self.rtol for e in self.errors.values())

    def __str__(self) -> str:
        return format_reports([self])


def format_reports(reports) -> str:
    """One table, a row per report."""
    header = f"{'problem':<28} {'dtype':<8}" + "".join(f"{q:>11}" for q in QUANTITIES) + f"{'rtol':>9}  ok"
    rows = [header, "-" * len(header)]
    for r in reports:
        errs = "".join(f"{r.errors[q]:>11.2e}" for q in QUANTITIES)
        rows.append(f"{r.name:<28} {r.dtype:<8}{errs}{r.rtol:>9.0e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(rows)


def _rel_error(ours, ref, rtol, atol) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(ref), initial=0.0)), atol / rtol)
    return float(np.max(np.abs(ours - ref), initial=0.0)) / scale


@jax.jit
def _hand_derived(problem, x, v):
    """The problem's own grad, hvp (flattened) and hessian."""
    return ravel_pytree(problem.grad(x))[0], ravel_pytree(problem.hvp(x, v))[0], problem.hessian(x)


@jax.jit
def _autodiff(problem, x, v):
    """jax.grad, jvp-of-grad and jax.hessian of the loss over the flattened params."""
    flat, unravel = ravel_pytree(x)
    flat_grad = jax.grad(lambda y: problem.loss(unravel(y)))
    hvp = jax.jvp(flat_grad, (flat,), (ravel_pytree(v)[0],))[1]
    return flat_grad(flat), hvp, jax.jacfwd(flat_grad)(flat)


def check_derivatives(problem, x, v=None, *, name=None, rtol=None, atol=None) -> DerivativeReport:
    """Compare ``problem.grad``, ``hvp`` and ``hessian`` at params x with autodiff.

    The references are ``jax.grad(loss)``, ``jax.jvp(jax.grad(loss))`` and
    ``jax.hessian`` of ``loss`` over the flattened params (so the Hessian is
    (N, N) in ``ravel_pytree`` order). v defaults to a seeded normal
    direction. Tolerances default to :data:`TOLERANCES` for the params' dtype.
    """
    flat, unravel = ravel_pytree(x)
    dtype = flat.dtype
    default_rtol, default_atol = TOLERANCES.get(jnp.dtype(dtype), TOLERANCES[jnp.dtype("float32")])
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if v is None:
        v = unravel(jax.random.normal(jax.random.PRNGKey(0), flat.shape, dtype))
    ours = dict(zip(QUANTITIES, _hand_derived(problem, x, v)))
    refs = dict(zip(QUANTITIES, _autodiff(problem, x, v)))
    errors = {q: _rel_error(ours[q], refs[q], rtol, atol) for q in QUANTITIES}
    return DerivativeReport(
        name=name or type(problem).__name__, dtype=str(dtype), errors=errors, rtol=rtol, atol=atol
    )
