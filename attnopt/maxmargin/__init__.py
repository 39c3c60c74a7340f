"""Max-margin (SVM) views of attention (docs/math.md, Attention as a max-margin problem).

Native, vmappable hard-margin solvers (``solve_qp``: Euclidean norm, ``solve_nuclear``:
nuclear norm, ``solve_lp``: entrywise l_p norm), the directional Bregman divergence of
||.||_p^p / p (``bregman``), the SVMs of a token selection (``attention_svm``, ``value_svm``) and
token-selection analysis (``optimal_tokens``, ``selected_tokens``, ``is_locally_optimal``,
``alignment``, ``numerical_rank``), and the regularization path (``regularization_path``).
"""
from attnopt.maxmargin.lp import bregman, solve_lp
from attnopt.maxmargin.nuclear import solve_nuclear
from attnopt.maxmargin.path import PathResult, regularization_path
from attnopt.maxmargin.qp import solve_qp
from attnopt.maxmargin.result import SVMResult
from attnopt.maxmargin.svm import attention_svm, value_svm
from attnopt.maxmargin.tokens import (
    alignment,
    is_locally_optimal,
    numerical_rank,
    optimal_tokens,
    selected_tokens,
    token_scores,
)
