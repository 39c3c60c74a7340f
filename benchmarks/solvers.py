"""Solvers: time to a gradient norm of 1e-9, and batched vs looped throughput.

1. On an ill-conditioned, regularised SoftmaxRegression (n=4096, d=64,
   cond(A)=100, reg=1e-3, float64) from x0 = 0: attnopt ``newton``,
   ``newton_cg`` and ``trust_region`` against SciPy ``trust-exact`` (jitted
   ``jax.hessian`` and ``jax.value_and_grad``), SciPy ``trust-ncg`` (jitted
   jvp-of-grad HVP), and ``optax.lbfgs`` in a ``lax.while_loop`` (optax's
   documented pattern; the baselines are those of ``benchmarks/peers.py``, which
   compares more peers on more instances). Every jitted function is compiled
   before timing; times are medians of interleaved repeats;
   ``ratio = method time / newton time``.
2. Throughput: 256 instances (n=256, d=16; also n=64, d=8) solved by one
   jitted ``vmap`` of ``attnopt.solvers.solve`` (all instances step in
   lockstep until the last one stops) and by ``solve_batch`` with its default
   plan (on CPU: groups of ``chunk_size`` instances, one group after another;
   see ``attnopt.solvers.loop.auto_chunk_size``) against a Python loop of single
   (jitted) solves, all compiled before timing, same tolerance and budget;
   ``throughput_ratio = loop time / vmapped time``.

    python benchmarks/solvers.py [--out benchmarks/results/solvers.json] [--quick]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
import peers  # noqa: E402  (sets up float64 and attnopt's runtime defaults)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnopt.problems import stack  # noqa: E402
from attnopt.problems.registry import make  # noqa: E402
from attnopt.solvers import newton, newton_cg, solve, solve_batch  # noqa: E402
from attnopt.solvers.loop import auto_chunk_size  # noqa: E402
from attnopt.solvers.trust_region import trust_region  # noqa: E402

TOL = peers.TOL
MAX_STEPS = 1000


def instance(key, n, d):
    return make("softmax", key, n=n, d=d, cond=100.0, reg=1e-3, noise=0.1, scale=2.0)


# ----------------------------------------------------------------------------- baselines (shared with peers.py)


def loss(problem, x):
    return problem.loss(x)


def scipy_minimize(problem, x0, method):
    """SciPy ``method`` with jitted autodiff derivatives; returns (x, iterations)."""
    return peers.scipy_method(method)(loss, problem, x0)


def optax_lbfgs(problem, x0):
    """optax.lbfgs in a while_loop, as in optax's L-BFGS documentation; returns (x, iterations)."""
    return peers.optax_lbfgs(loss, problem, x0)


# ----------------------------------------------------------------------------- benchmarks


def time_to_tolerance(n, d, repeats):
    inst = instance(jax.random.PRNGKey(0), n, d)
    problem, x0 = inst.problem, inst.x0
    methods = {
        "attnopt.newton": lambda: (lambda r: (r.state.params, r.steps))(
            solve(problem, x0, newton(), max_steps=MAX_STEPS, tol=TOL)),
        "attnopt.newton_cg": lambda: (lambda r: (r.state.params, r.steps))(
            solve(problem, x0, newton_cg(), max_steps=MAX_STEPS, tol=TOL)),
        "attnopt.trust_region": lambda: (lambda r: (r.state.params, r.steps))(
            solve(problem, x0, trust_region(), max_steps=MAX_STEPS, tol=TOL)),
        "scipy.trust-exact": lambda: scipy_minimize(problem, x0, "trust-exact"),
        "scipy.trust-ncg": lambda: scipy_minimize(problem, x0, "trust-ncg"),
        "optax.lbfgs": lambda: optax_lbfgs(problem, x0),
    }
    times = _timing.median_times(methods, repeats=repeats, warmup=1, min_sample_s=0.0, max_total_s=90.0)
    rows = []
    for name, run in methods.items():
        x, iterations = run()
        grad_norm = float(jnp.linalg.norm(jax.grad(problem.loss)(jnp.asarray(x))))
        rows.append({
            "method": name, "time_s": times[name], "iterations": int(iterations), "grad_norm": grad_norm,
            "reached_tol": grad_norm <= TOL, "ratio_to_newton": times[name] / times["attnopt.newton"],
        })
    return {"n": n, "d": d, "cond": 100.0, "reg": 1e-3, "tol": TOL, "rows": rows}


def batched_throughput(batch, n, d, repeats):
    keys = jax.random.split(jax.random.PRNGKey(1), batch)
    instances = [instance(k, n, d) for k in keys]
    problems = stack([i.problem for i in instances])
    x0s = jnp.stack([i.x0 for i in instances])
    solver = newton()
    vmapped = jax.jit(jax.vmap(lambda p, x: solve(p, x, solver, max_steps=MAX_STEPS, tol=TOL)))

    def chunked():  # the default plan (chunk_size="auto")
        return solve_batch(problems, x0s, solver, max_steps=MAX_STEPS, tol=TOL)

    def loop():
        return [solve(i.problem, i.x0, solver, max_steps=MAX_STEPS, tol=TOL) for i in instances]

    times = _timing.median_times(
        {"vmapped": lambda: vmapped(problems, x0s), "chunked": chunked, "loop": loop},
        repeats=repeats, warmup=1, min_sample_s=0.0, max_total_s=60.0,
    )
    batched = vmapped(problems, x0s)
    looped = loop()
    agree = max(float(jnp.max(jnp.abs(batched.state.params[i] - r.state.params))) for i, r in enumerate(looped))
    agree = max(agree, float(jnp.max(jnp.abs(chunked().state.params - batched.state.params))))
    return {
        "batch": batch, "n": n, "d": d, "solver": "newton",
        "vmapped_s": times["vmapped"], "chunked_s": times["chunked"], "loop_s": times["loop"],
        "chunk_size": auto_chunk_size(problems, x0s, jax.default_backend()),
        "vmapped_per_s": batch / times["vmapped"], "loop_per_s": batch / times["loop"],
        "throughput_ratio": times["loop"] / times["vmapped"],
        "chunked_throughput_ratio": times["loop"] / times["chunked"],
        "converged": int(jnp.sum(batched.converged)), "max_param_difference": agree,
        # lockstep: the vmapped solve runs max_steps_taken steps for every instance
        "max_steps_taken": int(jnp.max(batched.steps)), "mean_steps_taken": float(jnp.mean(batched.steps)),
    }


def main(argv=None):
    args = _timing.parse_args(argv, __doc__, "solvers", repeats=7)
    n, d = (1024, 32) if args.quick else (4096, 64)
    throughput_sizes = [(32, 64, 8)] if args.quick else [(256, 256, 16), (256, 64, 8)]  # (batch, n, d); target: first
    repeats = 3 if args.quick else args.repeats

    info = _timing.machine()
    print(_timing.describe(info))
    start = time.perf_counter()
    tol_result = time_to_tolerance(n, d, repeats)
    print(f"time to gradient norm {TOL:g}: SoftmaxRegression n={n} d={d} cond(A)=100 reg=1e-3 float64")
    print("ratio = method time / attnopt.newton time (> 1: newton faster)")
    print(_timing.format_table(tol_result["rows"], ["method", "time_s", "iterations", "grad_norm", "reached_tol", "ratio_to_newton"]))
    batch_results = [batched_throughput(*size, repeats) for size in throughput_sizes]
    print("\nthroughput: newton, one vmapped solve and solve_batch (default plan, chunk_size column) vs a loop of"
          " single solves (ratios = loop time / their time)")
    print(_timing.format_table(batch_results, [
        "batch", "n", "d", "vmapped_s", "chunked_s", "chunk_size", "loop_s", "throughput_ratio", "chunked_throughput_ratio",
        "converged", "max_steps_taken", "mean_steps_taken",
    ]))

    ratio = {r["method"]: r["ratio_to_newton"] for r in tol_result["rows"]}
    targets = {
        "newton_3x_faster_than_trust_exact": ratio["scipy.trust-exact"] >= 3,
        "newton_10x_faster_than_optax_lbfgs": ratio["optax.lbfgs"] >= 10,
        "batched_20x_loop_throughput": batch_results[0]["throughput_ratio"] >= 20,
    }
    print("targets:", targets, f"({time.perf_counter() - start:.0f}s)")
    path = _timing.write_json(args.out, {
        "benchmark": "solvers", "dtype": "float64", "machine": info, "repeats": repeats,
        "time_to_tolerance": tol_result, "throughput": batch_results, "targets": targets,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
