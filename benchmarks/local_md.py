"""local_md end to end: attnopt against a faithful NumPy + cvxpy loop.

The local_md experiment (attention with l_p mirror descent): the local_converge
cross-attention instances trained on W by normalized l_p mirror descent for
each p in {1.75, 2, 3} from one shared start per instance, then the l_p' W-SVM
of each run's final selection for every p' and the Bregman divergence table.
attnopt: one call of ``attnopt.maxmargin.mirror_experiments.local_md`` (cold:
first call in the process, compilation included; warm: second call).
Reference: the same algorithm one instance and one p at a time, NumPy for the
training loop (hand gradient, ``g / ||g||_q``, the mirror map and its
inverse) and cvxpy (``pnorm``, its default solver) for the l_p SVMs, from the
same data and starts. The script prints both divergence tables and their
largest difference.

    python benchmarks/local_md.py [--instances 100] [--steps 2000] [--out ...] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _timing  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402

from attnopt.maxmargin.experiments import local_converge_data  # noqa: E402
from attnopt.maxmargin.mirror_experiments import local_md  # noqa: E402

N, T, D = 6, 8, 10
PS = (1.75, 2.0, 3.0)


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_grad(X, Y, Z, v, W):
    """Gradient of the mean logistic loss of cross attention in W (d, d), and the scores (n, T)."""
    s = np.einsum("itd,de,ie->it", X, W, Z)
    a = _softmax(s)
    gamma = X @ v
    f = np.sum(a * gamma, axis=1)
    c = -Y / (1 + np.exp(Y * f)) / len(Y)
    h = a * (gamma - f[:, None])
    return np.einsum("i,itd,it,ie->de", c, X, h, Z), s


def numpy_md(X, Y, Z, v, W, p, steps, lr):
    """Normalized l_p mirror descent on W: returns (final W, final scores)."""
    q = p / (p - 1)
    for _ in range(steps):
        G, _ = numpy_grad(X, Y, Z, v, W)
        G = G / np.sum(np.abs(G) ** q) ** (1 / q)
        u = np.sign(W) * np.abs(W) ** (p - 1) - lr * G
        W = np.sign(u) * np.abs(u) ** (1 / (p - 1))
    return W, numpy_grad(X, Y, Z, v, W)[1]


def cvxpy_lp_svm(X, Z, alpha, p):
    """The l_p W-SVM of the selection alpha with cvxpy: W (NaN when the solve fails)."""
    import cvxpy as cp

    d = X.shape[-1]
    rows = [np.outer(X[i, alpha[i]] - X[i, t], Z[i]).ravel() for i in range(len(X)) for t in range(X.shape[1]) if t != alpha[i]]
    w = cp.Variable(d * d)
    cp.Problem(cp.Minimize(cp.pnorm(w, p)), [np.asarray(rows) @ w >= 1]).solve()
    return (w.value if w.value is not None else np.full(d * d, np.nan)).reshape(d, d)


def bregman_np(a, b, p):
    """Directional Bregman divergence D_p(a / ||a||_p, b / ||b||_p) of flattened arrays."""
    a, b = a.ravel() / np.sum(np.abs(a) ** p) ** (1 / p), b.ravel() / np.sum(np.abs(b) ** p) ** (1 / p)
    return 1 / p + (p - 1) / p - np.sign(b) * np.abs(b) ** (p - 1) @ a


def numpy_reference(instances, steps, lr=0.1, seed=0):
    """The whole experiment one instance and one p at a time; returns (seconds, median divergence table)."""
    problems, *_ = local_converge_data(seed, instances, N, T, D, "float64")
    X, Y, Z, v = (np.asarray(getattr(problems, k)) for k in ("X", "Y", "Z", "v"))
    W0 = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), 2), (instances, D, D), "float64"))
    start = time.perf_counter()
    divergence = np.full((len(PS), len(PS), instances), np.nan)
    for i in range(instances):
        for a, p in enumerate(PS):
            W, scores = numpy_md(X[i], Y[i], Z[i], v[i], W0[i], p, steps, lr)
            alpha = np.argmax(scores, axis=1)
            for b, q in enumerate(PS):
                divergence[a, b, i] = bregman_np(cvxpy_lp_svm(X[i], Z[i], alpha, q), W, p)
    return time.perf_counter() - start, np.nanmedian(divergence, axis=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/local_md.json")
    parser.add_argument("--quick", action="store_true", help="5 instances, 200 steps")
    args = parser.parse_args(argv)
    instances, steps = (5, 200) if args.quick else (args.instances, args.steps)
    info = _timing.machine()
    print(_timing.describe(info))

    settings = dict(instances=instances, steps=steps, ps=list(PS))
    with _timing.uncached():  # a real cold compile, not a load from the persistent cache
        start = time.perf_counter()
        results, _ = local_md(**settings)
        cold = time.perf_counter() - start
    start = time.perf_counter()
    results, _ = local_md(**settings)
    warm = time.perf_counter() - start
    reference_s, theirs = numpy_reference(instances, steps)
    ours = np.asarray(results["bregman_median_table"])

    timing = {"attnopt_cold_s": cold, "attnopt_warm_s": warm, "numpy_cvxpy_s": reference_s,
              "speedup_cold": reference_s / cold, "speedup_warm": reference_s / warm}
    print(f"\nlocal_md, {instances} instances x p in {PS}, {steps} l_p-MD steps, l_p W-SVMs for every p'")
    print(_timing.format_table([timing], list(timing)))
    rows = [{"p (MD)": p, **{f"ours p'={q:g}": ours[a, b] for b, q in enumerate(PS)},
             **{f"numpy p'={q:g}": theirs[a, b] for b, q in enumerate(PS)}} for a, p in enumerate(PS)]
    print("\nmedian D_p(W_svm,p', W_final) over instances")
    print(_timing.format_table(rows, list(rows[0])))
    print(f"selections agree across p: {results['selections_agree']:.2f}")
    path = _timing.write_json(args.out, {
        "benchmark": "local_md", "machine": info, "timing": timing, "settings": settings,
        "bregman_median_table": {"attnopt": ours.tolist(), "numpy_cvxpy": theirs.tolist()},
        "selections_agree": results["selections_agree"],
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
