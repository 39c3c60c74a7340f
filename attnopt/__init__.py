"""attnopt: JAX toolkit for the optimization problems that model attention."""
from attnopt import _runtime  # noqa: F401  (one OpenBLAS thread unless OPENBLAS_NUM_THREADS is set; before JAX loads LAPACK)
from attnopt._runtime import disable_compilation_cache, enable_compilation_cache  # off unless called
from attnopt import maxmargin, solvers
from attnopt.operators import DenseOperator, DiagPlusLowRank, KroneckerOperator
from attnopt.problems import (
    AttentionParams,
    AttentionRegression,
    CrossAttention,
    Instance,
    LinkRegression,
    MatrixLinkRegression,
    MatrixRescaledRegression,
    MatrixSoftmaxRegression,
    Problem,
    PromptAttention,
    ReparametrizedLeastSquares,
    ReparametrizedParams,
    RescaledRegression,
    ResNetSoftmaxRegression,
    SoftmaxRegression,
    make,
    stack,
)
from attnopt.solvers import SolveError, SolveResult, SolverState, Status, Trace, solve, solve_batch
from attnopt.verify import DerivativeReport, check_derivatives

__version__ = "0.1.0"
