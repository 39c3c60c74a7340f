"""Attention as a max-margin problem: prompt attention and cross attention with a linear readout.

See (docs/math.md, Attention as a max-margin problem). Data: n inputs, each a
token matrix X_i (T, d) with a label Y_i in {-1, +1}, and a readout v (d,).
Input i scores its tokens, attends and predicts

    s_i = X_i A Θ b_i (T,),   a_i = softmax(s_i),   ḡ_i = X_i v,   f_i = <ḡ_i, a_i>

with the parameter Θ entering through a fixed left factor A and a per-input
right factor b_i:

    PromptAttention   s_i = X_i W p       A = W (fixed key-query matrix), Θ = p (d, 1), b_i = 1
    CrossAttention    s_i = X_i W z_i     A = I, Θ = W (d, d) (or K Q^T), b_i = z_i (the query token)

No 1/sqrt(d) scaling. The loss is ``L = 1/n sum_i ell(u_i)`` on the margins
u_i = Y_i f_i, with ell logistic log(1 + e^{-u}), linear -u, exponential
e^{-u} or squared (1 - u)^2 / 2; v may be trained with Θ.

Derivatives. With c_i = Y_i ell'(u_i) / n = dL/df_i and e_i = ell''(u_i) / n:

    h_i = df_i/ds_i = a_i ∘ (ḡ_i - f_i),          df_i/dḡ_i = a_i
    d²f_i/ds_i² = diag(h_i) - h_i a_i^T - a_i h_i^T
    d²f_i/dḡ_i ds_i = diag(a_i) - a_i a_i^T,   d²f_i/dḡ_i² = 0

so the score-space Hessian of L is, per input, diagonal plus rank 2:

    B_i = c_i diag(h_i) + [h_i a_i] [[e_i, -c_i], [-c_i, 0]] [h_i a_i]^T

and the mixed one is C_i = c_i (diag(a_i) - a_i a_i^T) + e_i a_i h_i^T. With
q_i = A Θ b_i (s_i = X_i q_i) and r_i = X_i^T a_i (= df_i/dv):

    grad_Θ = A^T (sum_i c_i X_i^T h_i b_i^T),   grad_v = sum_i c_i r_i
    H_ΘΘ   = sum_i (A^T X_i^T B_i X_i A) ⊗ (b_i b_i^T)     (row-major vec Θ)
    H_vΘ   = sum_i (X_i^T C_i X_i A) ⊗ b_i^T,               H_vv = sum_i e_i r_i r_i^T

For CrossAttention H_WW = sum_i (X_i^T B_i X_i) ⊗ (z_i z_i^T): a sum of Kronecker
products with a different X_i per input; the HVP applies it through the scores
(O(n T d) plus O(n d^2) for δW z_i), never as a matrix. With W = K Q^T
(``param="KQ"``) and the ridge eps (||K||_F^2 + ||Q||_F^2), G = grad_W:

    grad_K = G Q + 2 eps K,   grad_Q = G^T K + 2 eps Q
    HVP in (δK, δQ): δW = δK Q^T + K δQ^T,  R = H_WW δW:
        (R Q + G δQ + 2 eps δK,  R^T K + G^T δK + 2 eps δQ)
    Hessian: J^T H_WW J + [[0, G ⊗ I_m], [G^T ⊗ I_m, 0]] + 2 eps I,  J = d vec W / d [vec K; vec Q]

Why ḡ_it - f_i is computed as sum_s a_is (ḡ_it - ḡ_is): as training proceeds
the softmax saturates on a token α, f_i -> ḡ_iα and the true ḡ_iα - f_i is of
the size of the other probabilities (e^{-gap}, far below machine epsilon late
in a run). The plain difference of two O(1) numbers then cancels to rounding
noise, which becomes the gradient (and steers normalized gradient descent);
the pairwise form sums exact token differences weighted by the small
probabilities, so it keeps full relative accuracy. It costs O(T^2) per input.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnopt import _validate
from attnopt.operators import DiagPlusLowRank
from attnopt.problems.base import Problem
from attnopt.problems.registry import Instance, register

#: ell(u), ell'(u), ell''(u) of each margin loss.
LOSSES = {
    "logistic": lambda u: (jax.nn.softplus(-u), -jax.nn.sigmoid(-u), jax.nn.sigmoid(u) * jax.nn.sigmoid(-u)),
    "linear": lambda u: (-u, -jnp.ones_like(u), jnp.zeros_like(u)),
    "exponential": lambda u: (jnp.exp(-u), -jnp.exp(-u), jnp.exp(-u)),
    "squared": lambda u: (0.5 * (1 - u) ** 2, u - 1, jnp.ones_like(u)),
}


class _Attended(NamedTuple):
    """Per-input forward quantities: a, h (n, T); c = dL/df, e = d²L/df² (n,); the loss."""

    a: jax.Array
    h: jax.Array
    c: jax.Array
    e: jax.Array
    value: jax.Array


def _attend(X, Y, s, v, loss) -> _Attended:
    """Softmax, prediction and the loss's derivatives in f, from scores s (n, T) and readout v (d,)."""
    a = jax.nn.softmax(s, axis=-1)
    g = X @ v
    f = jnp.sum(a * g, axis=-1)
    gap = jnp.einsum("its,is->it", g[:, :, None] - g[:, None, :], a)  # ḡ_t - f without cancellation
    ell, d1, d2 = LOSSES[loss](Y * f)
    n = Y.shape[0]
    return _Attended(a, a * gap, Y * d1 / n, d2 / n, jnp.mean(ell))


def _score_curvature(st: _Attended) -> DiagPlusLowRank:
    """B_i = c_i (diag(h_i) - h_i a_i^T - a_i h_i^T) + e_i h_i h_i^T, stacked over inputs (diag (n, T), U (n, T, 2))."""
    c, e = st.c, st.e
    M = jnp.stack([jnp.stack([e, -c], -1), jnp.stack([-c, jnp.zeros_like(c)], -1)], -2)
    return DiagPlusLowRank(c[:, None] * st.h, jnp.stack([st.h, st.a], -1), M)


def _score_hvp(st: _Attended, ds, dg):
    """The score-space Hessian of L applied to (δs, δḡ) (n, T) each: returns (out_s, out_g)."""
    a, h, c, e = st.a, st.h, st.c[:, None], st.e[:, None]
    dot = lambda x, y: jnp.sum(x * y, axis=-1, keepdims=True)
    df = dot(h, ds) + dot(a, dg)
    out_s = e * df * h + c * (h * ds - h * dot(a, ds) - a * dot(h, ds) + a * dg - a * dot(a, dg))
    out_g = e * df * a + c * (a * ds - a * dot(a, ds))
    return out_s, out_g


class _Direct(NamedTuple):
    """Θ is one parameter array of ``shape`` (p (d,) as Θ (d, 1), or W (d, d)).

    A reparametrisation maps the params' Θ-part ``factors`` (a tuple) to Θ (``theta``), a direction
    to δΘ (``push``), adds its ``penalty`` to the loss, and pulls Θ-space results back to the
    factors: ``grad`` from G = dL/dΘ, ``hvp`` from R = (H δ)_Θ, ``hessian`` from (H_vΘ, H_ΘΘ).
    """

    shape: tuple

    def shapes(self):
        return (self.shape,)

    def theta(self, factors):
        return factors[0].reshape(self.shape[0], -1)

    def push(self, factors, dfactors):
        return self.theta(dfactors)

    def penalty(self, factors):
        return 0.0

    def grad(self, factors, G):
        return (G.reshape(self.shape),)

    def hvp(self, factors, G, R, dfactors):
        return (R.reshape(self.shape),)

    def hessian(self, factors, G, H_vt, H_tt):
        return H_vt, H_tt


class _Factored(NamedTuple):
    """Θ = K Q^T with K, Q (d, m), plus the ridge eps (||K||_F^2 + ||Q||_F^2); interface of :class:`_Direct`."""

    d: int
    eps: jax.Array

    def shapes(self):
        return (self.d, None), (self.d, None)

    def theta(self, factors):
        K, Q = factors
        return K @ Q.T

    def push(self, factors, dfactors):
        (K, Q), (dK, dQ) = factors, dfactors
        return dK @ Q.T + K @ dQ.T

    def penalty(self, factors):
        K, Q = factors
        return self.eps * (jnp.sum(K * K) + jnp.sum(Q * Q))

    def grad(self, factors, G):
        K, Q = factors
        return G @ Q + 2 * self.eps * K, G.T @ K + 2 * self.eps * Q

    def hvp(self, factors, G, R, dfactors):
        (K, Q), (dK, dQ) = factors, dfactors
        return R @ Q + G @ dQ + 2 * self.eps * dK, R.T @ K + G.T @ dK + 2 * self.eps * dQ

    def hessian(self, factors, G, H_vt, H_tt):
        """``J^T H_WW J + [[0, G ⊗ I_m], [G^T ⊗ I_m, 0]] + 2 eps I`` and ``H_vW J``, with J (d^2, 2 d m)
        the Jacobian of vec W in [vec K; vec Q]: ``I_d ⊗ Q`` and ``J_Q[(a, b), (b', r)] = K[a, r] δ_bb'``."""
        K, Q = factors
        d, m = K.shape
        eye_d, eye_m = jnp.eye(d, dtype=K.dtype), jnp.eye(m, dtype=K.dtype)
        J = jnp.concatenate([jnp.kron(eye_d, Q), jnp.einsum("ar,bc->abcr", K, eye_d).reshape(d * d, d * m)], axis=1)
        coupling = jnp.kron(G, eye_m)
        zeros = jnp.zeros_like(coupling)
        H = J.T @ H_tt @ J + jnp.block([[zeros, coupling], [coupling.T, zeros]])
        return H_vt @ J, H + 2 * self.eps * jnp.eye(2 * d * m, dtype=K.dtype)


def _choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")


def _labels(Y, dtype, n) -> jax.Array:
    Y = _validate.as_array(f"Y (X has {n} inputs)", Y, dtype, (n,))
    if _validate.is_concrete(Y) and not bool(np.all(np.abs(np.asarray(Y)) == 1)):
        raise ValueError(f"Y must hold labels -1 or +1, got values {np.unique(np.asarray(Y)).tolist()}")
    return Y


class _TokenAttention(Problem):
    """Shared implementation over s_i = X_i A Θ b_i. Subclasses set the statics ``loss_name`` (the
    ``loss`` argument; ``loss`` is the method) and ``trainable``, and provide ``_maps()`` ->
    (A (d, d), B (n, k) with rows b_i) and ``_reparam`` (how the params' Θ-part builds Θ)."""

    _trains_v: ClassVar[str]  # the ``trainable`` value that adds v (first) to the params

    def arguments(self) -> dict:
        """The keyword arguments of ``__init__`` that rebuild this instance."""
        fields = {k: getattr(self, k) for k in self.leaves + self.static}
        return fields | {"loss": fields.pop("loss_name")}

    @property
    def trains_v(self) -> bool:
        """Whether v is part of the params."""
        return self.trainable == self._trains_v

    def _shapes(self) -> tuple:
        return ((self.X.shape[-1],),) * self.trains_v + self._reparam.shapes()

    @property
    def params_shape(self):
        """The params' shape, or a tuple of shapes when there are several; None is a free size (m of K, Q)."""
        shapes = self._shapes()
        return shapes[0] if len(shapes) == 1 else shapes

    def split_params(self, params, name="params"):
        """(v, factors, like): v (d,) (from params when trained, else the fixed leaf), the Θ-part
        ((p,), (W,) or (K, Q)) shape-checked, and ``like(v, factors)`` rebuilding params' structure."""
        leaves, treedef = jax.tree.flatten(params)
        shapes = self._shapes()
        if len(leaves) != len(shapes):
            raise ValueError(f"{name} must be {len(shapes)} array(s) of shapes {shapes}, got {len(leaves)}")
        for i, (x, shape) in enumerate(zip(leaves, shapes)):
            if x.ndim != len(shape) or any(s is not None and s != k for s, k in zip(shape, x.shape)):
                raise ValueError(f"{name}[{i}] must have shape {shape} (None: any size), got {tuple(x.shape)}")
        factors = tuple(leaves[self.trains_v :])
        if len(factors) == 2 and factors[0].shape != factors[1].shape:
            raise ValueError(f"{name}: K and Q must have one shape, got {factors[0].shape} and {factors[1].shape}")
        v = leaves[0] if self.trains_v else self.v
        like = lambda v, factors: jax.tree.unflatten(treedef, ((v,) if self.trains_v else ()) + tuple(factors))
        return v, factors, like

    def readout(self, params=None) -> jax.Array:
        """v (d,): from params when v is trained (then params are required), else the fixed leaf."""
        if not self.trains_v:
            return self.v
        if params is None:
            raise ValueError(f"params is required: v is trained (trainable={self.trainable!r})")
        return self.split_params(params)[0]

    def _push(self, theta) -> jax.Array:
        """The linear map Θ (d, k) -> s (n, T): s_i = X_i q_i, q_i = A Θ b_i."""
        A, B = self._maps()
        return jnp.einsum("itd,id->it", self.X, B @ theta.T @ A.T)

    def _pull(self, w) -> jax.Array:
        """Its adjoint, score-space w (n, T) -> ``A^T sum_i X_i^T w_i b_i^T`` (d, k)."""
        A, B = self._maps()
        return A.T @ jnp.einsum("itd,it,ik->dk", self.X, w, B)

    def _forward(self, params):
        """(per-input quantities, factors, like, G = dL/dΘ) at params."""
        v, factors, like = self.split_params(params)
        st = _attend(self.X, self.Y, self._push(self._reparam.theta(factors)), v, self.loss_name)
        return st, factors, like, self._pull(st.c[:, None] * st.h)

    @jax.jit
    def scores(self, params) -> jax.Array:
        """s (n, T), s_it = x_it^T A Θ b_i."""
        return self._push(self._reparam.theta(self.split_params(params)[1]))

    @jax.jit
    def attention(self, params) -> jax.Array:
        """a (n, T): the softmax of each input's scores."""
        return jax.nn.softmax(self.scores(params), axis=-1)

    def token_scores(self, params=None) -> jax.Array:
        """γ (n, T), γ_it = Y_i x_it^T v (v from params when trained)."""
        return self.Y[:, None] * (self.X @ self.readout(params))

    @jax.jit
    def loss(self, params):
        """``1/n sum_i ell(Y_i f_i)`` (plus the K, Q ridge)."""
        st, factors, _, _ = self._forward(params)
        return st.value + self._reparam.penalty(factors)

    @jax.jit
    def grad(self, params):
        """Gradient, like params: ``grad_v = sum_i c_i X_i^T a_i``, ``grad_Θ = A^T sum_i c_i X_i^T h_i b_i^T``."""
        st, factors, like, G = self._forward(params)
        return like(jnp.einsum("itd,it->d", self.X, st.c[:, None] * st.a), self._reparam.grad(factors, G))

    @jax.jit
    def hvp(self, params, v):
        """Hessian-vector product in direction v (like params), through the scores, O(n T (T + d) + n d k)."""
        st, factors, like, G = self._forward(params)
        dv, dfactors, _ = self.split_params(v, "v")
        ds = self._push(self._reparam.push(factors, dfactors))
        dg = self.X @ dv if self.trains_v else jnp.zeros_like(ds)
        out_s, out_g = _score_hvp(st, ds, dg)
        R = self._pull(out_s)
        return like(jnp.einsum("itd,it->d", self.X, out_g), self._reparam.hvp(factors, G, R, dfactors))

    @jax.jit
    def hessian(self, params):
        """Hessian (N, N) in ``ravel_pytree`` order of params: ``[[H_vv, H_vΘ], [H_vΘ^T, H_ΘΘ]]`` when v
        is trained, else H_ΘΘ (through K, Q for ``param="KQ"``); matrices row-major. O(n T d^2 + n d^2 k^2)."""
        st, factors, _, G = self._forward(params)
        A, B = self._maps()
        X = self.X
        d, k = X.shape[-1], B.shape[-1]
        XBX = jax.vmap(DiagPlusLowRank.sandwich)(_score_curvature(st), X)  # X_i^T B_i X_i, (n, d, d)
        H_tt = jnp.einsum("ax,iac,ib,ie,cy->xbye", A, XBX, B, B, A).reshape(d * k, d * k)
        r = jnp.einsum("itd,it->id", X, st.a)
        Xh = jnp.einsum("itd,it->id", X, st.h)
        XaX = jnp.einsum("ita,it,itc->iac", X, st.a, X)
        c, e = st.c[:, None, None], st.e[:, None, None]
        XCX = c * (XaX - r[:, :, None] * r[:, None, :]) + e * r[:, :, None] * Xh[:, None, :]  # X_i^T C_i X_i
        H_vt = jnp.einsum("ixc,cy,ib->xyb", XCX, A, B).reshape(d, d * k)
        H_vf, H_ff = self._reparam.hessian(factors, G, H_vt, H_tt)
        if not self.trains_v:
            return H_ff
        H_vv = jnp.einsum("i,ia,ib->ab", st.e, r, r)
        return jnp.block([[H_vv, H_vf], [H_vf.T, H_ff]])


class PromptAttention(_TokenAttention):
    """Prompt attention ``L(p) = 1/n sum_i ell(Y_i <X_i v, softmax(X_i W p)>)`` (Θ = p, A = W, b_i = 1).

    Args:
      X: (n, T, d) token matrices.
      Y: (n,) labels in {-1, +1}.
      v: (d,) readout; required for ``trainable="p"``, unused (may be None) for ``"vp"``.
      W: (d, d) fixed key-query matrix; None is the identity.
      loss: "logistic", "linear", "exponential" or "squared".
      trainable: "p" (params p (d,)) or "vp" (params the tuple (v, p)).
    """

    leaves: ClassVar = ("X", "Y", "v", "W")
    static: ClassVar = ("loss_name", "trainable")
    _trains_v: ClassVar = "vp"

    def __init__(self, X, Y, v=None, W=None, loss="logistic", trainable="p"):
        _choice("loss", loss, LOSSES)
        _choice("trainable", trainable, ("p", "vp"))
        if v is None and trainable == "p":
            raise ValueError("v is required for trainable='p'")
        dtype = _validate.float_dtype(**{k: x for k, x in {"X": X, "Y": Y, "v": v, "W": W}.items() if x is not None})
        X = _validate.as_array("X", X, dtype, (None, None, None))
        n, _, d = X.shape
        self._set(
            X=X,
            Y=_labels(Y, dtype, n),
            v=jnp.zeros(d, dtype) if v is None else _validate.as_array(f"v (X has {d} features)", v, dtype, (d,)),
            W=jnp.eye(d, dtype=dtype) if W is None else _validate.as_array(f"W (X has {d} features)", W, dtype, (d, d)),
            loss_name=loss,
            trainable=trainable,
        )

    @property
    def _reparam(self):
        return _Direct((self.X.shape[-1],))

    def _maps(self):
        return self.W, jnp.ones((self.X.shape[0], 1), self.X.dtype)


class CrossAttention(_TokenAttention):
    """Cross attention ``L(W) = 1/n sum_i ell(Y_i v^T X_i^T softmax(X_i W z_i))`` (Θ = W, A = I, b_i = z_i).

    Args:
      X: (n, T, d) token matrices.
      Y: (n,) labels in {-1, +1}.
      Z: (n, d) one query token per input.
      v: (d,) readout; required for ``trainable="W"``, unused (may be None) for ``"vW"``.
      loss: "logistic", "linear", "exponential" or "squared".
      param: "W" (the key-query part is W (d, d)) or "KQ" (the pair (K, Q), K, Q (d, m), W = K Q^T).
      trainable: "W" (params the key-query part) or "vW" (v first: (v, W) or (v, K, Q)).
      eps: ridge eps >= 0 on ``||K||_F^2 + ||Q||_F^2`` (``param="KQ"`` only; 0 for "W").
    """

    leaves: ClassVar = ("X", "Y", "Z", "v", "eps")
    static: ClassVar = ("loss_name", "param", "trainable")
    _trains_v: ClassVar = "vW"

    def __init__(self, X, Y, Z, v=None, loss="logistic", param="W", trainable="W", eps=0.0):
        _choice("loss", loss, LOSSES)
        _choice("param", param, ("W", "KQ"))
        _choice("trainable", trainable, ("W", "vW"))
        if v is None and trainable == "W":
            raise ValueError("v is required for trainable='W'")
        dtype = _validate.float_dtype(**{k: x for k, x in {"X": X, "Y": Y, "Z": Z, "v": v}.items() if x is not None})
        X = _validate.as_array("X", X, dtype, (None, None, None))
        n, _, d = X.shape
        eps = _validate.scalar("eps", eps, dtype)
        if param == "W" and _validate.is_concrete(eps) and float(eps) != 0:
            raise ValueError(f"eps (the K, Q ridge) needs param='KQ', got eps={float(eps)} with param='W'")
        self._set(
            X=X,
            Y=_labels(Y, dtype, n),
            Z=_validate.as_array(f"Z (X has {n} inputs, {d} features)", Z, dtype, (n, d)),
            v=jnp.zeros(d, dtype) if v is None else _validate.as_array(f"v (X has {d} features)", v, dtype, (d,)),
            eps=eps,
            loss_name=loss,
            param=param,
            trainable=trainable,
        )

    @property
    def _reparam(self):
        d = self.X.shape[-1]
        return _Direct((d, d)) if self.param == "W" else _Factored(d, self.eps)

    def _maps(self):
        return jnp.eye(self.X.shape[-1], dtype=self.X.dtype), self.Z

    @jax.jit
    def key_query(self, params) -> jax.Array:
        """W (d, d), or K Q^T for ``param="KQ"``."""
        return self._reparam.theta(self.split_params(params)[1])


def _sphere(key, shape, dtype):
    x = jax.random.normal(key, shape, dtype)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _signs(key, n, dtype):
    return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(dtype)


def _start(key, problem, dtype):
    """0.1 N(0, I) for each array of the params (m = d for K, Q)."""
    shapes = problem._shapes()
    d = problem.X.shape[-1]
    x0 = tuple(
        0.1 * jax.random.normal(k, tuple(d if s is None else s for s in shape), dtype)
        for k, shape in zip(jax.random.split(key, len(shapes)), shapes)
    )
    return x0[0] if len(x0) == 1 else x0


@register("prompt_attention")
def prompt_attention_instance(key, n=3, T=4, d=3, loss="logistic", trainable="p", dtype="float64"):
    """PromptAttention with tokens uniform on the unit sphere, v a random unit vector, random labels,
    W = I; x0 = 0.1 N(0, I) (p, or (v, p))."""
    kx, ky, kv, k0 = jax.random.split(key, 4)
    problem = PromptAttention(
        _sphere(kx, (n, T, d), dtype), _signs(ky, n, dtype), _sphere(kv, (d,), dtype), loss=loss, trainable=trainable
    )
    return Instance(problem, _start(k0, problem, dtype), None)


@register("cross_attention")
def cross_attention_instance(key, n=4, T=5, d=3, loss="logistic", param="W", trainable="W", dtype="float64"):
    """CrossAttention as in the Transformers-as-SVMs local-convergence runs: tokens and queries uniform
    on the unit sphere, v a random unit vector, random labels; x0 = 0.1 N(0, I) (W or K, Q with m = d,
    v first for trainable="vW")."""
    kx, ky, kz, kv, k0 = jax.random.split(key, 5)
    problem = CrossAttention(
        _sphere(kx, (n, T, d), dtype),
        _signs(ky, n, dtype),
        _sphere(kz, (n, d), dtype),
        _sphere(kv, (d,), dtype),
        loss=loss,
        param=param,
        trainable=trainable,
    )
    return Instance(problem, _start(k0, problem, dtype), None)
