"""Peers: attnopt's solvers against SciPy, optax, optimistix and jaxopt, to a gradient norm of 1e-9.

1. Time to ``||grad|| <= 1e-9`` from x0 = 0 (float64) on seeded instance families,
   each the total over its seeds (every instance compiled once per shape, then
   timed as medians of interleaved repeats, ``_timing.median_times``):

   - easy:    softmax n=4096, d=64, cond 10, reg 1e-2, noise 0.3, |x*| about 6
   - hard:    softmax n=4096, d=64, cond 100, reg 1e-3, noise 0.3, |x*| about 6
   - indefinite: unregularised softmax n=2048, d=32, |x*| about 6 (indefinite Hessians)
   - d256:    the hard configuration at n=8192, d=256
   - tall:    softmax n=65536, d=16, cond 10, reg 1e-2, noise 0.3, |x*| about 3 (n >> d: approx_newton samples)
   - rescaled_exp: rescaled exp regression n=4096, d=64, reg 0.1, noise 0.3
   - resnet:  softmax + ResNet regression n=4096, d=64, cond 10, reg 1e-3, noise 0.3, |x*| about 3
   - matrix:  matrix softmax regression n=64, d=8 (X 8 x 8), reg 1e-3, noise 0.3, |x*| about 3

   Peers: SciPy ``trust-exact`` (jitted ``jax.hessian``), ``trust-ncg`` (jitted
   jvp-of-grad HVP) and ``L-BFGS-B`` (jitted value and gradient; gtol on the
   inf-norm set to 1e-9 / sqrt(N), ftol 0); ``optax.lbfgs`` in a ``lax.while_loop``
   stopped on the gradient norm; optimistix ``BFGS`` and ``LBFGS`` (their Cauchy
   test: rtol = atol set to the loosest of 1e-6 ... 1e-14 that reaches the
   tolerance on every seed, found by untimed runs); jaxopt ``LBFGS`` and ``BFGS``
   (tol on the gradient norm). A peer that is not installed is skipped and named.
   Every final point is checked with the problem's own gradient; a method that
   misses the tolerance on any seed is marked and never counted as fastest.
2. Throughput on 256 instances (n=256, d=16 and n=1024, d=32, the hard
   configuration at |x*| about 2): ``solve_batch`` (its default plan) and one
   lockstep ``vmap`` of attnopt's newton and trust_region, a Python loop of single
   solves, and vmapped optimistix BFGS and optax.lbfgs.
3. OpenBLAS threads: newton at n=8192, d=256 with one OpenBLAS thread (attnopt's
   default, ``attnopt._runtime``) and with one per core, switched within the run.

    python benchmarks/peers.py [--out benchmarks/results/peers.json] [--repeats 5] [--quick]
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

import attnopt._runtime as runtime  # noqa: E402  (before JAX loads LAPACK: one OpenBLAS thread)
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optax.tree  # noqa: E402
import scipy.optimize  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from attnopt.problems import stack  # noqa: E402
from attnopt.problems.registry import make  # noqa: E402
from attnopt.solvers import approx_newton, newton, newton_cg, solve, solve_batch  # noqa: E402
from attnopt.solvers.trust_region import trust_region  # noqa: E402

TOL = 1e-9
MAX_STEPS = 500  # attnopt's Newton-type solvers
PEER_STEPS = 10_000  # first-order and quasi-Newton peers
OPTIONAL = ("optimistix", "jaxopt")
INSTALLED = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}
if INSTALLED["optimistix"]:
    import optimistix as optx
if INSTALLED["jaxopt"]:
    import jaxopt

K = jax.random.PRNGKey
HARD = dict(cond=100.0, reg=1e-3, noise=0.3, scale=6.0)
FAMILIES = {
    # name: (generator, options, seeds, quick options)
    "easy": ("softmax", dict(n=4096, d=64, cond=10.0, reg=1e-2, noise=0.3, scale=6.0), range(3), dict(n=1024, d=32)),
    "hard": ("softmax", dict(n=4096, d=64, **HARD), range(8), dict(n=1024, d=32)),
    "indefinite": ("softmax", dict(n=2048, d=32, scale=6.0), range(3), dict(n=512, d=16)),
    "d256": ("softmax", dict(n=8192, d=256, **HARD), range(2), dict(n=2048, d=64)),
    "tall": ("softmax", dict(n=65536, d=16, cond=10.0, reg=1e-2, noise=0.3, scale=3.0), range(3), dict(n=8192, d=8)),
    "rescaled_exp": ("rescaled_exp", dict(n=4096, d=64, reg=0.1, noise=0.3), range(3), dict(n=1024, d=32)),
    "resnet": ("resnet_softmax", dict(n=4096, d=64, cond=10.0, reg=1e-3, noise=0.3, scale=3.0), range(3),
               dict(n=1024, d=32)),
    "matrix": ("matrix_softmax", dict(n=64, d=8, reg=1e-3, noise=0.3, scale=3.0), range(3), dict(n=32, d=4)),
}
ATTNOPT = {
    "attnopt.newton": newton(),
    "attnopt.trust_region": trust_region(),
    "attnopt.trust_region(max_reuse=0)": trust_region(max_reuse=0),
    "attnopt.trust_region(cg)": trust_region("cg"),
    "attnopt.newton_cg": newton_cg(),
    "attnopt.approx_newton(0.5)": approx_newton(0.5),
}
QUASI_NEWTON = ("optax.lbfgs", "optimistix.BFGS", "optimistix.LBFGS", "jaxopt.LBFGS", "jaxopt.BFGS", "scipy.L-BFGS-B")


# ----------------------------------------------------------------------------- peers on flat parameters


def flat(problem, x0):
    """(loss of flat y, flat x0, unravel): the peers work on vectors."""
    y0, unravel = ravel_pytree(x0)
    return (lambda p, y: p.loss(unravel(y))), y0, unravel


@functools.cache
def jitted_derivatives(loss):
    """Jitted autodiff of ``loss(problem, y)``: value and gradient, Hessian, HVP (compiled once per loss)."""
    grad = jax.grad(loss, argnums=1)
    return (
        jax.jit(jax.value_and_grad(loss, argnums=1)),
        jax.jit(jax.hessian(loss, argnums=1)),
        jax.jit(lambda p, y, v: jax.jvp(lambda z: grad(p, z), (y,), (v,))[1]),
    )


def scipy_method(method):
    """SciPy ``minimize(method)`` with jitted JAX callbacks; run(loss, problem, y0) -> (y, iterations)."""

    def run(loss, problem, y0):
        value_and_grad, hess, hvp = jitted_derivatives(loss)
        fun = lambda y: tuple(np.asarray(a) for a in value_and_grad(problem, y))
        options = {"maxiter": PEER_STEPS}
        if method == "trust-exact":
            extra = {"hess": lambda y: np.asarray(hess(problem, y))}
            options["gtol"] = TOL
        elif method == "trust-ncg":
            extra = {"hessp": lambda y, v: np.asarray(hvp(problem, y, v))}
            options["gtol"] = TOL
        else:  # L-BFGS-B: gtol bounds the largest |g_i|, so TOL / sqrt(N) bounds ||g||
            extra = {}
            options.update(gtol=TOL / np.sqrt(y0.size), ftol=0.0, maxfun=PEER_STEPS)
        res = scipy.optimize.minimize(fun, np.asarray(y0), jac=True, method=method, options=options, **extra)
        return jnp.asarray(res.x), res.nit

    return run


@functools.partial(jax.jit, static_argnums=0)
def optax_lbfgs(loss, problem, y0):
    """optax.lbfgs in a while_loop (optax's documented pattern), stopped on the gradient norm."""
    fn = functools.partial(loss, problem)
    opt = optax.lbfgs()
    value_and_grad_fn = optax.value_and_grad_from_state(fn)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad_fn(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fn)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        return (count == 0) | ((count < PEER_STEPS) & (optax.tree.norm(grad) >= TOL))

    params, state = jax.lax.while_loop(keep_going, step, (y0, opt.init(y0)))
    return params, optax.tree.get(state, "count")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def optimistix_run(loss, kind, rtol, problem, y0):
    solver = getattr(optx, kind)(rtol=rtol, atol=rtol)
    sol = optx.minimise(lambda y, p: loss(p, y), solver, y0, args=problem, max_steps=PEER_STEPS, throw=False)
    return sol.value, sol.stats["num_steps"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def jaxopt_run(loss, kind, problem, y0):
    solver = getattr(jaxopt, kind)(fun=functools.partial(loss, problem), tol=TOL, maxiter=PEER_STEPS)
    result = solver.run(y0)
    return result.params, result.state.iter_num


def peers(loss):
    """name -> run(problem, y0) -> (y, iterations) for the installed peers; optimistix takes a tolerance."""
    out = {
        "scipy.trust-exact": functools.partial(scipy_method("trust-exact"), loss),
        "scipy.trust-ncg": functools.partial(scipy_method("trust-ncg"), loss),
        "scipy.L-BFGS-B": functools.partial(scipy_method("L-BFGS-B"), loss),
        "optax.lbfgs": functools.partial(optax_lbfgs, loss),
    }
    if INSTALLED["optimistix"]:
        for kind in ("BFGS", "LBFGS"):
            out[f"optimistix.{kind}"] = functools.partial(optimistix_run, loss, kind)
    if INSTALLED["jaxopt"]:
        for kind in ("LBFGS", "BFGS"):
            out[f"jaxopt.{kind}"] = functools.partial(jaxopt_run, loss, kind)
    return out


# ----------------------------------------------------------------------------- time to tolerance


def instances(family, quick):
    generator, options, seeds, small = FAMILIES[family]
    options = {**options, **(small if quick else {})}
    return [make(generator, K(seed), **options) for seed in (list(seeds)[:2] if quick else seeds)], options


def grad_norm(problem, x):
    return float(jnp.linalg.norm(ravel_pytree(problem.grad(x))[0]))


def attnopt_run(solver):
    """``solve`` under ``jax.jit``, like the jitted peers (a bare ``solve`` adds its Python-side checks per call)."""

    @jax.jit
    def run(problem, x0):
        result = solve(problem, x0, solver, max_steps=MAX_STEPS, tol=TOL)
        return result.state.params, result.steps

    return run


def timed(calls, reached, repeats):
    """Run every call once (compilation, warm-up) and check it with ``reached(name, output)``; time the
    calls that reached the tolerance (medians of interleaved repeats). Returns (outputs, times);
    a call that missed gets no time (it is never the fastest, and a slow miss would take the whole budget)."""
    outputs = {name: jax.block_until_ready(call()) for name, call in calls.items()}
    ok = {name: call for name, call in calls.items() if reached(name, outputs[name])}
    times = _timing.median_times(ok, repeats=repeats, warmup=1, min_sample_s=0.0, max_total_s=120.0)
    return outputs, times


def tune_optimistix(run, insts, unravel):
    """The loosest Cauchy tolerance at which optimistix reaches ||g|| <= TOL on every seed (or the tightest)."""
    for rtol in (1e-6, 1e-8, 1e-10, 1e-12, 1e-14):
        y = [run(rtol, i.problem, ravel_pytree(i.x0)[0])[0] for i in insts]
        if all(grad_norm(i.problem, unravel(yk)) <= TOL for i, yk in zip(insts, y)):
            return rtol
    return rtol


def time_to_tolerance(family, quick, repeats):
    insts, options = instances(family, quick)
    loss, y0, unravel = flat(insts[0].problem, insts[0].x0)
    methods = {}
    for name, solver in ATTNOPT.items():
        if all(isinstance(insts[0].problem, need) for need in solver.needs):
            methods[name] = (attnopt_run(solver), False)
    tuned = {}
    for name, run in peers(loss).items():
        if name.startswith("optimistix"):
            tuned[name] = tune_optimistix(run, insts, unravel)
            run = functools.partial(run, tuned[name])
        methods[name] = (run, True)

    def total(run, flat_params):
        def call():
            return [run(i.problem, ravel_pytree(i.x0)[0] if flat_params else i.x0) for i in insts]
        return call

    calls = {name: total(run, flat_params) for name, (run, flat_params) in methods.items()}
    norms = lambda name, out: [
        grad_norm(i.problem, unravel(x) if methods[name][1] else x) for i, (x, _) in zip(insts, out)
    ]
    outputs, times = timed(calls, lambda name, out: max(norms(name, out)) <= TOL, repeats)
    rows = []
    for name, out in outputs.items():
        rows.append({
            "method": name, "time_s": times.get(name), "iterations": "/".join(str(int(it)) for _, it in out),
            "total_iterations": sum(int(it) for _, it in out), "max_grad_norm": max(norms(name, out)),
            "reached_tol": name in times, **({"optimistix_rtol": tuned[name]} if name in tuned else {}),
        })
    return summarise(family, options, len(insts), rows)


def summarise(family, options, seeds, rows):
    """Ratios within the family: each time / the best attnopt time, and the headline comparisons."""
    ours = [r for r in rows if r["method"].startswith("attnopt") and r["reached_tol"]]
    best = min(ours, key=lambda r: r["time_s"]) if ours else None
    theirs = [r for r in rows if not r["method"].startswith("attnopt") and r["reached_tol"]]
    fastest = min(theirs, key=lambda r: r["time_s"]) if theirs else None
    quasi = [r for r in theirs if r["method"] in QUASI_NEWTON]
    fastest_quasi = min(quasi, key=lambda r: r["time_s"]) if quasi else None
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        if best is not None:
            r["time_ratio"] = None if r["time_s"] is None else r["time_s"] / best["time_s"]
            r["iteration_ratio"] = r["total_iterations"] / max(best["total_iterations"], 1)
    ratio = lambda r: None if r is None or best is None else r["time_s"] / best["time_s"]
    trust_exact = by_name.get("scipy.trust-exact")
    approx, exact = by_name.get("attnopt.approx_newton(0.5)"), by_name.get("attnopt.newton")
    return {
        "family": family, "options": options, "seeds": seeds, "tol": TOL, "rows": rows,
        "best_attnopt": best and best["method"], "fastest_peer": fastest and fastest["method"],
        "speedup_vs_fastest_peer": ratio(fastest),
        "speedup_vs_trust_exact": ratio(trust_exact) if trust_exact and trust_exact["reached_tol"] else None,
        "speedup_vs_fastest_quasi_newton": ratio(fastest_quasi),
        "fastest_quasi_newton": fastest_quasi and fastest_quasi["method"],
        "approx_newton_vs_newton": (
            exact["time_s"] / approx["time_s"] if approx and exact and approx["reached_tol"] else None
        ),
    }


# ----------------------------------------------------------------------------- throughput


def throughput(batch, n, d, repeats):
    keys = jax.random.split(K(1), batch)
    insts = [make("softmax", k, n=n, d=d, cond=100.0, reg=1e-3, noise=0.3, scale=2.0) for k in keys]
    problems = stack([i.problem for i in insts])
    x0s = jnp.stack([i.x0 for i in insts])
    loss, _, _ = flat(insts[0].problem, insts[0].x0)
    calls = {}
    for name, solver in (("newton", newton()), ("trust_region", trust_region())):
        calls[f"attnopt.{name} solve_batch"] = functools.partial(
            solve_batch, problems, x0s, solver, max_steps=MAX_STEPS, tol=TOL)
        calls[f"attnopt.{name} lockstep vmap"] = functools.partial(
            solve_batch, problems, x0s, solver, max_steps=MAX_STEPS, tol=TOL, chunk_size=None)
        calls[f"attnopt.{name} loop"] = functools.partial(
            lambda s: [solve(i.problem, i.x0, s, max_steps=MAX_STEPS, tol=TOL) for i in insts], solver)
    unpack = lambda r: (r.state.params if hasattr(r, "state") else r[0])
    if INSTALLED["optimistix"]:
        rtol = tune_optimistix(functools.partial(optimistix_run, loss, "BFGS"), insts[:8], lambda y: y)
        run = jax.jit(jax.vmap(functools.partial(optimistix_run, loss, "BFGS", rtol)))
        calls["optimistix.BFGS vmap"] = lambda: run(problems, x0s)
    run_optax = jax.jit(jax.vmap(functools.partial(optax_lbfgs, loss)))
    calls["optax.lbfgs vmap"] = lambda: run_optax(problems, x0s)
    params = lambda out: [unpack(o) for o in out] if isinstance(out, list) else unpack(out)
    norms = lambda out: [grad_norm(i.problem, params(out)[k]) for k, i in enumerate(insts)]
    outputs, times = timed(calls, lambda name, out: max(norms(out)) <= TOL, repeats)
    rows = []
    for name, out in outputs.items():
        rows.append({
            "method": name, "time_s": times.get(name),
            "instances_per_s": batch / times[name] if name in times else None,
            "reached_tol": int(sum(g <= TOL for g in norms(out))), "max_grad_norm": max(norms(out)),
        })
    time_of = {r["method"]: r["time_s"] for r in rows}
    for r in rows:
        own_loop = time_of.get(" ".join(r["method"].split(" ")[:1] + ["loop"]))
        ratio = lambda reference: None if r["time_s"] is None or reference is None else reference / r["time_s"]
        r["vs_newton_loop"], r["vs_own_loop"] = ratio(time_of["attnopt.newton loop"]), ratio(own_loop)
    return {"batch": batch, "n": n, "d": d, "rows": rows}


# ----------------------------------------------------------------------------- BLAS threads


def blas_threads(quick, repeats):
    inst = make("softmax", K(0), **({"n": 2048, "d": 64} if quick else {"n": 8192, "d": 256}), **HARD)
    solver = newton()

    def with_threads(threads):
        def call():
            runtime.set_blas_threads(threads, include_numpy=False)
            return solve(inst.problem, inst.x0, solver, max_steps=MAX_STEPS, tol=TOL)
        return call

    cores = os.cpu_count() or 1
    times = _timing.median_times(
        {"one": with_threads(1), "per_core": with_threads(cores)}, repeats=repeats, warmup=1, min_sample_s=0.0,
        max_total_s=60.0)
    runtime.set_blas_threads(1, include_numpy=False)
    return {"n": inst.problem.A.shape[0], "d": inst.problem.A.shape[1], "cores": cores,
            "one_thread_s": times["one"], "thread_per_core_s": times["per_core"],
            "slowdown_thread_per_core": times["per_core"] / times["one"]}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = _timing.parse_args(argv, __doc__, "peers", repeats=5)
    repeats = 2 if args.quick else args.repeats
    info = _timing.machine()
    print(_timing.describe(info))
    missing = [name for name, ok in INSTALLED.items() if not ok]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (pip install {' '.join(missing)})")
    start = time.perf_counter()
    families = []
    columns = ["method", "time_s", "time_ratio", "iterations", "iteration_ratio", "max_grad_norm", "reached_tol"]
    for family in FAMILIES:
        result = time_to_tolerance(family, args.quick, repeats)
        families.append(result)
        print(f"\n{family}: {result['options']}, {result['seeds']} seeds (times are totals over the seeds)")
        print("time_ratio, iteration_ratio = method / best attnopt (> 1: attnopt faster)")
        print(_timing.format_table(result["rows"], columns))
        print(f"best attnopt: {result['best_attnopt']}; vs fastest peer ({result['fastest_peer']}): "
              f"{result['speedup_vs_fastest_peer']}; vs scipy trust-exact: {result['speedup_vs_trust_exact']}; "
              f"vs fastest (L-)BFGS ({result['fastest_quasi_newton']}): {result['speedup_vs_fastest_quasi_newton']}; "
              f"approx_newton vs newton (> 1: approx faster): {result['approx_newton_vs_newton']}", flush=True)
    sizes = [(64, 256, 8)] if args.quick else [(256, 256, 16), (256, 1024, 32)]
    batches = [throughput(*size, repeats) for size in sizes]
    for b in batches:
        print(f"\nthroughput: {b['batch']} instances n={b['n']} d={b['d']} (vs_*_loop > 1: faster than that loop)")
        print(_timing.format_table(b["rows"], ["method", "time_s", "instances_per_s", "vs_own_loop",
                                               "vs_newton_loop", "reached_tol", "max_grad_norm"]))
    threads = blas_threads(args.quick, repeats)
    print(f"\nOpenBLAS threads, newton n={threads['n']} d={threads['d']}: one {threads['one_thread_s']:.4f}s, "
          f"one per core ({threads['cores']}) {threads['thread_per_core_s']:.4f}s")
    by_family = {f["family"]: f for f in families}
    hard = by_family["hard"]
    targets = {
        "hard_5x_vs_trust_exact": (hard["speedup_vs_trust_exact"] or 0) >= 5,
        "hard_10x_vs_fastest_quasi_newton": (hard["speedup_vs_fastest_quasi_newton"] or 0) >= 10,
        **{f"{f['family']}_2x_vs_fastest_peer": (f["speedup_vs_fastest_peer"] or np.inf) >= 2 for f in families},
        **{f"approx_newton_faster_{f['family']}": (f["approx_newton_vs_newton"] or 0) > 1
           for f in families if f["approx_newton_vs_newton"] is not None},
        **{f"batched_at_least_loop_{b['n']}x{b['d']}": all(
            (r["vs_own_loop"] or 0) >= 1 for r in b["rows"] if r["method"].endswith("solve_batch")) for b in batches},
    }
    print("\ntargets:", targets, f"({time.perf_counter() - start:.0f}s)")
    path = _timing.write_json(args.out, {
        "benchmark": "peers", "dtype": "float64", "machine": info, "repeats": repeats, "installed": INSTALLED,
        "time_to_tolerance": families, "throughput": batches, "blas_threads": threads, "targets": targets,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
