"""Token-selection analysis: optimal, selected and locally optimal tokens, alignment, numerical rank."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnopt import maxmargin as mm
from attnopt.problems.maxmargin import CrossAttention, PromptAttention


def sphere(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def single_input(last_token):
    """One input, T = d = 3, v = e3, W = diag(1, 1, 0): token scores gamma = (1, 0.9, gamma_2)."""
    X = np.array([[-0.1, 1.0, 1.0], [1.0, 0.0, 0.9], last_token])
    return PromptAttention(X[None], np.ones(1), v=np.eye(3)[2], W=np.diag([1.0, 1.0, 0.0]))


@pytest.mark.parametrize("last_token, locally_optimal", [
    ([0.0, 0.0, 0.9], [True, False, False]),  # token 1 ties its support token 2 (gamma 0.9 both)
    ([0.0, 0.0, 0.0], [True, True, False]),   # token 1 beats its support token 2 (0.9 > 0)
])
def test_single_input_local_optimality(last_token, locally_optimal):
    problem = single_input(last_token)
    assert int(mm.optimal_tokens(problem)[0]) == 0
    got = [bool(mm.is_locally_optimal(problem, np.array([a]))) for a in range(3)]
    assert got == locally_optimal
    # By hand (keys drop the third coordinate): selecting token 0 the active constraint is
    # (-0.1, 1) p >= 1, p = (-0.1, 1) / 1.01; selecting token 1 it is (1, 0) p >= 1, p = (1, 0).
    for a, p_hand in [(0, np.array([-0.1, 1.0, 0.0]) / 1.01), (1, np.array([1.0, 0.0, 0.0]))]:
        res = mm.attention_svm(problem, np.array([a]))
        np.testing.assert_allclose(np.asarray(res.solution), p_hand, atol=1e-14)
        np.testing.assert_array_equal(np.asarray(res.support), [[False, False, True]])


def random_prompt(seed, n=3, T=4, d=5):
    rng = np.random.default_rng(seed)
    return PromptAttention(sphere(rng, n, T, d), rng.choice([-1.0, 1.0], n), sphere(rng, d), W=rng.normal(size=(d, d)))


def test_local_optimality_matches_its_definition():
    """On random selections, is_locally_optimal equals the definition evaluated by hand from the
    SVM's solution: slacks of each input's tokens, the support, and the token scores."""
    rng = np.random.default_rng(11)
    seen = set()
    for seed in range(12):
        problem = random_prompt(seed)
        gamma = np.asarray(problem.Y)[:, None] * (np.asarray(problem.X) @ np.asarray(problem.v))
        for alpha in [np.asarray(mm.optimal_tokens(problem)), rng.integers(0, 4, 3)]:
            res = mm.attention_svm(problem, alpha)
            got = bool(mm.is_locally_optimal(problem, alpha))
            if not res.feasible:
                assert not got
                continue
            keys = np.asarray(problem.X) @ np.asarray(problem.W)
            p = np.asarray(res.solution)
            slack = (keys[np.arange(3), alpha][:, None, :] - keys) @ p - 1
            support = np.abs(slack) <= 1e-8 * (1 + np.linalg.norm(keys, axis=-1) * np.linalg.norm(p))
            support[np.arange(3), alpha] = False
            want = bool(np.all(gamma[np.arange(3), alpha][:, None] > gamma, where=support))
            assert got == want
            if np.array_equal(alpha, np.argmax(gamma, axis=1)):
                assert got  # the global selection is locally optimal
            seen.add(want)
    assert seen == {True, False}


def test_selected_tokens_follow_a_scaled_svm_solution():
    """At params c p_mm(alpha), every score gap s_{i,alpha_i} - s_it is c (k_alpha - k_t)^T p_mm >= c > 0."""
    rng = np.random.default_rng(12)
    cross = CrossAttention(sphere(rng, 4, 5, 6), rng.choice([-1.0, 1.0], 4), sphere(rng, 4, 6), sphere(rng, 6))
    for problem in (random_prompt(13), cross):
        alpha = np.asarray(mm.optimal_tokens(problem))
        res = mm.attention_svm(problem, alpha)
        assert bool(res.feasible)
        np.testing.assert_array_equal(np.asarray(mm.selected_tokens(problem, 5 * res.solution)), alpha)
        probs = np.asarray(problem.attention(50 * res.solution))
        assert np.all(probs[np.arange(len(alpha)), alpha] > 0.99)


def test_optimal_tokens_and_readout():
    problem = random_prompt(14)
    rng = np.random.default_rng(14)
    v = rng.normal(size=5)
    want = np.argmax(np.asarray(problem.Y)[:, None] * (np.asarray(problem.X) @ v), axis=1)
    np.testing.assert_array_equal(np.asarray(mm.optimal_tokens(problem, v)), want)
    trained = PromptAttention(problem.X, problem.Y, W=problem.W, trainable="vp")
    np.testing.assert_array_equal(np.asarray(mm.optimal_tokens(trained, v)), want)
    with pytest.raises(ValueError, match="v is required"):
        mm.optimal_tokens(trained)
    with pytest.raises(ValueError, match="v"):
        mm.optimal_tokens(problem, np.ones(4))


def test_alignment():
    rng = np.random.default_rng(15)
    a = (rng.normal(size=(3, 3)), rng.normal(size=3))
    b = (rng.normal(size=(3, 3)), rng.normal(size=3))
    flat = lambda t: np.concatenate([x.ravel() for x in t])
    want = flat(a) @ flat(b) / (np.linalg.norm(flat(a)) * np.linalg.norm(flat(b)))
    assert float(mm.alignment(a, b)) == pytest.approx(want, rel=1e-13)
    assert float(mm.alignment(a[0], 3 * a[0])) == pytest.approx(1, rel=1e-14)
    assert float(mm.alignment(a[0], -a[0])) == pytest.approx(-1, rel=1e-14)
    assert np.isnan(float(mm.alignment(a[1], np.zeros(3))))
    assert jax.jit(mm.alignment)(a, b) == pytest.approx(want, rel=1e-13)
    with pytest.raises(ValueError, match="a and b"):
        mm.alignment(a[0], a[1])


def test_numerical_rank():
    rng = np.random.default_rng(16)
    U, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    V, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s = np.array([3.0, 1.0, 0.2, 1e-12, 0.0])
    W = U[:, :5] @ np.diag(s) @ V.T
    assert int(mm.numerical_rank(W)) == 3
    assert int(mm.numerical_rank(W, rtol=0.1)) == 2
    assert int(mm.numerical_rank(W, rtol=1e-14)) == 4
    np.testing.assert_array_equal(np.asarray(mm.numerical_rank(np.stack([W, W[:, ::-1] * 0]))), [3, 0])
    assert int(mm.numerical_rank(np.full((2, 2), np.nan))) == -1
    for bad, name in [(np.ones(3), "W"), (W, "rtol")]:
        with pytest.raises(ValueError, match=name):
            mm.numerical_rank(bad, rtol=2.0 if name == "rtol" else None)
