"""attnopt.maxmargin SVMs against cvxpy + Clarabel; infeasibility, vmap, jit, float32, bad input.

Each batch of random instances is solved in one vmapped call and each instance
again by Clarabel (tolerances 1e-10): objectives agree to 1e-8 relative, our
solutions violate no constraint by more than 1e-9 and have the same support
(active constraints); KKT residuals are at most 1e-10.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnopt import maxmargin as mm
from attnopt.problems import stack
from attnopt.problems.maxmargin import CrossAttention, PromptAttention

cp = pytest.importorskip("cvxpy")

CLARABEL = dict(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)


def sphere(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(C, m, norm="fro"):
    """Clarabel on ``min ||w|| s.t. <C_k, w> >= m_k`` (C (K, ...)): (status, w, objective)."""
    C, m = np.asarray(C), np.asarray(m)
    w = cp.Variable(C.shape[1:])
    flat = cp.vec(w, order="C") if w.ndim == 2 else w
    objective = {"fro": cp.norm(flat, 2), "nuc": cp.normNuc(w) if w.ndim == 2 else None}[norm]
    problem = cp.Problem(cp.Minimize(objective), [C.reshape(len(C), -1) @ flat >= m])
    with warnings.catch_warnings():  # "optimal_inaccurate" at these tight tolerances is expected
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        problem.solve(**CLARABEL)
    return problem.status, w.value, problem.value


def attention_rows(problem, alpha, margins=None):
    """(C (K, ...), m (K,)) of the attention SVM written out with numpy loops (t != alpha_i only)."""
    X, alpha = np.asarray(problem.X), np.asarray(alpha)
    margins = np.ones(len(X)) if margins is None else np.asarray(margins)
    C, m = [], []
    for i in range(len(X)):
        for t in range(X.shape[1]):
            if t != alpha[i]:
                diff = X[i, alpha[i]] - X[i, t]
                C.append(np.asarray(problem.W).T @ diff if isinstance(problem, PromptAttention) else np.outer(diff, problem.Z[i]))
                m.append(margins[i])
    return np.array(C), np.array(m)


def check_against_reference(res, C, m, norm="fro", support=None):
    """One of our results vs Clarabel on rows (C, m); ``support`` our mask over those rows. Returns feasible."""
    status, w_ref, value = reference(C, m, norm)
    assert status in ("optimal", "optimal_inaccurate", "infeasible"), status
    assert bool(res.feasible) == (status != "infeasible")
    if status == "infeasible":
        return False
    w = np.asarray(res.solution)
    assert abs(float(res.objective) - value) <= 1e-8 * value
    Cf = C.reshape(len(C), -1)
    scale = np.abs(m) + np.linalg.norm(Cf, axis=1) * np.linalg.norm(w_ref)
    assert np.max(m - Cf @ w.ravel()) <= 1e-9
    ref_support = Cf @ w_ref.ravel() - m <= 1e-6 * scale
    np.testing.assert_array_equal(np.asarray(res.support if support is None else support), ref_support)
    assert float(res.kkt_residual) <= 1e-10
    return True


def prompt_batch(seed, count=8, n=3, T=4, d=5):
    rng = np.random.default_rng(seed)
    problems = [
        PromptAttention(sphere(rng, n, T, d), rng.choice([-1.0, 1.0], n), sphere(rng, d), W=rng.normal(size=(d, d)))
        for _ in range(count)
    ]
    return problems, rng.integers(0, T, (count, n))


def cross_batch(seed, count=8, n=4, T=5, d=5):
    rng = np.random.default_rng(seed)
    problems = [
        CrossAttention(sphere(rng, n, T, d), rng.choice([-1.0, 1.0], n), sphere(rng, n, d), sphere(rng, d))
        for _ in range(count)
    ]
    return problems, rng.integers(0, T, (count, n))


def batched(fn, problems, alphas, *args):
    return jax.vmap(lambda p, a: fn(p, a, *args))(stack(problems), jnp.asarray(alphas))


def unstack(tree, k):
    return jax.tree.map(lambda x: x[k], tree)


def test_qp_matches_clarabel():
    rng = np.random.default_rng(0)
    C = rng.normal(size=(12, 16, 6))
    m = rng.integers(0, 2, (12, 16)).astype(float)
    C[:6, :, 0] = np.abs(C[:6, :, 0]) + 0.2  # half surely feasible
    results = jax.vmap(mm.solve_qp)(C, m)
    feasible = [check_against_reference(unstack(results, k), C[k], m[k]) for k in range(len(C))]
    assert 6 <= sum(feasible) < len(C)


@pytest.mark.parametrize("relaxed", [False, True])
def test_att_svm_matches_clarabel(relaxed):
    problems, alphas = prompt_batch(1)
    margins = np.array([1.0, 0.0, 1.0]) if relaxed else None
    results = batched(mm.attention_svm, problems, alphas, margins)
    feasible = 0
    for k, (problem, alpha) in enumerate(zip(problems, alphas)):
        res = unstack(results, k)
        assert res.solution.shape == (5,) and res.support.shape == res.multipliers.shape == (3, 4)
        assert not np.any(np.asarray(res.support)[np.arange(3), alpha])
        C, m = attention_rows(problem, alpha, margins)
        keep = np.arange(4)[None, :] != alpha[:, None]
        feasible += check_against_reference(res, C, m, support=np.asarray(res.support)[keep])
    assert feasible >= 4


@pytest.mark.parametrize("norm", ["fro", "nuc"])
def test_w_svm_matches_clarabel(norm):
    problems, alphas = cross_batch(2)
    alphas[:4] = [mm.optimal_tokens(p) for p in problems[:4]]
    results = batched(mm.attention_svm, problems, alphas, None, norm)
    feasible = 0
    for k, (problem, alpha) in enumerate(zip(problems, alphas)):
        res = unstack(results, k)
        C, m = attention_rows(problem, alpha)
        keep = np.arange(5)[None, :] != alpha[:, None]
        feasible += check_against_reference(res, C, m, norm, np.asarray(res.support)[keep])
        if res.feasible and norm == "nuc":  # the dual certificate: ||sum_k lambda_k A_k||_2 = 1 at the optimum
            M = np.tensordot(np.asarray(res.multipliers)[keep], C, 1)
            assert np.linalg.norm(M, 2) == pytest.approx(1, abs=1e-10)
    assert feasible >= 4


def test_each_norm_minimised_by_its_own_svm():
    problems, alphas = cross_batch(2)
    fro, nuc = (batched(mm.attention_svm, problems, alphas, None, norm) for norm in ("fro", "nuc"))
    np.testing.assert_array_equal(np.asarray(fro.feasible), np.asarray(nuc.feasible))
    for k in np.flatnonzero(np.asarray(fro.feasible)):
        assert float(nuc.objective[k]) <= np.linalg.norm(np.asarray(fro.solution[k]), "nuc") * (1 + 1e-12)
        assert float(fro.objective[k]) <= np.linalg.norm(np.asarray(nuc.solution[k])) * (1 + 1e-12)


def test_value_svm_matches_clarabel():
    problems, alphas = cross_batch(4)
    results = batched(mm.value_svm, problems, alphas)
    feasible = 0
    for k, (p, alpha) in enumerate(zip(problems, alphas)):
        C = np.asarray(p.Y)[:, None] * np.asarray(p.X)[np.arange(4), alpha]
        feasible += check_against_reference(unstack(results, k), C, np.ones(4))
    assert feasible >= 4


def hull_problems(kind):
    """A prompt and a cross problem of the batches' shapes with a selection no parameter separates:
    input 1 repeats input 0 with another token selected, or input 0's selected token is the
    mean of its other tokens."""
    (prompt,), _ = prompt_batch(5, count=1)
    (cross,), _ = cross_batch(5, count=1)
    out = []
    for problem in (prompt, cross):
        X, alpha = np.array(problem.X), np.zeros(len(problem.X), int)
        if kind == "duplicate":
            X[1], alpha[1] = X[0], 2
            problem = problem.replace(Z=problem.Z.at[1].set(problem.Z[0])) if isinstance(problem, CrossAttention) else problem
        else:
            X[0, 1], alpha[0] = X[0, [0, 2, 3]].mean(axis=0), 1
            X[0, 4:] = X[0, 0]  # (cross problems have T = 5)
        out.append((problem.replace(X=jnp.asarray(X)), alpha))
    return out


def assert_infeasible_with_certificate(res, C, m):
    assert not bool(res.feasible)
    assert np.all(np.isnan(np.asarray(res.solution))) and np.isnan(float(res.objective))
    assert not np.any(np.asarray(res.support))
    y = np.asarray(res.multipliers).ravel()
    assert np.all(y >= -1e-12) and y @ m == pytest.approx(1, abs=1e-12)
    Cf = C.reshape(len(C), -1)
    assert np.linalg.norm(y @ Cf) <= 1e-8 * (y @ np.linalg.norm(Cf, axis=1))


@pytest.mark.parametrize("kind", ["duplicate", "hull"])
def test_infeasible_selections(kind):
    (prompt, alpha_p), (cross, alpha_c) = hull_problems(kind)
    for problem, alpha, norm in [(prompt, alpha_p, "fro"), (cross, alpha_c, "fro"), (cross, alpha_c, "nuc")]:
        res = mm.attention_svm(problem, alpha, norm=norm)
        C, m = attention_rows(problem, alpha)
        assert reference(C, m, norm)[0] == "infeasible"
        keep = np.arange(problem.X.shape[1])[None, :] != alpha[:, None]
        assert_infeasible_with_certificate(res._replace(multipliers=np.asarray(res.multipliers)[keep]), C, m)
        assert not bool(mm.is_locally_optimal(problem, alpha, norm=norm))


def test_value_svm_infeasible():
    (p,), _ = cross_batch(6, count=1)
    X, alpha = np.array(p.X), np.array([1, 0, 0, 0])
    X[2, 0] = X[0, 1]  # one selected token under opposite labels
    p = p.replace(X=jnp.asarray(X), Y=jnp.asarray([1.0, 1.0, -1.0, 1.0]))
    res = mm.value_svm(p, alpha)
    assert_infeasible_with_certificate(res, np.asarray(p.Y)[:, None] * X[np.arange(4), alpha], np.ones(4))


@pytest.mark.parametrize("norm", ["fro", "nuc"])
def test_vmap_equals_single_solves(norm):
    problems, alphas = cross_batch(7)
    (_, _), (problems[2], alphas[2]) = hull_problems("duplicate")
    batch = batched(mm.attention_svm, problems, alphas, None, norm)
    assert not bool(batch.feasible[2]) and int(batch.feasible.sum()) >= 2
    for k, (p, a) in enumerate(zip(problems, alphas)):
        single = mm.attention_svm(p, a, norm=norm)
        for got, want in zip(unstack(batch, k), single):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)


def test_jit_and_float32():
    (p,), _ = cross_batch(8, count=1)
    a = jnp.asarray(mm.optimal_tokens(p))
    eager = mm.attention_svm(p, a)
    jitted = jax.jit(mm.attention_svm)(p, a)
    np.testing.assert_allclose(np.asarray(jitted.solution), np.asarray(eager.solution), rtol=1e-12, atol=1e-12)
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    for norm in ("fro", "nuc"):
        want = eager if norm == "fro" else mm.attention_svm(p, a, norm=norm)
        single = mm.attention_svm(p32, a, norm=norm)
        assert single.solution.dtype == jnp.float32 and bool(single.feasible)
        assert float(single.kkt_residual) <= 1e-4
        np.testing.assert_allclose(float(single.objective), float(want.objective), rtol=1e-4)
        np.testing.assert_array_equal(np.asarray(single.support), np.asarray(want.support))


def test_masked_rows_are_dropped():
    rng = np.random.default_rng(9)
    C, m = rng.normal(size=(16, 6)), np.ones(16)
    C[7] = 0  # 0 >= 1: infeasible, but masked out
    res = mm.solve_qp(C, m, np.arange(16) < 4)
    assert check_against_reference(res, C[:4], m[:4], support=np.asarray(res.support)[:4])
    assert not np.any(np.asarray(res.support)[4:]) and np.all(np.asarray(res.multipliers)[4:] == 0)


def test_bad_inputs_raise():
    problems, _ = cross_batch(10, count=1)
    p = problems[0]
    prompt = prompt_batch(10, count=1)[0][0]
    cases = [
        (lambda: mm.attention_svm(p, np.array([0, 1, 2, 5])), "alpha"),
        (lambda: mm.attention_svm(p, np.array([0, 1, -1, 0])), "alpha"),
        (lambda: mm.attention_svm(p, np.array([0, 1, 2])), "alpha"),
        (lambda: mm.attention_svm(p, np.zeros(4)), "alpha"),
        (lambda: mm.value_svm(p, np.zeros((4, 1), int)), "alpha"),
        (lambda: mm.attention_svm(p, np.zeros(4, int), margins=np.ones(3)), "margins"),
        (lambda: mm.attention_svm(p, np.zeros(4, int), margins=-np.ones(4)), "margins"),
        (lambda: mm.attention_svm(p, np.zeros(4, int), norm="l1"), "norm"),
        (lambda: mm.attention_svm(prompt, np.zeros(3, int), norm="nuc"), "norm"),
        (lambda: mm.attention_svm("problem", np.zeros(3, int)), "problem"),
        (lambda: mm.solve_qp(np.ones(3), np.ones(3)), "C"),
        (lambda: mm.solve_qp(np.ones((3, 2)), np.ones(2)), "m"),
        (lambda: mm.solve_qp(np.ones((3, 2)), np.ones(3), np.ones(3)), "mask"),
        (lambda: mm.solve_qp(np.full((3, 2), np.nan), np.ones(3)), "C"),
        (lambda: mm.solve_nuclear(np.ones((3, 2)), np.ones(3)), "A"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
