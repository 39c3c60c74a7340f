"""Problem families."""
from attnopt.problems.base import Problem, stack
from attnopt.problems.registry import Instance, make
from attnopt.problems.regression import (
    LinkRegression,
    RescaledRegression,
    ResNetSoftmaxRegression,
    SoftmaxRegression,
)
from attnopt.problems.matrix import MatrixLinkRegression, MatrixRescaledRegression, MatrixSoftmaxRegression
from attnopt.problems.attention import AttentionParams, AttentionRegression
from attnopt.problems.maxmargin import CrossAttention, PromptAttention
from attnopt.problems.reparametrized import (
    BiasLimit,
    ReparametrizedLeastSquares,
    ReparametrizedParams,
    balanced_factors,
    hyperbolic_entropy,
)
