"""KroneckerOperator against the dense ``jnp.kron`` matrix (mv, rmv, transpose, sandwich, jit, vmap),
and DenseOperator, which shares its interface, against plain matrix products."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import block_diag

from attnopt.operators import DenseOperator, DiagPlusLowRank, KroneckerOperator

# Rectangular, all different, so a transposed or swapped factor fails on shapes or values.
M1, D1, M2, D2, K = 5, 3, 4, 2, 3


def operator(seed=0, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return KroneckerOperator(jax.random.normal(k1, (M1, D1), dtype), jax.random.normal(k2, (M2, D2), dtype))


def blocks(seed=1, dtype=jnp.float64, k=K):
    """A stack of M1 symmetric (M2, M2) blocks, diagonal plus rank k, and its dense block-diagonal matrix."""
    kd, ku, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    M = jax.random.normal(km, (M1, k, k), dtype)
    B = DiagPlusLowRank(
        jax.random.normal(kd, (M1, M2), dtype), jax.random.normal(ku, (M1, M2, k), dtype), M + M.transpose(0, 2, 1)
    )
    dense = block_diag(*[DiagPlusLowRank(*(leaf[j] for leaf in B)).as_matrix() for j in range(M1)])
    return B, dense


def test_as_matrix_is_row_major_kron():
    op = operator()
    X = jax.random.normal(jax.random.PRNGKey(2), (D1, D2))
    assert op.shape == (M1 * M2, D1 * D2) and op.in_shape == (D1, D2) and op.out_shape == (M1, M2)
    np.testing.assert_allclose(op.as_matrix(), np.kron(op.A1, op.A2), rtol=1e-15)
    # the row-major convention (docs/math.md, Matrix (tensor-trick) regression), checked with NumPy on its own
    np.testing.assert_allclose(np.kron(op.A1, op.A2) @ np.ravel(X), np.ravel(op.A1 @ X @ op.A2.T), rtol=1e-12)


@pytest.mark.parametrize("jit", [False, True])
def test_mv_rmv_match_dense(jit):
    op = operator()
    dense = np.asarray(op.as_matrix())
    X = jax.random.normal(jax.random.PRNGKey(2), (D1, D2))
    Y = jax.random.normal(jax.random.PRNGKey(3), (M1, M2))
    mv = jax.jit(KroneckerOperator.mv) if jit else KroneckerOperator.mv
    rmv = jax.jit(KroneckerOperator.rmv) if jit else KroneckerOperator.rmv
    np.testing.assert_allclose(mv(op, X.reshape(-1)), dense @ X.reshape(-1), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(mv(op, X), (dense @ X.reshape(-1)).reshape(M1, M2), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(rmv(op, Y.reshape(-1)), dense.T @ Y.reshape(-1), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(rmv(op, Y), (dense.T @ Y.reshape(-1)).reshape(D1, D2), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(op.T.as_matrix(), dense.T, rtol=1e-15)
    assert op.T.T.A1.shape == op.A1.shape


def test_row_block_j_maps_to_row_j():
    """Row block j of K is ``a1_j^T ⊗ A2``: the logits of row j."""
    op = operator()
    X = jax.random.normal(jax.random.PRNGKey(2), (D1, D2))
    dense = op.as_matrix()
    for j in range(M1):
        block = dense[j * M2:(j + 1) * M2]
        np.testing.assert_allclose(block, np.kron(op.A1[j][None], op.A2), rtol=1e-15)
        np.testing.assert_allclose(block @ X.reshape(-1), op.mv(X)[j], rtol=1e-12)


@pytest.mark.parametrize("k", [1, K])
@pytest.mark.parametrize("row_block", [512, 1, 2, 3])  # one block; blocks dividing M1 = 5; padded blocks
def test_sandwich_matches_dense(k, row_block):
    op = operator()
    B, dense_B = blocks(k=k)
    K_dense = op.as_matrix()
    expected = K_dense.T @ dense_B @ K_dense
    got = op.sandwich(B, row_block=row_block)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-11 * np.abs(expected).max())
    np.testing.assert_allclose(jax.jit(KroneckerOperator.sandwich)(op, B), expected, rtol=1e-11, atol=1e-11 * np.abs(expected).max())


@pytest.mark.parametrize("jit", [False, True])
def test_sandwich_mv_matches_dense(jit):
    op = operator()
    B, dense_B = blocks()
    X = jax.random.normal(jax.random.PRNGKey(4), (D1, D2))
    K_dense = op.as_matrix()
    expected = K_dense.T @ dense_B @ K_dense @ X.reshape(-1)
    fn = jax.jit(KroneckerOperator.sandwich_mv) if jit else KroneckerOperator.sandwich_mv
    np.testing.assert_allclose(fn(op, B, X.reshape(-1)), expected, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(fn(op, B, X), expected.reshape(D1, D2), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(op.sandwich(B) @ X.reshape(-1), expected, rtol=1e-11, atol=1e-12)


def test_float32():
    op = operator(dtype=jnp.float32)
    B, dense_B = blocks(dtype=jnp.float32)
    X = jax.random.normal(jax.random.PRNGKey(2), (D1, D2), jnp.float32)
    assert op.mv(X).dtype == jnp.float32 and op.sandwich(B).dtype == jnp.float32
    K_dense = np.asarray(op.as_matrix(), np.float64)
    expected = K_dense.T @ np.asarray(dense_B, np.float64) @ K_dense
    np.testing.assert_allclose(op.sandwich(B), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_vmap_over_a_stack_of_operators():
    ops = [operator(seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ops)
    Xs = jax.random.normal(jax.random.PRNGKey(5), (3, D1, D2))
    B, _ = blocks()
    out = jax.vmap(KroneckerOperator.mv)(stacked, Xs)
    back = jax.vmap(KroneckerOperator.rmv)(stacked, out)
    hess = jax.vmap(KroneckerOperator.sandwich, in_axes=(0, None))(stacked, B)
    for i, op in enumerate(ops):
        np.testing.assert_allclose(out[i], op.mv(Xs[i]), rtol=1e-12)
        np.testing.assert_allclose(back[i], op.rmv(op.mv(Xs[i])), rtol=1e-12)
        np.testing.assert_allclose(hess[i], op.sandwich(B), rtol=1e-12, atol=1e-12)


def test_bad_shapes():
    op = operator()
    with pytest.raises(ValueError, match=r"x must have shape \(6,\) or \(3, 2\)"):
        op.mv(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(20,\) or \(5, 4\)"):
        op.rmv(jnp.ones(7))
    B, _ = blocks()
    for method in (op.sandwich, lambda b: op.sandwich_mv(b, jnp.ones((D1, D2)))):
        with pytest.raises(ValueError, match=r"B.diag must have shape \(5, 4\)"):
            method(B._replace(diag=B.diag.T))


@pytest.mark.parametrize("jit", [False, True])
def test_dense_operator_matches_matrix_products(jit):
    """The KroneckerOperator interface on a dense A (M1, D1): A x, A^T y, A^T B A and A^T B A x."""
    A = np.asarray(operator().A1)
    op = DenseOperator(jnp.asarray(A))
    kd, ku, km = jax.random.split(jax.random.PRNGKey(6), 3)
    M = jax.random.normal(km, (K, K))
    B = DiagPlusLowRank(jax.random.normal(kd, (M1,)), jax.random.normal(ku, (M1, K)), M + M.T)
    x, y = np.linspace(-1.0, 1.0, D1), np.linspace(0.5, -2.0, M1)
    call = (lambda f, *a: jax.jit(f)(*a)) if jit else (lambda f, *a: f(*a))
    assert op.shape == (M1, D1) and op.in_shape == (D1,) and op.out_shape == (M1,)
    np.testing.assert_array_equal(op.as_matrix(), A)
    dense_B = np.asarray(B.as_matrix())
    np.testing.assert_allclose(call(DenseOperator.mv, op, x), A @ x, rtol=1e-13)
    np.testing.assert_allclose(call(DenseOperator.rmv, op, y), A.T @ y, rtol=1e-13)
    np.testing.assert_allclose(call(DenseOperator.sandwich, op, B), A.T @ dense_B @ A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(call(DenseOperator.sandwich_mv, op, B, x), A.T @ dense_B @ A @ x, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"x must have shape \(3,\)"):
        op.mv(jnp.ones(M1))
    with pytest.raises(ValueError, match=r"y must have shape \(5,\)"):
        op.rmv(jnp.ones(D1))
    with pytest.raises(ValueError, match=r"B.diag must have shape \(5,\)"):
        op.sandwich(B._replace(diag=jnp.ones(D1)))
