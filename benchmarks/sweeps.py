"""Sweeps and gradients through solves: one vmapped call vs a Python loop, and jax.grad vs the solve.

1. A grid of 16 learning rates x 8 seeds (128 runs of zeroth-order SPSA, and
   of normalized GD from 8 seeded starts) on one softmax regression, as one
   vmapped ``attnopt.solve`` against a Python loop of 128 single jitted solves
   of the same solver (compiled once: the rates and seeds are traced).
2. ``jax.grad`` of a function of the solution with respect to the data
   (implicit function theorem) against the solve alone, for softmax,
   matrix softmax and attention regression.

    python benchmarks/sweeps.py [--out benchmarks/results/sweeps.json] [--quick]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _timing  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from attnopt.problems.registry import make  # noqa: E402
from attnopt.solvers import alternating, newton, normalized_gd, solve, zeroth_order  # noqa: E402

STEPS = 200


def sweep(kind: str, n: int, d: int, repeats: int) -> dict:
    """128 runs (16 rates x 8 seeds): one vmapped solve vs a loop of single solves."""
    inst = make("softmax", jax.random.key(0), n=n, d=d, cond=10.0, reg=0.1, noise=0.1, scale=2.0)
    lrs = jnp.repeat(jnp.geomspace(1e-3, 0.3, 16), 8)
    seeds = jnp.tile(jnp.arange(8), 16)
    starts = 0.5 * jax.random.normal(jax.random.key(1), (8, d))

    def run(lr, seed):
        if kind == "zeroth_order":
            return solve(inst.problem, inst.x0, zeroth_order(lr, seed=seed), max_steps=STEPS, tol=0.0)
        return solve(inst.problem, starts[seed], normalized_gd(lr), max_steps=STEPS, tol=0.0)

    vmapped = jax.jit(jax.vmap(run))
    pairs = list(zip(lrs.tolist(), seeds.tolist()))
    times = _timing.median_times(
        {"vmapped": lambda: vmapped(lrs, seeds), "loop": lambda: [run(lr, s) for lr, s in pairs]},
        repeats=repeats, warmup=1, max_total_s=120,
    )
    batched = vmapped(lrs, seeds)
    agree = max(float(jnp.max(jnp.abs(batched.state.params[k] - run(*pairs[k]).state.params))) for k in (0, 77, 127))
    return {
        "solver": kind, "runs": 128, "steps": STEPS, "n": n, "d": d,
        "vmapped_s": times["vmapped"], "loop_s": times["loop"], "speedup": times["loop"] / times["vmapped"],
        "max_param_difference": agree,
    }


def gradient_cost(name: str, repeats: int) -> dict:
    """jax.grad of <w, x*> + L(x*) with respect to the data, against the solve alone."""
    if name == "attention":
        inst, field, solver = make("attention", jax.random.key(2), n=32, d=4, noise=0.05, start="near"), "B", alternating()
    elif name == "matrix_softmax":
        inst, field, solver = make(name, jax.random.key(1), n=32, d=4, reg=0.3, ridge=1e-2, noise=0.2), "B", newton()
    else:
        inst, field, solver = make(name, jax.random.key(0), n=1024, d=32, reg=0.3, ridge=1e-2, noise=0.2), "b", newton()
    problem = inst.problem
    weights = jnp.ones(ravel_pytree(inst.x0)[0].size)

    def objective(data):
        state = solve(problem.replace(**{field: data}), inst.x0, solver, max_steps=100, tol=1e-10).state
        return ravel_pytree(state.params)[0] @ weights + state.value

    data = getattr(problem, field)
    value, grad = jax.jit(objective), jax.jit(jax.grad(objective))
    times = _timing.median_times({"solve": lambda: value(data), "grad": lambda: grad(data)}, repeats=repeats)
    return {
        "problem": name, "params": int(weights.size), "data": int(data.size), "solve_s": times["solve"],
        "grad_s": times["grad"], "grad_over_solve": times["grad"] / times["solve"],
        "grad_finite": bool(jnp.all(jnp.isfinite(grad(data)))),
    }


def main(argv=None):
    args = _timing.parse_args(argv, __doc__, "sweeps", repeats=5)
    repeats = 3 if args.quick else args.repeats
    n, d = (64, 4) if args.quick else (256, 8)
    info = _timing.machine()
    print(_timing.describe(info))
    start = time.perf_counter()
    sweeps = [sweep(kind, n, d, repeats) for kind in ("zeroth_order", "normalized_gd")]
    print(f"\n128-run sweep (16 learning rates x 8 seeds, {STEPS} steps): one vmapped call vs a loop of single solves")
    print(_timing.format_table(sweeps, ["solver", "n", "d", "vmapped_s", "loop_s", "speedup", "max_param_difference"]))
    grads = [gradient_cost(name, repeats) for name in ("softmax", "matrix_softmax", "attention")]
    print("\njax.grad through a solve (implicit function theorem) vs the solve alone")
    print(_timing.format_table(grads, ["problem", "params", "data", "solve_s", "grad_s", "grad_over_solve", "grad_finite"]))
    print(f"({time.perf_counter() - start:.0f}s)")
    path = _timing.write_json(args.out, {
        "benchmark": "sweeps", "dtype": "float64", "machine": info, "repeats": repeats,
        "sweeps": sweeps, "gradients": grads,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
