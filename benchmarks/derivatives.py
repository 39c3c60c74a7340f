"""Hand-derived derivatives vs autodiff: grad, HVP and Hessian of the vector problems.

For each registered vector problem and each size (n, d), in float64, jitted and
warmed up, this times the problem's ``grad``, ``hvp`` and ``hessian`` against
``jax.grad(loss)``, ``jax.jvp(jax.grad(loss))`` and ``jax.hessian(loss)`` of
the problem's own ``loss``, and reports ``ratio = autodiff time / ours``
(> 1 means the hand-derived formula is faster). The problem is an argument of
every jitted function (not a closed-over constant), so XLA cannot fold the data.

    python benchmarks/derivatives.py [--out benchmarks/results/derivatives.json] [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

from attnopt.problems.registry import make  # noqa: E402

PROBLEMS = ("softmax", "rescaled_exp", "rescaled_cosh", "rescaled_sinh", "resnet_softmax")
SIZES = ((1024, 32), (4096, 64), (16384, 128))

OURS = {
    "grad": jax.jit(lambda p, x, v: p.grad(x)),
    "hvp": jax.jit(lambda p, x, v: p.hvp(x, v)),
    "hessian": jax.jit(lambda p, x, v: p.hessian(x)),
}
AUTODIFF = {
    "grad": jax.jit(lambda p, x, v: jax.grad(p.loss)(x)),
    "hvp": jax.jit(lambda p, x, v: jax.jvp(jax.grad(p.loss), (x,), (v,))[1]),
    "hessian": jax.jit(lambda p, x, v: jax.hessian(p.loss)(x)),
}


def instance(name, n, d, seed=0):
    """A regularised instance and a random point (x, direction v) inside its domain."""
    key = jax.random.PRNGKey(seed)
    inst = make(name, key, n=n, d=d, cond=10.0, reg=0.1, ridge=1e-3)
    k_x, k_v = jax.random.split(jax.random.fold_in(key, 1))
    x = inst.solution + 0.3 * jax.random.normal(k_x, (d,)) / d**0.5
    v = jax.random.normal(k_v, (d,))
    if not bool(inst.problem.in_domain(x)):
        raise RuntimeError(f"{name}: benchmark point outside the domain")
    return inst.problem, x, v


def bench(name, n, d, repeats, max_total_s):
    problem, x, v = instance(name, n, d)
    t = {}
    for q in OURS:  # each pair interleaved on its own, so a Hessian never precedes a timed gradient
        fns = {f"ours.{q}": lambda f=OURS[q]: f(problem, x, v), f"autodiff.{q}": lambda f=AUTODIFF[q]: f(problem, x, v)}
        t.update(_timing.median_times(fns, repeats=repeats, max_total_s=max_total_s))
    row = {"problem": name, "n": n, "d": d}
    for q in OURS:
        row[f"{q}_ours_s"] = t[f"ours.{q}"]
        row[f"{q}_autodiff_s"] = t[f"autodiff.{q}"]
        row[f"{q}_ratio"] = t[f"autodiff.{q}"] / t[f"ours.{q}"]
    return row


def main(argv=None):
    args = _timing.parse_args(argv, __doc__, "derivatives", repeats=21)
    sizes = SIZES[:1] if args.quick else SIZES
    repeats = 5 if args.quick else args.repeats

    info = _timing.machine()
    print(_timing.describe(info))
    rows = []
    for n, d in sizes:
        for name in PROBLEMS:
            rows.append(bench(name, n, d, repeats, max_total_s=8.0))
            print(f"  {name} n={n} d={d} done", file=sys.stderr, flush=True)

    columns = ["problem", "n", "d", "grad_ratio", "hvp_ratio", "hessian_ratio", "hessian_ours_s"]
    print("time ratio = autodiff / ours (> 1: ours faster)")
    print(_timing.format_table(rows, columns))
    soft = [r for r in rows if r["problem"] == "softmax" and (r["n"], r["d"]) == (4096, 64)]
    targets = {
        "hessian_softmax_4096x64_ge_3": soft[0]["hessian_ratio"] >= 3 if soft else None,
        "grad_hvp_ours_over_autodiff_le_1.1": all(
            1 / r[f"{q}_ratio"] <= 1.1 for r in rows for q in ("grad", "hvp")
        ),
    }
    print("targets:", targets)
    path = _timing.write_json(
        args.out,
        {"benchmark": "derivatives", "dtype": "float64", "machine": info, "repeats": repeats,
         "targets": targets, "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
