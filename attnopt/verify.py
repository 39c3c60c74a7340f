"""Check a problem's hand-derived derivatives against JAX autodiff of its own loss.

Only what the problem derives by hand (:meth:`Problem.hand_derived`) is
compared; a quantity it leaves to the autodiff defaults of
:class:`~attnopt.problems.base.Problem` is reported as "autodiff". For float32
params the reference is autodiff in float64 (of the same data, widened), since
float32 autodiff can itself be far off where a hand formula is accurate.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from attnopt.problems.base import DERIVATIVES, Problem

#: (rtol, atol) per dtype: a quantity passes when max|ours - autodiff| <= max(rtol * max|autodiff|, atol).
TOLERANCES = {
    jnp.dtype("float64"): (1e-10, 1e-12),
    jnp.dtype("float32"): (1e-4, 1e-6),
}


@dataclasses.dataclass(frozen=True)
class DerivativeReport:
    """Result of :func:`check_derivatives`.

    ``errors[q]`` is the max relative error of each compared (hand-derived)
    quantity q in {grad, hvp, hessian}: ``max|ours - autodiff| /
    max(max|autodiff|, atol / rtol)``, so q passes when its error is at most
    ``rtol``. ``autodiff`` lists the quantities the problem takes from
    autodiff, which are not compared. ``ok`` covers the compared ones only.
    ``reference`` is the dtype the autodiff references were computed in.
    """

    name: str
    dtype: str
    errors: dict
    rtol: float
    atol: float
    autodiff: tuple = ()
    reference: str = ""

    @property
    def ok(self) -> bool:
        return all(np.isfinite(e) and e <= self.rtol for e in self.errors.values())

    @property
    def note(self) -> str:
        """A plain statement when nothing was compared, else ''."""
        if self.errors:
            return ""
        return f"nothing to compare: {self.name} uses autodiff for {', '.join(self.autodiff)}"

    def __str__(self) -> str:
        return format_reports([self])


def format_reports(reports) -> str:
    """One table, a row per report; "autodiff" marks a quantity that was not compared."""
    quantities = "".join(f"{q:>11}" for q in DERIVATIVES)
    header = f"{'problem':<28} {'dtype':<8} {'reference':<10}{quantities}{'rtol':>9}  ok"
    rows = [header, "-" * len(header)]
    for r in reports:
        errs = "".join(f"{r.errors[q]:>11.2e}" if q in r.errors else f"{'autodiff':>11}" for q in DERIVATIVES)
        verdict = ("yes" if r.ok else "NO") if r.errors else "-"
        rows.append(f"{r.name:<28} {r.dtype:<8} {r.reference or '-':<10}{errs}{r.rtol:>9.0e}  {verdict}")
    return "\n".join(rows + [r.note for r in reports if r.note])


def _rel_error(ours, ref, rtol, atol) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(ref), initial=0.0)), atol / rtol)
    return float(np.max(np.abs(ours - ref), initial=0.0)) / scale


@functools.partial(jax.jit, static_argnames=("owner", "quantities"))
def _evaluate(problem, x, v, owner, quantities):
    """The ``quantities`` from ``owner``'s methods called on problem: grad and hvp flattened, hessian (N, N).

    ``owner`` is ``type(problem)`` for the problem's own formulas, or
    :class:`Problem` for the autodiff references.
    """
    methods = {
        "grad": lambda: ravel_pytree(owner.grad(problem, x))[0],
        "hvp": lambda: ravel_pytree(owner.hvp(problem, x, v))[0],
        "hessian": lambda: owner.hessian(problem, x),
    }
    return tuple(methods[q]() for q in quantities)


def _widened(tree):
    """The pytree with its floating leaves narrower than float64 cast to float64 (call under x64)."""
    def widen(leaf):
        dtype = getattr(leaf, "dtype", None)
        narrow = dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 64
        return leaf.astype(jnp.float64) if narrow else leaf

    return jax.tree.map(widen, tree)


def check_derivatives(
    problem, x, v=None, *, name=None, rtol=None, atol=None, reference="float64"
) -> DerivativeReport:
    """Compare the problem's hand-derived ``grad``, ``hvp`` and ``hessian`` at params x with autodiff.

    The references are ``jax.grad(loss)``, ``jax.jvp(jax.grad(loss))`` and
    ``jax.hessian`` of ``loss`` over the flattened params (so the Hessian is
    (N, N) in ``ravel_pytree`` order): the defaults of :class:`Problem`.
    Quantities the problem does not override are not compared (reported as
    "autodiff"). v defaults to a seeded normal direction. Tolerances default
    to :data:`TOLERANCES` for the params' dtype.

    ``reference="float64"`` (the default) computes the references in float64
    (under ``jax.enable_x64``) from the problem's data and x widened exactly,
    so a float32 formula is judged against the derivative of the float32 data
    rather than against float32 autodiff, which can be off by far more than
    the formula; ``reference="same"`` uses the params' own dtype.
    """
    if reference not in ("float64", "same"):
        raise ValueError(f"reference must be 'float64' or 'same', got {reference!r}")
    flat, unravel = ravel_pytree(x)
    dtype = flat.dtype
    default_rtol, default_atol = TOLERANCES.get(jnp.dtype(dtype), TOLERANCES[jnp.dtype("float32")])
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if v is None:
        v = unravel(jax.random.normal(jax.random.PRNGKey(0), flat.shape, dtype))
    compared = problem.hand_derived()
    widen = reference == "float64" and jnp.finfo(dtype).bits < 64
    errors = {}
    if compared:
        ours = _evaluate(problem, x, v, type(problem), compared)
        if widen:
            with jax.enable_x64(True):
                refs = _evaluate(*_widened((problem, x, v)), Problem, compared)
        else:
            refs = _evaluate(problem, x, v, Problem, compared)
        errors = {q: _rel_error(o, r, rtol, atol) for q, o, r in zip(compared, ours, refs)}
    return DerivativeReport(
        name=name or type(problem).__name__,
        dtype=str(dtype),
        errors=errors,
        rtol=rtol,
        atol=atol,
        autodiff=tuple(q for q in DERIVATIVES if q not in compared),
        reference="float64" if widen else str(dtype),
    )
