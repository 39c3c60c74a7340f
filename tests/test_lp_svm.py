"""l_p-norm attention SVMs (attnopt.maxmargin.lp) against cvxpy + Clarabel, and the directional Bregman divergence.

Each batch of random instances is solved in one vmapped call per p and each instance again
by Clarabel (``cp.pnorm``, tolerances 1e-10): objectives agree to 1e-8 relative, our
solutions violate no constraint by more than 1e-9, have the same support and multipliers
with sign(Θ)|Θ|^{p-1} = sum_k lambda_k C_k.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnopt import maxmargin as mm
from attnopt.problems import stack
from attnopt.problems.maxmargin import CrossAttention, PromptAttention
from test_svm import attention_rows as rows

cp = pytest.importorskip("cvxpy")

CLARABEL = dict(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)
PS = (1.25, 1.5, 1.75, 2.0, 3.0, 4.0)


def sphere(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cross_batch(seed, count=8, n=4, T=5, d=5):
    """CrossAttention problems, half with the optimal selection, and their selections (count, n)."""
    rng = np.random.default_rng(seed)
    problems = [
        CrossAttention(sphere(rng, n, T, d), rng.choice([-1.0, 1.0], n), sphere(rng, n, d), sphere(rng, d))
        for _ in range(count)
    ]
    alphas = rng.integers(0, T, (count, n))
    for k in range(count // 2):
        alphas[k] = mm.optimal_tokens(problems[k])
    return problems, alphas


def prompt_batch(seed, count=8, n=3, T=4, d=5):
    rng = np.random.default_rng(seed)
    problems = [
        PromptAttention(sphere(rng, n, T, d), rng.choice([-1.0, 1.0], n), sphere(rng, d), W=rng.normal(size=(d, d)))
        for _ in range(count)
    ]
    return problems, rng.integers(0, T, (count, n))


def reference(C, m, p):
    """Clarabel on ``min ||vec w||_p s.t. <C_k, w> >= m_k``: (status, w (flat), objective)."""
    C = np.asarray(C).reshape(len(C), -1)
    w = cp.Variable(C.shape[1])
    problem = cp.Problem(cp.Minimize(cp.pnorm(w, p)), [C @ w >= m])
    with warnings.catch_warnings():  # "optimal_inaccurate" at these tight tolerances is expected
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        problem.solve(**CLARABEL)
    return problem.status, w.value, problem.value


def check_against_reference(res, C, m, p, keep):
    """One result (support and multipliers (n, T), ``keep`` the t != alpha_i entries) vs Clarabel on rows (C, m).

    Returns whether it is feasible."""
    status, w_ref, value = reference(C, m, p)
    assert status in ("optimal", "optimal_inaccurate", "infeasible"), status
    assert bool(res.feasible) == (status != "infeasible")
    if status == "infeasible":
        return False
    Cf, w = C.reshape(len(C), -1), np.asarray(res.solution).ravel()
    assert abs(float(res.objective) - value) <= 1e-8 * value
    assert float(res.objective) == pytest.approx(np.linalg.norm(w, p), rel=1e-12)
    assert np.max(m - Cf @ w) <= 1e-9
    scale = np.abs(m) + np.linalg.norm(Cf, p / (p - 1), axis=1) * value
    np.testing.assert_array_equal(np.asarray(res.support)[keep], Cf @ w_ref - m <= 1e-6 * scale)
    lam = np.asarray(res.multipliers)
    assert np.all(lam >= 0) and np.all(lam[~keep] == 0)
    grad = np.sign(w) * np.abs(w) ** (p - 1)
    np.testing.assert_allclose(lam[keep] @ Cf, grad, atol=1e-9 * np.max(np.abs(grad)))
    return True


def batched(fn, problems, alphas, *args):
    return jax.vmap(lambda p, a: fn(p, a, *args))(stack(problems), jnp.asarray(alphas))


def unstack(tree, k):
    return jax.tree.map(lambda x: x[k], tree)


def kept(alpha, T):
    return np.arange(T)[None, :] != np.asarray(alpha)[:, None]


@pytest.fixture(scope="module")
def cross():
    """The cross batch and its W-SVMs for every p in PS, each p one vmapped call."""
    problems, alphas = cross_batch(1)
    return problems, alphas, {p: batched(mm.attention_svm, problems, alphas, None, p) for p in PS}


@pytest.mark.parametrize("p", PS)
def test_w_svm_matches_clarabel(cross, p):
    problems, alphas, results = cross
    feasible = 0
    for k, (problem, alpha) in enumerate(zip(problems, alphas)):
        res = unstack(results[p], k)
        assert res.solution.shape == (5, 5) and res.support.shape == res.multipliers.shape == (4, 5)
        feasible += check_against_reference(res, *rows(problem, alpha), p, kept(alpha, 5))
        assert not res.feasible or float(res.kkt_residual) <= 1e-10
    assert feasible >= 4


@pytest.mark.parametrize("p", [1.5, 3.0])
def test_att_svm_matches_clarabel(p):
    problems, alphas = prompt_batch(2)
    margins = np.array([1.0, 0.0, 1.0])  # the relaxed ATT-SVM
    results = batched(mm.attention_svm, problems, alphas, margins, p)
    feasible = sum(
        check_against_reference(unstack(results, k), *rows(problem, alpha, margins), p, kept(alpha, 4))
        for k, (problem, alpha) in enumerate(zip(problems, alphas))
    )
    assert feasible >= 4


def test_value_svm_matches_clarabel():
    problems, alphas = cross_batch(3)
    results = batched(mm.value_svm, problems, alphas, 3.0)
    for k, (p, alpha) in enumerate(zip(problems, alphas)):
        C = np.asarray(p.Y)[:, None] * np.asarray(p.X)[np.arange(4), alpha]
        assert check_against_reference(unstack(results, k), C, np.ones(4), 3.0, np.ones(4, bool))


def test_each_norm_minimised_by_its_own_svm(cross):
    _, _, results = cross
    for p, q in [(1.25, 4.0), (4.0, 1.25), (2.0, 1.5)]:
        for k in np.flatnonzero(np.asarray(results[p].feasible)):
            other = np.asarray(results[q].solution[k]).ravel()
            assert float(results[p].objective[k]) <= np.linalg.norm(other, p) * (1 + 1e-12)


def test_p2_equals_fro(cross):
    problems, alphas, results = cross
    fro = batched(mm.attention_svm, problems, alphas, None, "fro")
    lp2 = results[2.0]
    np.testing.assert_array_equal(np.asarray(lp2.feasible), np.asarray(fro.feasible))
    np.testing.assert_array_equal(np.asarray(lp2.support), np.asarray(fro.support))
    for name in ("solution", "objective", "multipliers"):
        want = np.asarray(getattr(fro, name))
        np.testing.assert_allclose(np.asarray(getattr(lp2, name)), want, atol=1e-9 * np.nanmax(np.abs(want)))


def duplicate_token(problem):
    """``problem`` with token 1 of input 0 a copy of token 0, and a selection (alpha_0 = 0) that needs
    token 0 to beat its own copy: no parameter separates it."""
    X = np.array(problem.X)
    X[0, 1] = X[0, 0]
    return problem.replace(X=jnp.asarray(X)), np.zeros(len(X), int)


@pytest.mark.parametrize("p", [1.5, 3.0])
def test_infeasible_selection(p):
    for problem in (cross_batch(4, count=1)[0][0], prompt_batch(4, count=1)[0][0]):
        problem, alpha = duplicate_token(problem)
        res = mm.attention_svm(problem, alpha, norm=p)
        C, m = rows(problem, alpha)
        assert reference(C, m, p)[0] == "infeasible"
        assert not bool(res.feasible)
        assert np.all(np.isnan(np.asarray(res.solution))) and np.isnan(float(res.objective))
        assert not np.any(np.asarray(res.support))
        y = np.asarray(res.multipliers)[kept(alpha, problem.X.shape[1])]  # a Farkas certificate
        Cf = C.reshape(len(C), -1)
        assert np.all(y >= 0) and y @ m == pytest.approx(1, abs=1e-12)
        assert np.linalg.norm(y @ Cf) <= 1e-8 * (y @ np.linalg.norm(Cf, axis=1))
        assert not bool(mm.is_locally_optimal(problem, alpha, norm=p))


def test_vmap_jit_and_single_solves_agree(cross):
    problems, alphas, _ = cross
    problems, alphas = list(problems), np.array(alphas)
    problems[2], alphas[2] = duplicate_token(problems[2])
    batch = batched(mm.attention_svm, problems, alphas, None, 1.75)
    assert not bool(batch.feasible[2]) and int(batch.feasible.sum()) >= 4
    jitted = jax.jit(lambda p, a: mm.attention_svm(p, a, norm=1.75))
    for k, (p, a) in enumerate(zip(problems, alphas)):
        for single in (mm.attention_svm(p, a, norm=1.75), jitted(p, jnp.asarray(a))):
            for got, want in zip(unstack(batch, k), single):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("p", [1.5, 3.0])
def test_float32(cross, p):
    problems, alphas, results = cross
    k = 0  # the optimal selection: feasible
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), problems[k])
    res = mm.attention_svm(p32, alphas[k], norm=p)
    want = unstack(results[p], k)
    assert res.solution.dtype == jnp.float32 and bool(res.feasible) and bool(want.feasible)
    assert float(res.kkt_residual) <= 1e-3
    np.testing.assert_allclose(float(res.objective), float(want.objective), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(res.solution), np.asarray(want.solution), atol=1e-3 * np.max(np.abs(want.solution)))


def test_bad_norms_raise():
    (problem,), (alpha,) = cross_batch(5, count=1)
    (prompt,), _ = prompt_batch(5, count=1)
    for norm in (1.0, 0.5, -2, float("nan"), float("inf"), "l1", "2", True, None, np.array(3.0)):
        with pytest.raises(ValueError, match="norm"):
            mm.attention_svm(problem, alpha, norm=norm)
        with pytest.raises(ValueError, match="norm"):
            mm.value_svm(problem, alpha, norm=norm)
    with pytest.raises(ValueError, match="norm"):
        mm.value_svm(problem, alpha, norm="nuc")
    with pytest.raises(ValueError, match="norm"):
        mm.attention_svm(prompt, np.zeros(3, int), norm="nuc")
    with pytest.raises(ValueError, match="p"):
        mm.solve_lp(np.ones((3, 2)), np.ones(3), 1.0)


def numpy_bregman(A, B, p):
    a, b = (np.ravel(X) / np.sum(np.abs(X) ** p) ** (1 / p) for X in (A, B))
    return np.sum(np.abs(a) ** p) / p + (p - 1) * np.sum(np.abs(b) ** p) / p - np.sum(np.sign(b) * np.abs(b) ** (p - 1) * a)


def test_bregman():
    rng = np.random.default_rng(6)
    A, B = rng.normal(size=(2, 4, 3))
    for p in (1.25, 1.75, 3.0, 4.0):
        assert float(mm.bregman(A, B, p)) == pytest.approx(numpy_bregman(A, B, p), rel=1e-12)
        assert float(mm.bregman(A, B, p)) > 1e-3 and float(mm.bregman(B, A, p)) > 1e-3
        assert float(mm.bregman(2.5 * A, 0.1 * B, p)) == pytest.approx(float(mm.bregman(A, B, p)), rel=1e-12)
        assert float(mm.bregman(A, 7 * A, p)) <= 1e-15  # one direction
        assert float(mm.bregman(A, A + 1e-4 * B, p)) > 0
        assert float(mm.bregman(A, -A, p)) == pytest.approx(2, rel=1e-12)  # 1/p + (p-1)/p + 1
    a, b = (x.ravel() / np.linalg.norm(x) for x in (A, B))
    assert float(mm.bregman(a, b, 2)) == pytest.approx(0.5 * np.sum((a - b) ** 2), rel=1e-12)
    divergences = jax.vmap(lambda x: mm.bregman(x, B, 3.0))(rng.normal(size=(16, 4, 3)))
    assert divergences.shape == (16,) and bool(jnp.all(divergences > 0))
    for call, name in [
        (lambda: mm.bregman(A, B, 1.0), "p"),
        (lambda: mm.bregman(A, B, 0.5), "p"),
        (lambda: mm.bregman(A, B, float("nan")), "p"),
        (lambda: mm.bregman(A, B[:, :2], 3.0), "shape"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()
