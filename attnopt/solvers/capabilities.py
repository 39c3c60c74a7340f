"""What a solver may need from a problem, declared as protocols in one place.

A solver lists the protocols it needs in its ``needs`` class attribute;
:func:`check` raises before any work when a problem lacks one. Every problem
has ``loss``, ``grad``, ``hvp`` and ``hessian`` (the last three default to
autodiff), so only the structured extras below can be missing.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class HasHessian(Protocol):
    """``hessian(params) -> (N, N)`` in ``ravel_pytree`` order."""

    def hessian(self, params): ...


@runtime_checkable
class HasHVP(Protocol):
    """``hvp(params, v) -> like params``."""

    def hvp(self, params, v): ...


@runtime_checkable
class HasCurvature(Protocol):
    """``H = A^T B A + ridge I`` with data ``A`` (n, d), ``ridge`` and ``curvature(x)`` = B (diagonal plus low rank)."""

    A: object
    ridge: object

    def curvature(self, params): ...


@runtime_checkable
class HasGaussNewton(Protocol):
    """A PSD Gauss-Newton model ``gauss_newton_matrix(params) -> (N, N)``."""

    def gauss_newton_matrix(self, params): ...


@runtime_checkable
class HasVariableProjection(Protocol):
    """Params split as (X, Y) with an exact minimiser over Y: ``split_params``, ``solve_y(X)``, ``hessian_x``."""

    def split_params(self, params, name="params"): ...

    def solve_y(self, X): ...

    def hessian_x(self, params): ...


def check(problem, solver) -> None:
    """Raise ValueError naming the solver, the problem and what is missing, if ``problem`` lacks a need of ``solver``."""
    missing = [protocol for protocol in solver.needs if not isinstance(problem, protocol)]
    if missing:
        what = "; ".join(f"{p.__name__} ({p.__doc__.strip()})" for p in missing)
        raise ValueError(f"solver {solver.name!r} cannot run on {type(problem).__name__}: it needs {what}")
