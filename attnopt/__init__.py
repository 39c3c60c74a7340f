"""attnopt: JAX toolkit for the optimization problems that model attention."""
from attnopt import solvers
from attnopt.operators import DiagPlusLowRank, KroneckerOperator
from attnopt.problems import (
    AttentionParams,
    AttentionRegression,
    Instance,
    LinkRegression,
    MatrixLinkRegression,
    MatrixRescaledRegression,
    MatrixSoftmaxRegression,
    Problem,
    RescaledRegression,
    ResNetSoftmaxRegression,
    SoftmaxRegression,
    make,
    stack,
)
from attnopt.solvers import SolveError, SolveResult, SolverState, Status, Trace, solve, solve_batch
from attnopt.verify import DerivativeReport, check_derivatives

__version__ = "0.1.0"
