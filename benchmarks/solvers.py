"""Solvers: time to a gradient norm of 1e-9, and batched vs looped throughput.

1. On an ill-conditioned, regularised SoftmaxRegression (n=4096, d=64,
   cond(A)=100, reg=1e-3, float64) from x0 = 0: attnopt ``newton`` and
   ``newton_cg`` against SciPy ``trust-exact`` (jitted ``jax.hessian`` and
   ``jax.value_and_grad``), SciPy ``trust-ncg`` (jitted jvp-of-grad HVP), and
   ``optax.lbfgs`` in a ``lax.while_loop`` (optax's documented pattern). Every
   jitted function is compiled before timing; times are medians of interleaved
   repeats; ``ratio = method time / newton time``.
2. Throughput: 256 instances (n=256, d=16; also n=64, d=8) solved by one
   jitted ``vmap`` of ``attnopt.solvers.solve`` (all instances step in
   lockstep until the last one stops) and by ``solve_batch(...,
   chunk_size=4)`` (lockstep groups of 4, one after another) against a
   Python loop of single (jitted) solves, all compiled before timing, same
   tolerance and budget; ``throughput_ratio = loop time / vmapped time``.

    python benchmarks/solvers.py [--out benchmarks/results/solvers.json] [--quick]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
import scipy.optimize

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

from attnopt.problems import stack  # noqa: E402
from attnopt.problems.registry import make  # noqa: E402
from attnopt.solvers import newton, newton_cg, solve, solve_batch  # noqa: E402

TOL = 1e-9
MAX_STEPS = 1000
CHUNK_SIZE = 4  # instances per lockstep group in solve_batch(chunk_size=...); small groups suit a CPU


def instance(key, n, d):
    return make("softmax", key, n=n, d=d, cond=100.0, reg=1e-3, noise=0.1, scale=2.0)


# ----------------------------------------------------------------------------- baselines

value_and_grad = jax.jit(lambda p, x: jax.value_and_grad(p.loss)(x))
autodiff_hessian = jax.jit(lambda p, x: jax.hessian(p.loss)(x))
autodiff_hvp = jax.jit(lambda p, x, v: jax.jvp(jax.grad(p.loss), (x,), (v,))[1])


def scipy_minimize(problem, x0, method):
    """SciPy ``method`` with jitted autodiff derivatives; returns (x, iterations)."""
    fun = lambda x: tuple(np.asarray(a) for a in value_and_grad(problem, x))
    derivatives = (
        {"hess": lambda x: np.asarray(autodiff_hessian(problem, x))}
        if method == "trust-exact"
        else {"hessp": lambda x, v: np.asarray(autodiff_hvp(problem, x, v))}
    )
    res = scipy.optimize.minimize(
        fun, np.asarray(x0), jac=True, method=method, options={"gtol": TOL, "maxiter": MAX_STEPS}, **derivatives
    )
    return res.x, res.nit


@jax.jit
def optax_lbfgs(problem, x0):
    """optax.lbfgs in a while_loop, as in optax's L-BFGS documentation; returns (x, iterations)."""
    opt = optax.lbfgs()
    value_and_grad_fn = optax.value_and_grad_from_state(problem.loss)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad_fn(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=problem.loss)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        return (count == 0) | ((count < MAX_STEPS) & (optax.tree.norm(grad) >= TOL))

    params, state = jax.lax.while_loop(keep_going, step, (x0, opt.init(x0)))
    return params, optax.tree.get(state, "count")


# ----------------------------------------------------------------------------- benchmarks


def time_to_tolerance(n, d, repeats):
    inst = instance(jax.random.PRNGKey(0), n, d)
    problem, x0 = inst.problem, inst.x0
    methods = {
        "attnopt.newton": lambda: (lambda r: (r.state.params, r.steps))(
            solve(problem, x0, newton(), max_steps=MAX_STEPS, tol=TOL)),
        "attnopt.newton_cg": lambda: (lambda r: (r.state.params, r.steps))(
            solve(problem, x0, newton_cg(), max_steps=MAX_STEPS, tol=TOL)),
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

    def chunked():
        return solve_batch(problems, x0s, solver, max_steps=MAX_STEPS, tol=TOL, chunk_size=CHUNK_SIZE)

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
        "vmapped_s": times["vmapped"], "chunked_s": times["chunked"], "chunk_size": CHUNK_SIZE, "loop_s": times["loop"],
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
    print(f"\nthroughput: newton, one vmapped solve and solve_batch(chunk_size={CHUNK_SIZE}) vs a loop of single solves"
          " (ratios = loop time / their time)")
    print(_timing.format_table(batch_results, [
        "batch", "n", "d", "vmapped_s", "chunked_s", "loop_s", "throughput_ratio", "chunked_throughput_ratio",
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
