"""local_converge end to end, attnopt against a faithful NumPy + cvxpy loop, and batched W-SVMs against cvxpy.

1. The local_converge experiment (Transformers as SVMs): cross attention trained by
   normalized GD on W and on (K, Q), then the Frobenius and nuclear-norm W-SVMs of each
   final selection. attnopt: one call of ``attnopt.maxmargin.experiments.local_converge``
   (results and figure), cold (first call in the process, compiled without the persistent
   cache) and warm (median of later calls). Reference: the public notebook's algorithm in
   NumPy, one instance at a time (hand gradient with its ``gamma - f`` cancellation,
   ``g / (||g|| + 2.2e-16)``), and cvxpy with its default solvers for every SVM (Clarabel for
   the Frobenius QP, SCS for the nuclear-norm SDP); the same data and starts. Accuracy: the
   corr of both sides with their own SVMs, and attnopt's SVMs of the reference's selections
   against the reference's (objective difference, constraint violations).
2. The W-SVMs alone: one vmapped native solve of 100 Frobenius and 100 nuclear-norm SVMs
   (optimal tokens) against cvxpy per instance (its default solvers, and Clarabel for the
   SDP too), and the accuracy of both: objective difference, largest violation, KKT residual.

    python benchmarks/maxmargin.py [--instances 100] [--steps 2000] [--out benchmarks/results/maxmargin.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import _timing  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402

from attnopt.maxmargin import attention_svm, optimal_tokens  # noqa: E402
from attnopt.maxmargin.experiments import local_converge, local_converge_data  # noqa: E402

N, T, D = 6, 8, 10
LR = 0.1
REPORT = (100, 200, 500, 1000, 2000)


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_train(X, Y, Z, v, start, steps, factored, record):
    """NGD on W or (K, Q) for the mean logistic loss as the notebook does (gradient with h = a (gamma - f),
    per-factor ``g / (||g|| + 2.2e-16)``); returns (W at the steps in ``record`` (R, d, d), final scores)."""
    K, Q = start if factored else (start, None)
    gamma = X @ v
    history = []
    for step in range(steps + 1):
        W = K @ Q.T if factored else K
        if step in record:
            history.append(W.copy())
        if step == steps:
            break
        a = _softmax(np.einsum("itd,de,ie->it", X, W, Z))
        f = np.sum(a * gamma, axis=1)
        c = -Y / (1 + np.exp(Y * f)) / len(Y)  # dL/df
        G = np.einsum("i,itd,it,ie->de", c, X, a * (gamma - f[:, None]), Z)
        if factored:
            gK, gQ = G @ Q, G.T @ K
            K = K - LR * gK / (np.linalg.norm(gK) + 2.2e-16)
            Q = Q - LR * gQ / (np.linalg.norm(gQ) + 2.2e-16)
        else:
            K = K - LR * G / (np.linalg.norm(G) + 2.2e-16)
    return np.asarray(history), np.einsum("itd,de,ie->it", X, W, Z)


def _rows(X, Z, alpha):
    """Constraint rows vec((x_{i,alpha_i} - x_it) z_i^T) (K, d^2), t != alpha_i."""
    return np.asarray([np.outer(X[i, alpha[i]] - X[i, t], Z[i]).ravel()
                       for i in range(len(X)) for t in range(X.shape[1]) if t != alpha[i]])


def cvxpy_svm(X, Z, alpha, norm, solver=None):
    """The W-SVM of the selection alpha with cvxpy (default solver: Clarabel for the Frobenius norm, SCS for
    the nuclear-norm SDP): W (d, d), NaN when not solved."""
    import cvxpy as cp

    d = X.shape[-1]
    W = cp.Variable((d, d))
    objective = cp.norm(W, "fro") if norm == "fro" else cp.normNuc(W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp.Problem(cp.Minimize(objective), [_rows(X, Z, alpha) @ cp.vec(W, order="C") >= 1]).solve(solver=solver)
    return W.value if W.value is not None else np.full((d, d), np.nan)


def _norm(W, norm):
    return np.linalg.norm(W, "fro" if norm == "fro" else "nuc")


def _cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(-1)
    return a @ b / (np.linalg.norm(a, axis=1) * np.linalg.norm(b))


def numpy_reference(instances, steps):
    """The experiment one instance at a time. Returns (timing, corr {(params, norm): (instances, R)},
    selections {params: (instances, n)}, SVMs {(params, norm): (instances, d, d)})."""
    W_problems, _, (K0, Q0), W0 = local_converge_data(0, instances, N, T, D, "float64")
    X, Y, Z, v = (np.asarray(getattr(W_problems, k)) for k in ("X", "Y", "Z", "v"))
    K0, Q0, W0 = np.asarray(K0), np.asarray(Q0), np.asarray(W0)
    record = [s for s in REPORT if s <= steps]
    corr, selections, svms, seconds = {}, {}, {}, {"train_s": 0.0, "svm_s": 0.0}
    for name, factored in (("W", False), ("KQ", True)):
        for i in range(instances):
            start = time.perf_counter()
            history, scores = numpy_train(X[i], Y[i], Z[i], v[i], (K0[i], Q0[i]) if factored else W0[i], steps,
                                          factored, record)
            alpha = np.argmax(scores, axis=1)
            seconds["train_s"] += time.perf_counter() - start
            selections.setdefault(name, []).append(alpha)
            for norm in ("fro", "nuc"):
                start = time.perf_counter()
                W = cvxpy_svm(X[i], Z[i], alpha, norm)
                seconds["svm_s"] += time.perf_counter() - start
                svms.setdefault((name, norm), []).append(W)
                corr.setdefault((name, norm), []).append(_cosine(history, W))
    seconds["total_s"] = seconds["train_s"] + seconds["svm_s"]
    as_arrays = lambda table: {k: np.asarray(v) for k, v in table.items()}
    return seconds, as_arrays(corr), as_arrays(selections), as_arrays(svms), record


def _violation(X, Z, alpha, W):
    """Largest constraint violation max_k (1 - <A_k, W>)_+ of W for the selection alpha."""
    return float(np.max(np.maximum(1 - _rows(X, Z, alpha) @ W.ravel(), 0)))


def compare_svms(problems, alphas, ours, theirs, norm):
    """Objectives, violations and KKT residuals of our SVMs (SVMResult, batch) and cvxpy's (W (batch, d, d))
    of the same selections."""
    X, Z = np.asarray(problems.X), np.asarray(problems.Z)
    obj_theirs = np.array([_norm(W, norm) for W in theirs])
    obj_ours = np.asarray(ours.objective)
    return {
        "max_rel_objective_difference": float(np.nanmax(np.abs(obj_ours - obj_theirs) / obj_theirs)),
        "median_rel_objective_difference": float(np.nanmedian(np.abs(obj_ours - obj_theirs) / obj_theirs)),
        "cvxpy_above_ours": float(np.nanmedian((obj_theirs - obj_ours) / obj_ours)),
        **{f"max_violation_{side}": max(_violation(X[k], Z[k], alphas[k], W) for k, W in enumerate(Ws))
           for side, Ws in (("ours", np.asarray(ours.solution)), ("cvxpy", theirs))},
        "max_kkt_residual_ours": float(np.max(ours.kkt_residual)),
    }


def attnopt_runs(instances, steps, repeats):
    """local_converge cold (uncached compile) and warm (median of ``repeats`` calls): (timing, results)."""
    settings = dict(instances=instances, steps=steps, report_steps=[s for s in REPORT if s <= steps], eps=0.0)
    with _timing.uncached():
        start = time.perf_counter()
        results, _ = local_converge(**settings)
        cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        results, _ = local_converge(**settings)
        warm.append(time.perf_counter() - start)
    return {"cold_s": cold, "warm_s": float(np.median(warm)), "warm_runs_s": warm}, results


def svm_benchmark(instances, repeats):
    """Frobenius and nuclear-norm W-SVMs of the optimal tokens: one vmapped native solve (cold and warm)
    against cvxpy per instance (its default solver, and Clarabel, an interior point, for the SDP), and
    the accuracy of both."""
    problems, *_ = local_converge_data(1, instances, N, T, D, "float64")
    alphas = jax.vmap(optimal_tokens)(problems)
    X, Z, al = np.asarray(problems.X), np.asarray(problems.Z), np.asarray(alphas)
    rows = []
    for norm, solvers in (("fro", ["CLARABEL"]), ("nuc", ["SCS", "CLARABEL"])):
        batched = jax.jit(jax.vmap(lambda p, a: attention_svm(p, a, norm=norm)))
        with _timing.uncached():
            start = time.perf_counter()
            ours = jax.block_until_ready(batched(problems, alphas))
            cold = time.perf_counter() - start
        warm = _timing.median_times({"native": lambda: batched(problems, alphas)}, repeats=repeats)["native"]
        for solver in solvers:
            start = time.perf_counter()
            theirs = np.asarray([cvxpy_svm(X[i], Z[i], al[i], norm, solver) for i in range(instances)])
            cvx = time.perf_counter() - start
            rows.append({"svm": norm, "cvxpy": solver, "instances": instances, "native_cold_s": cold,
                         "native_warm_s": warm, "cvxpy_s": cvx, "speedup_warm": cvx / warm, "speedup_cold": cvx / cold,
                         **compare_svms(problems, al, ours, theirs, norm)})
    return rows


def corr_rows(ours, corr, record):
    """Per parametrisation and norm: median [p10, p90] corr at the last two report steps on both sides."""
    rows = []
    for name in ("W", "KQ"):
        mine = ours["parametrisations"][name]
        for norm in ("fro", "nuc"):
            row = {"params": name, "svm": norm}
            for s in record[-2:]:
                c = corr[(name, norm)][:, record.index(s)]
                row[f"attnopt@{s}"] = "{median:.4f} [{p10:.3f}, {p90:.3f}]".format(**mine[f"corr_{norm}"][str(s)])
                p10, median, p90 = np.nanpercentile(c, [10, 50, 90])
                row[f"numpy@{s}"] = f"{median:.4f} [{p10:.3f}, {p90:.3f}]"
            rows.append(row)
    return rows


def reference_svm_accuracy(selections, svms, instances):
    """attnopt's W-SVMs of the reference's own selections (both parametrisations) against its cvxpy SVMs."""
    problems, *_ = local_converge_data(0, instances, N, T, D, "float64")
    both = jax.tree.map(lambda x: np.concatenate([x, x]), problems)
    alphas = np.concatenate([selections["W"], selections["KQ"]])
    rows = []
    for norm in ("fro", "nuc"):
        ours = jax.jit(jax.vmap(lambda p, a: attention_svm(p, a, norm=norm)))(both, alphas)
        theirs = np.concatenate([svms[("W", norm)], svms[("KQ", norm)]])
        rows.append({"svm": norm, "selections": len(alphas), **compare_svms(both, alphas, ours, theirs, norm)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100, help="random instances (the recorded run: 100)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="warm calls of the attnopt side")
    parser.add_argument("--out", default="benchmarks/results/maxmargin.json")
    args = parser.parse_args(argv)
    info = {**_timing.machine(), "load_average_start": os.getloadavg()}
    print(_timing.describe(info))

    timing, ours = attnopt_runs(args.instances, args.steps, args.repeats)
    reference, corr, selections, svms, record = numpy_reference(args.instances, args.steps)
    timing.update({f"numpy_cvxpy_{k}": v for k, v in reference.items()})
    timing["speedup_cold"] = reference["total_s"] / timing["cold_s"]
    timing["speedup_warm"] = reference["total_s"] / timing["warm_s"]
    print(f"\nlocal_converge: {args.instances} instances x (W, KQ), {args.steps} NGD steps, Frobenius + nuclear W-SVMs")
    print(_timing.format_table([timing], [k for k in timing if k != "warm_runs_s"]))
    rows = corr_rows(ours, corr, record)
    print("\ncorr with the SVM of each side's final selection, median [p10, p90] "
          "(attnopt: exact gradient, eps 0; numpy: the notebook's gradient, ||g|| + 2.2e-16)")
    print(_timing.format_table(rows, list(rows[0])))
    svm_accuracy = reference_svm_accuracy(selections, svms, args.instances)
    print("\nthe reference's selections: attnopt's W-SVMs against its cvxpy W-SVMs")
    print(_timing.format_table(svm_accuracy, list(svm_accuracy[0])))
    svm_rows = svm_benchmark(args.instances, repeats=args.repeats)
    print("\nW-SVMs of the optimal tokens: one vmapped native solve vs cvxpy per instance")
    print(_timing.format_table(svm_rows, list(svm_rows[0])))
    info["load_average_end"] = os.getloadavg()  # other processes on the machine (1, 5, 15 min)
    path = _timing.write_json(args.out, {
        "benchmark": "maxmargin", "machine": info,
        "command": " ".join(["python", "benchmarks/maxmargin.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"instances": args.instances, "steps": args.steps, "n": N, "T": T, "d": D, "learning_rate": LR},
        "local_converge": {"timing": timing, "corr": rows, "svm_accuracy": svm_accuracy, "attnopt_results": ours},
        "svm": svm_rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
