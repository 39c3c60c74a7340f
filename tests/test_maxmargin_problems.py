"""Max-margin attention problems: derivatives vs autodiff, an independent forward, helpers, jit, vmap,
accuracy under a saturated softmax, generators, bad input."""
import decimal
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt
from attnopt.problems.base import stack
from attnopt.problems.maxmargin import CrossAttention, PromptAttention
from attnopt.problems.registry import make

# All sizes differ (and m != d), so a transposed factor or a swapped axis fails.
N, T, D, M = 4, 5, 3, 2
LOSS_NAMES = ("logistic", "linear", "exponential", "squared")
CROSS_MODES = [("W", "W"), ("W", "vW"), ("KQ", "W"), ("KQ", "vW")]  # (param, trainable)


def data(seed, dtype=jnp.float64):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    X = jax.random.normal(k[0], (N, T, D), dtype)
    Y = jnp.where(jax.random.bernoulli(k[1], 0.5, (N,)), 1.0, -1.0).astype(dtype)
    return X, Y, jax.random.normal(k[2], (N, D), dtype), jax.random.normal(k[3], (D,), dtype), k[4]


def prompt(seed=0, loss="logistic", trainable="p", dtype=jnp.float64):
    X, Y, _, v, k = data(seed, dtype)
    W = jax.random.normal(jax.random.fold_in(k, 1), (D, D), dtype)
    problem = PromptAttention(X, Y, v, W, loss=loss, trainable=trainable)
    p = jax.random.normal(k, (D,), dtype)
    return problem, ((v + 0.3, p) if trainable == "vp" else p)


def cross(seed=0, loss="logistic", param="W", trainable="W", dtype=jnp.float64):
    X, Y, Z, v, k = data(seed, dtype)
    eps = 0.05 if param == "KQ" else 0.0
    problem = CrossAttention(X, Y, Z, v, loss=loss, param=param, trainable=trainable, eps=eps)
    k1, k2 = jax.random.split(k)
    key_query = (
        (jax.random.normal(k1, (D, D), dtype),)
        if param == "W"
        else (jax.random.normal(k1, (D, M), dtype), jax.random.normal(k2, (D, M), dtype))
    )
    params = ((v + 0.3,) if trainable == "vW" else ()) + key_query
    return problem, (params[0] if len(params) == 1 else params)


# --- an independent forward: plain jnp, one input at a time -----------------------------------

ELL = {
    "logistic": lambda u: jnp.log(1 + jnp.exp(-u)),
    "linear": lambda u: -u,
    "exponential": lambda u: jnp.exp(-u),
    "squared": lambda u: 0.5 * (1 - u) ** 2,
}


def plain_softmax(s):
    e = jnp.exp(s - jnp.max(s))
    return e / jnp.sum(e)


def plain_loss(X, Y, v, queries, loss):
    """mean_i ell(Y_i <X_i v, softmax(X_i q_i)>)."""
    margins = [Y[i] * (X[i] @ v) @ plain_softmax(X[i] @ queries[i]) for i in range(len(Y))]
    return jnp.mean(ELL[loss](jnp.stack(margins)))


def prompt_reference(problem, params, loss, trainable):
    v, p = params if trainable == "vp" else (problem.v, params)
    return plain_loss(problem.X, problem.Y, v, [problem.W @ p] * N, loss)


def cross_reference(problem, params, loss, param, trainable):
    params = params if isinstance(params, tuple) else (params,)
    v, rest = (params[0], params[1:]) if trainable == "vW" else (problem.v, params)
    W = rest[0] if param == "W" else rest[0] @ rest[1].T
    ridge = 0.0 if param == "W" else problem.eps * sum(jnp.sum(f**2) for f in rest)
    return plain_loss(problem.X, problem.Y, v, [W @ z for z in problem.Z], loss) + ridge


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_loss_matches_plain_forward(loss):
    for trainable in ("p", "vp"):
        problem, params = prompt(1, loss, trainable)
        np.testing.assert_allclose(problem.loss(params), prompt_reference(problem, params, loss, trainable), rtol=1e-12)
    for param, trainable in CROSS_MODES:
        problem, params = cross(2, loss, param, trainable)
        expected = cross_reference(problem, params, loss, param, trainable)
        np.testing.assert_allclose(problem.loss(params), expected, rtol=1e-12)


# --- derivatives vs autodiff: each loss with each problem, each mode at least once ------------

DERIVATIVE_CASES = [
    ("prompt", "logistic", None, "p"),
    ("prompt", "linear", None, "vp"),
    ("prompt", "exponential", None, "p"),
    ("prompt", "squared", None, "vp"),
    ("cross", "logistic", "KQ", "vW"),
    ("cross", "linear", "KQ", "W"),
    ("cross", "exponential", "W", "vW"),
    ("cross", "squared", "W", "W"),
    ("cross", "exponential", "KQ", "W"),
    ("cross", "squared", "KQ", "vW"),
]


def build(kind, loss, param, trainable, dtype=jnp.float64, seed=3):
    if kind == "prompt":
        return prompt(seed, loss, trainable, dtype)
    return cross(seed, loss, param, trainable, dtype)


@pytest.mark.parametrize("kind,loss,param,trainable", DERIVATIVE_CASES)
def test_derivatives_match_autodiff_float64(kind, loss, param, trainable):
    problem, params = build(kind, loss, param, trainable)
    assert set(problem.hand_derived()) == {"grad", "hvp", "hessian"}
    report = attnopt.check_derivatives(problem, params)
    assert report.rtol == 1e-10 and set(report.errors) == {"grad", "hvp", "hessian"}
    assert report.ok, str(report)


@pytest.mark.parametrize("kind,param,trainable", [("prompt", None, "vp"), ("cross", "KQ", "vW")])
def test_derivatives_match_autodiff_float32(kind, param, trainable):
    problem, params = build(kind, "logistic", param, trainable, jnp.float32)
    assert problem.dtype == jnp.float32
    assert problem.loss(params).dtype == jnp.float32 and problem.hessian(params).dtype == jnp.float32
    report = attnopt.check_derivatives(problem, params)
    assert report.dtype == "float32" and report.rtol > 1e-8
    assert report.ok, str(report)


def test_hessian_layout_and_cross_kronecker_structure():
    """Blocks in ravel_pytree order; the W block is sum_i (X_i^T B_i X_i) ⊗ (z_i z_i^T) in row-major vec W:
    each input alone gives a Kronecker product with right factor z_i z_i^T."""
    problem, (v, W) = cross(4, "logistic", "W", "vW")
    H = problem.hessian((v, W))
    assert H.shape == (D + D * D,) * 2
    np.testing.assert_allclose(H, H.T, atol=1e-14)
    fixed = problem.rebuild(trainable="W", v=v)
    np.testing.assert_allclose(H[D:, D:], fixed.hessian(W), rtol=1e-12, atol=1e-15)
    single = problem.rebuild(X=problem.X[:1], Y=problem.Y[:1], Z=problem.Z[:1], trainable="W", v=v)
    H1 = np.asarray(single.hessian(W)).reshape(D, D, D, D)  # [(a, b), (c, e)]
    z = np.asarray(problem.Z[0])
    j = np.argmax(np.abs(z))
    left = H1[:, j, :, j] / (z[j] * z[j])
    np.testing.assert_allclose(H1, np.einsum("ac,b,e->abce", left, z, z), rtol=1e-10, atol=1e-14)


# --- helpers --------------------------------------------------------------------------------


def test_scores_attention_token_scores():
    problem, (v, p) = prompt(5, trainable="vp")
    s = jnp.stack([problem.X[i] @ problem.W @ p for i in range(N)])
    np.testing.assert_allclose(problem.scores((v, p)), s, rtol=1e-12)
    a = problem.attention((v, p))
    np.testing.assert_allclose(a, jnp.stack([plain_softmax(r) for r in s]), rtol=1e-12)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(problem.token_scores((v, p)), problem.Y[:, None] * (problem.X @ v), rtol=1e-14)
    assert problem.params_shape == ((D,), (D,))
    with pytest.raises(ValueError, match="^params is required"):
        problem.token_scores()

    problem, (K, Q) = cross(6, param="KQ")
    np.testing.assert_allclose(problem.key_query((K, Q)), K @ Q.T, rtol=1e-14)
    s = jnp.stack([problem.X[i] @ K @ Q.T @ problem.Z[i] for i in range(N)])
    np.testing.assert_allclose(problem.scores((K, Q)), s, rtol=1e-12)
    np.testing.assert_allclose(problem.token_scores(), problem.Y[:, None] * (problem.X @ problem.v), rtol=1e-14)
    assert problem.params_shape == ((D, None), (D, None))
    assert cross(6)[0].params_shape == (D, D)


def test_rebuild_round_trip_keeps_statics():
    problem, params = cross(7, "squared", "KQ", "vW")
    again = problem.rebuild()
    assert (again.loss_name, again.param, again.trainable) == ("squared", "KQ", "vW")
    np.testing.assert_allclose(again.loss(params), problem.loss(params), rtol=0)


# --- jit and vmap ---------------------------------------------------------------------------


def test_built_and_differentiated_inside_jit():
    problem, params = cross(8, "logistic", "KQ", "vW")

    @jax.jit
    def run(X, Y, Z, params):
        p = CrossAttention(X, Y, Z, loss="logistic", param="KQ", trainable="vW", eps=0.05)
        return p.loss(params), p.grad(params), p.hessian(params)

    inside = run(problem.X, problem.Y, problem.Z, params)
    outside = (problem.loss(params), problem.grad(params), problem.hessian(params))
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(outside)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind,param,trainable", [("prompt", None, "vp"), ("cross", "KQ", "W")])
def test_vmap_over_stacked_instances(kind, param, trainable):
    built = [build(kind, "logistic", param, trainable, seed=s) for s in (10, 11, 12)]
    problems, params = zip(*built)
    batch, xs = stack(problems), jax.tree.map(lambda *l: jnp.stack(l), *params)
    directions = jax.tree.map(lambda l: jnp.flip(l, axis=-1), xs)
    out = jax.vmap(lambda p, x, u: (p.loss(x), p.grad(x), p.hvp(x, u), p.hessian(x)))(batch, xs, directions)
    for i, (problem, x) in enumerate(built):
        u = jax.tree.map(lambda l: l[i], directions)
        single = (problem.loss(x), problem.grad(x), problem.hvp(x, u), problem.hessian(x))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(single)):
            np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-15)


# --- accuracy where the softmax saturates -----------------------------------------------------


def decimal_prompt_grad(X, Y, v, W, p, digits=60):
    """grad_p of the mean logistic loss, in `digits`-digit decimal arithmetic: the reference."""
    decimal.getcontext().prec = digits
    dec = lambda a: [[decimal.Decimal(float(x)) for x in row] for row in np.asarray(a).reshape(len(a), -1)]
    W, p, v = dec(W), [r[0] for r in dec(p)], [r[0] for r in dec(v)]
    grad = [decimal.Decimal(0)] * len(p)
    for Xi, yi in zip(np.asarray(X), np.asarray(Y)):
        Xi, yi = dec(Xi), decimal.Decimal(float(yi))
        keys = [[sum(x[a] * W[a][b] for a in range(len(x))) for b in range(len(p))] for x in Xi]  # x^T W
        s = [sum(k[b] * p[b] for b in range(len(p))) for k in keys]
        e = [(si - max(s)).exp() for si in s]
        a = [ei / sum(e) for ei in e]
        g = [sum(x[b] * v[b] for b in range(len(v))) for x in Xi]
        f = sum(ai * gi for ai, gi in zip(a, g))
        c = yi * (-1 / (1 + (yi * f).exp())) / len(Y)  # Y ell'(Y f) / n, ell' = -1 / (1 + e^u)
        for t, k in enumerate(keys):
            h = a[t] * (g[t] - f)
            grad = [gb + c * h * kb for gb, kb in zip(grad, k)]
    return np.array([float(x) for x in grad])


def test_gradient_stays_accurate_when_softmax_saturates():
    """Top score ahead by 34: the other probabilities (~1e-15) are a few ulps of 1, so ḡ_α - f formed
    as a plain difference cancels (as does autodiff of the loss); the gradient must still match a
    60-digit reference to near machine precision."""
    X1 = jnp.array([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.4, 1.0]])
    X = jnp.stack([X1, X1[jnp.array([2, 0, 1])]])  # same gap, the top token at another position
    Y = jnp.array([1.0, -1.0])
    v = jnp.array([1.0, 0.6, 0.3])
    problem = PromptAttention(X, Y, v)
    p = jnp.array([40.0, 3.0, -1.0])
    top2 = np.sort(np.asarray(problem.scores(p)), axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 30)
    expected = decimal_prompt_grad(X, Y, v, problem.W, p)
    rel_error = lambda g: np.max(np.abs(np.asarray(g) - expected)) / np.max(np.abs(expected))
    assert rel_error(problem.grad(p)) < 1e-13

    # The naive h = a (ḡ - f) is wrong by percents here, so the check above can fail.
    a, g = problem.attention(p), X @ v
    f = jnp.sum(a * g, axis=1)
    c = Y * -jax.nn.sigmoid(-Y * f) / len(Y)
    naive = problem.W.T @ jnp.einsum("itd,it->d", X, c[:, None] * a * (g - f[:, None]))
    assert rel_error(naive) > 1e-3


# --- generators -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options",
    [("prompt_attention", {"trainable": "vp"}), ("cross_attention", {"param": "KQ", "trainable": "vW"})],
)
def test_generators(name, options):
    inst = make(name, jax.random.PRNGKey(0), **options)
    problem = inst.problem
    assert inst.solution is None and problem.dtype == jnp.float64
    np.testing.assert_allclose(jnp.linalg.norm(problem.X, axis=-1), 1.0, rtol=1e-12)
    assert set(np.unique(np.asarray(problem.Y))) <= {-1.0, 1.0}
    assert np.isfinite(problem.loss(inst.x0))
    shapes = [l.shape for l in jax.tree.leaves(inst.x0)]
    d = problem.X.shape[-1]
    assert shapes == ([(d,)] * 2 if name == "prompt_attention" else [(d,), (d, d), (d, d)])
    low = make(name, jax.random.PRNGKey(0), dtype="float32", **options)
    assert low.problem.dtype == jnp.float32 and low.problem.loss(low.x0).dtype == jnp.float32


# --- bad input --------------------------------------------------------------------------------


def _bad_cases():
    X, Y, Z, v, _ = data(0)
    nan = lambda a, idx: a.at[idx].set(jnp.nan)
    P = lambda **kw: PromptAttention(**{"X": X, "Y": Y, "v": v} | kw)
    C = lambda **kw: CrossAttention(**{"X": X, "Y": Y, "Z": Z, "v": v} | kw)
    return {
        "labels not +-1": (lambda: P(Y=Y.at[0].set(0.5)), "Y"),
        "Y length": (lambda: C(Y=jnp.ones(N + 1)), "Y"),
        "X not 3-d": (lambda: P(X=X[0]), "X"),
        "X non-finite": (lambda: C(X=nan(X, (1, 2, 0))), "X"),
        "Y non-finite": (lambda: P(Y=nan(Y, 0)), "Y"),
        "v shape": (lambda: P(v=jnp.ones(D + 1)), "v"),
        "v non-finite": (lambda: C(v=v.at[0].set(jnp.inf)), "v"),
        "v missing": (lambda: P(v=None), "v"),
        "W shape": (lambda: P(W=jnp.eye(D + 1)), "W"),
        "W non-finite": (lambda: P(W=nan(jnp.eye(D), (0, 0))), "W"),
        "Z shape": (lambda: C(Z=Z[:-1]), "Z"),
        "Z non-finite": (lambda: C(Z=nan(Z, (0, 1))), "Z"),
        "eps negative": (lambda: C(param="KQ", eps=-1.0), "eps"),
        "eps non-finite": (lambda: C(param="KQ", eps=jnp.nan), "eps"),
        "eps without KQ": (lambda: C(eps=0.1), "eps"),
        "unknown loss": (lambda: P(loss="hinge"), "loss"),
        "unknown trainable": (lambda: C(trainable="vp"), "trainable"),
        "unknown param": (lambda: C(param="QK"), "param"),
        "params shape": (lambda: PromptAttention(X, Y, v).loss(jnp.ones(D + 1)), "params"),
        "params count": (lambda: C(trainable="vW").grad(jnp.eye(D)), "params"),
        "K, Q mismatch": (lambda: C(param="KQ").loss((jnp.ones((D, 2)), jnp.ones((D, 3)))), "params"),
        "direction shape": (lambda: C().hvp(jnp.eye(D), jnp.ones((D, D + 1))), "v"),
        "rebuild NaN leaf": (lambda: C().rebuild(Z=nan(Z, (2, 2))), "Z"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error_naming_the_argument(case):
    fn, name = BAD[case]
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        fn()
