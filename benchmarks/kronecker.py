"""Structured Kronecker Hessians vs autodiff on matrix softmax regression (float64, CPU by default).

For ``MatrixSoftmaxRegression`` (A1, A2 (n, d), X (d, d), B (n, n)) and each size,
jitted and warmed up, medians of interleaved repeats:

- ``hessian``: ours (``sum_j (a1_j a1_j^T) ⊗ (A2^T B_j A2)`` from Khatri-Rao
  products, O(n^2 d^2 + n d^4)) vs ``jax.hessian`` of the same loss, and vs
  ``jax.hessian`` of the loss written with the dense ``kron(A1, A2)``
  (n^2 x d^2; only for small n: at n=1024, d=32 it would take 8 GiB);
- ``hvp``: ours (``A1^T D A2``) vs ``jax.jvp(jax.grad(loss))``;
- ``matmul``: a plain square ``jnp.matmul`` doing the same FLOPs as our
  Hessian assembly (``2 n d^4 + 2 n^2 d^2 + 6 n^2 d``), timed in the same run,
  which gives the machine's matmul rate and the ratio ``ours / matmul``.

Ratios > 1 mean ours is faster (for ``vs matmul``: < 1 means ours is faster
than the same FLOPs in one matmul). The problem is an argument of every
jitted function, so XLA cannot fold the data.

    python benchmarks/kronecker.py [--out benchmarks/results/kronecker.json] [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

from attnopt.problems.matrix import matrix_softmax_instance  # noqa: E402

SIZES = ((64, 8), (256, 16), (512, 16), (1024, 32))
QUICK_SIZES = ((64, 8), (256, 16))
AUTODIFF_MAX_N = 256  # jax.hessian of the loss: d^2 jvp passes of O(n^2 d) each
DENSE_MAX_N = 64  # the dense kron(A1, A2) has n^2 d^2 entries

OURS_HESSIAN = jax.jit(lambda p, X, V: p.hessian(X))
OURS_HVP = jax.jit(lambda p, X, V: p.hvp(X, V))
AUTODIFF_HESSIAN = jax.jit(lambda p, X, V: jax.hessian(p.loss)(X).reshape(X.size, X.size))
AUTODIFF_HVP = jax.jit(lambda p, X, V: jax.jvp(jax.grad(p.loss), (X,), (V,))[1])


def _dense_loss(p, x):
    """The same loss through the dense Kronecker matrix (no structure)."""
    K = jnp.kron(p.A1, p.A2)
    Z = (K @ x).reshape(p.B.shape)
    R = jax.nn.softmax(Z, axis=-1) - p.B
    return 0.5 * jnp.sum(R * R) + 0.5 * jnp.sum((p.reg * Z) ** 2) + 0.5 * p.ridge * (x @ x)


DENSE_HESSIAN = jax.jit(lambda p, X, V: jax.hessian(lambda x: _dense_loss(p, x))(X.reshape(-1)))
MATMUL = jax.jit(jnp.matmul)


def assembly_flops(n: int, d: int) -> float:
    """FLOPs of the matrix products in our Hessian assembly: ``K1^T S`` (2 n d^4),
    ``diag @ K2`` (2 n^2 d^2), ``A2^T U_j`` for the rank-2 parts (4 n^2 d), the logits (2 n^2 d)."""
    return 2.0 * n * d**4 + 2.0 * n * n * d * d + 6.0 * n * n * d


def instance(n, d, seed=0):
    key = jax.random.PRNGKey(seed)
    inst = matrix_softmax_instance(key, n=n, d=d, cond=10.0, reg=0.1, ridge=1e-3)
    k_x, k_v = jax.random.split(jax.random.fold_in(key, 1))
    X = inst.solution + 0.3 * jax.random.normal(k_x, (d, d)) / d
    return inst.problem, X, jax.random.normal(k_v, (d, d))


def bench(n, d, repeats, max_total_s):
    problem, X, V = instance(n, d)
    flops = assembly_flops(n, d)
    side = max(8, round((flops / 2) ** (1 / 3)))
    a = jax.random.normal(jax.random.PRNGKey(2), (side, side))
    fns = {
        "ours.hessian": lambda: OURS_HESSIAN(problem, X, V),
        "ours.hvp": lambda: OURS_HVP(problem, X, V),
        "autodiff.hvp": lambda: AUTODIFF_HVP(problem, X, V),
        "matmul": lambda: MATMUL(a, a),
    }
    if n <= AUTODIFF_MAX_N:
        fns["autodiff.hessian"] = lambda: AUTODIFF_HESSIAN(problem, X, V)
    if n <= DENSE_MAX_N:
        fns["dense.hessian"] = lambda: DENSE_HESSIAN(problem, X, V)
    # correctness of what is timed (the tests check this more thoroughly)
    ref = fns.get("autodiff.hessian", fns.get("dense.hessian"))
    if ref is not None:
        err = float(jnp.max(jnp.abs(fns["ours.hessian"]() - ref())) / jnp.max(jnp.abs(ref())))
        assert err < 1e-9, f"hessian mismatch {err:.2e} at n={n}, d={d}"
    # samples of >= 50 ms: one cold call right after a large jax.hessian would dominate shorter ones
    t = _timing.median_times(fns, repeats=repeats, min_sample_s=0.05, max_total_s=max_total_s)
    matmul_s = t["matmul"] * flops / (2.0 * side**3)  # the same FLOPs at the measured matmul rate
    row = {
        "n": n,
        "d": d,
        "ours.hessian_s": t["ours.hessian"],
        "ours.hvp_s": t["ours.hvp"],
        "autodiff.hvp_s": t["autodiff.hvp"],
        "hessian_gflops": flops / t["ours.hessian"] / 1e9,
        "matmul_gflops": 2.0 * side**3 / t["matmul"] / 1e9,
        "hessian_vs_matmul": t["ours.hessian"] / matmul_s,
        "hvp_speedup": t["autodiff.hvp"] / t["ours.hvp"],
    }
    if "autodiff.hessian" in t:
        row["autodiff.hessian_s"] = t["autodiff.hessian"]
        row["hessian_speedup_vs_jax_hessian"] = t["autodiff.hessian"] / t["ours.hessian"]
    if "dense.hessian" in t:
        row["dense.hessian_s"] = t["dense.hessian"]
        row["hessian_speedup_vs_dense_kron"] = t["dense.hessian"] / t["ours.hessian"]
    return row


def main(argv=None) -> int:
    args = _timing.parse_args(argv, __doc__, "kronecker", repeats=9)
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = 3 if args.quick else args.repeats
    info = _timing.machine()
    print(_timing.describe(info))
    rows = []
    for n, d in sizes:
        rows.append(bench(n, d, repeats, max_total_s=20.0))
        print(f"  done n={n} d={d}", flush=True)
    columns = [
        "n", "d", "ours.hessian_s", "hessian_speedup_vs_jax_hessian", "hessian_speedup_vs_dense_kron",
        "hessian_gflops", "matmul_gflops", "hessian_vs_matmul", "hvp_speedup",
    ]
    print(_timing.format_table(rows, columns))
    targets = {
        "hessian_speedup_vs_jax_hessian at n=256, d=16 (>= 40)": next(
            (r.get("hessian_speedup_vs_jax_hessian") for r in rows if (r["n"], r["d"]) == (256, 16)), None
        ),
        "hessian_vs_matmul, worst (<= 3)": max(r["hessian_vs_matmul"] for r in rows),
        "hvp_speedup, worst (>= 1)": min(r["hvp_speedup"] for r in rows),
    }
    for k, v in targets.items():
        print(f"{k}: {v:.3g}" if v is not None else f"{k}: not measured")
    path = _timing.write_json(args.out, {"benchmark": "kronecker", "machine": info, "rows": rows, "targets": targets})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
