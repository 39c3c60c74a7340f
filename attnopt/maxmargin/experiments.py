"""The published max-margin experiments, each a function of its settings returning (results, figure).

Every experiment runs all its instances and starts in one vmapped solve, solves
its SVMs in one batched call, checks feasibility and local optimality, and
reports the alignment numbers the papers plot (``corr`` is the cosine of the
flattened iterate with an SVM solution). ``attnopt run configs/NAME.toml``
runs one (see :mod:`attnopt.studies`, whose registry maps the config's ``kind`` to
the function). Settings are the keyword arguments; ``seed`` and
``dtype`` come from the config's ``[experiment]`` table.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnopt.maxmargin.svm import attention_svm, value_svm
from attnopt.maxmargin.tokens import is_locally_optimal, optimal_tokens, selected_tokens
from attnopt.problems.base import stack
from attnopt.problems.maxmargin import PromptAttention
from attnopt.solvers import from_optax, normalized_gd, solve
from attnopt.studies import experiment



def record_params(problem, params):
    """Metric: the iterate itself (the experiments' alignment curves are computed from it)."""
    del problem
    return {"params": params}


def record_attention(problem, params):
    """Metrics: the iterate and each input's softmax probabilities."""
    return {"params": params, "attention": problem.attention(params)}


def cosine(a, b):
    """Cosine of the last axis of a (..., N) with b (N,) (or broadcastable (..., N)); NaN where a norm is 0."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(a * b, axis=-1) / np.where(den > 0, den, 1), np.nan)


def _ngd_runs(problems, starts, *, learning_rate, steps, eps, metrics=record_params, record_every=1):
    """NGD on every (problem, start) pair (stacked), one vmapped solve of the whole budget."""
    solver = normalized_gd(learning_rate, eps=eps)
    run = lambda p, x: solve(p, x, solver, max_steps=steps, tol=0.0, metrics=metrics, record_every=record_every)
    return jax.vmap(run)(problems, starts)


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, np.atleast_2d(fig.subplots(rows, cols, squeeze=False))


def _log_steps(ax, values, steps, label=None, **style):
    """Plot values (k + 1,) against steps 1..k on a log axis (step 0 dropped)."""
    ax.plot(np.asarray(steps)[1:], np.asarray(values)[1:], label=label, **style)
    ax.set_xscale("log")


# --------------------------------------------------------------------------- 2306.13596, max-margin token selection


def _single_input_data(variant: str, dtype):
    X = np.array([[-0.1, 1.0, 1.0], [1.0, 0.0, 0.9], [0.0, 0.0, 0.9]])
    if variant == "zero_last":
        X[2] = 0.0
    W = np.diag([1.0, 1.0, 0.0])
    return PromptAttention(jnp.asarray(X[None], dtype), jnp.ones(1, dtype), v=jnp.asarray([0.0, 0.0, 1.0], dtype), W=W)


@experiment
def single_input(
    *, learning_rate: float = 0.1, steps: int = 1000, starts: list = (1.0, 0.5, 0.0, -0.5, -1.0, -1.5),
    eps: float = 0.0, seed: int = 0, dtype: str = "float64",
):
    """One input (T = d = 3), W = diag(1, 1, 0), v = e3; NGD on p from p0 = (0, y, 0) for each y in ``starts``.

    Variants "original" and "zero_last" (last token 0). Reports the ATT-SVM objective
    1/2 ||p_mm||^2 of every single-token selection (published: 0.49505 for token 0, 0.5 for
    token 1), which token each start selects, whether that selection is locally optimal, and
    corr(p_k, p_mm) of that selection at steps 200 and ``steps``.
    """
    del seed
    variants = ("original", "zero_last")
    problems = [_single_input_data(v, dtype) for v in variants]
    starts = [float(y) for y in starts]
    x0 = jnp.asarray([[0.0, y, 0.0] for y in starts], dtype)
    k = len(starts)
    runs = _ngd_runs(stack([p for p in problems for _ in starts]), jnp.tile(x0, (2, 1)),
                     learning_rate=learning_rate, steps=steps, eps=eps)
    params = np.asarray(runs.trace.metrics["params"])  # (2k, steps + 1, 3)
    selections = jnp.arange(3)[:, None]
    results, fig = {"variants": {}}, None
    fig, axes = _figure(2, 2)
    for j, (variant, problem) in enumerate(zip(variants, problems)):
        svms = jax.vmap(lambda a: attention_svm(problem, a))(selections)
        local = jax.vmap(lambda a: is_locally_optimal(problem, a))(selections)
        reached = np.asarray(jax.vmap(lambda p: selected_tokens(problem, p))(runs.state.params[j * k:(j + 1) * k]))[:, 0]
        corr = cosine(params[j * k:(j + 1) * k], np.asarray(svms.solution)[reached][:, None, :])
        results["variants"][variant] = {
            "svm": [
                {"token": t, "feasible": bool(svms.feasible[t]), "half_norm_squared": float(0.5 * svms.objective[t] ** 2),
                 "locally_optimal": bool(local[t]), "kkt_residual": float(svms.kkt_residual[t])}
                for t in range(3)
            ],
            "runs": [
                {"start": [0.0, y, 0.0], "token": int(reached[i]), "corr_step_200": float(corr[i, min(200, steps)]),
                 "corr_final": float(corr[i, -1]), "norm_final": float(np.linalg.norm(params[j * k + i, -1]))}
                for i, y in enumerate(starts)
            ],
        }
        path_ax, corr_ax = axes[j]
        for i, y in enumerate(starts):
            line = path_ax.plot(params[j * k + i, :, 0], params[j * k + i, :, 1], lw=1.2, label=f"p0 = (0, {y:g}, 0)")
            path_ax.plot(*params[j * k + i, 0, :2], "o", color=line[0].get_color(), ms=4)
            _log_steps(corr_ax, corr[i], np.arange(steps + 1), label=f"y = {y:g} -> token {reached[i]}",
                       color=line[0].get_color())
        reach = np.abs(params[j * k:(j + 1) * k, :, :2]).max()
        for t in range(3):
            if bool(svms.feasible[t]) and bool(local[t]):
                direction = np.asarray(svms.solution[t, :2]) / np.linalg.norm(svms.solution[t, :2])
                path_ax.plot([0, reach * direction[0]], [0, reach * direction[1]], "k--", lw=1)
                path_ax.annotate(f"p_mm(token {t})", reach * direction, fontsize="small")
        path_ax.set(xlabel="p_1", ylabel="p_2", title=f"{variant}: NGD paths; dashed: locally optimal p_mm")
        path_ax.set_aspect("equal", adjustable="datalim")
        corr_ax.set(xlabel="step", ylabel="corr(p_k, p_mm of the selected token)", ylim=(min(0.0, np.nanmin(corr)), 1.01),
                    title=f"{variant}: alignment")
        corr_ax.legend(fontsize="x-small")
        corr_ax.grid(True, alpha=0.3)
    return results, fig


def _multi_input_data(key, n, T, d, dtype):
    """Tokens 0.2 N(0, I) + a shift in the first d-1 coordinates (token 0 shifted by 2 e_1, the others
    not); the last coordinate holds Y_i gamma_t with gamma = 1 for token 0 and 0.5 for the others, so
    v = e_d scores them; W = diag(1, ..., 1, 0) hides that coordinate from the attention."""
    k_y, k_noise = jax.random.split(key)
    Y = jnp.where(jax.random.bernoulli(k_y, 0.5, (n,)), 1.0, -1.0).astype(dtype)
    shift = jnp.zeros((T, d - 1), dtype).at[0, 0].set(2.0)
    features = 0.2 * jax.random.normal(k_noise, (n, T, d - 1), dtype) + shift
    gamma = jnp.full((T,), 0.5, dtype).at[0].set(1.0)
    X = jnp.concatenate([features, (Y[:, None] * gamma[None, :])[..., None]], axis=-1)
    v = jnp.zeros(d, dtype).at[-1].set(1.0)
    W = jnp.diag(jnp.ones(d, dtype).at[-1].set(0.0))
    return PromptAttention(X, Y, v=v, W=W)


@experiment
def multi_input(
    *, n: int = 3, T: int = 7, d: int = 3, learning_rate: float = 1.0, steps: int = 1000, eps: float = 0.0,
    seed: int = 0, dtype: str = "float64",
):
    """n inputs of T tokens; NGD and plain GD (both with ``learning_rate``) on p from 0, logistic loss.

    The SVM uses the model's W (the public notebook used W = I for the SVM). Reports, for each
    method, corr(p_k, p_mm(opt)) and ||p_k|| at every step, the mean softmax probability of the
    selected tokens, and the selection reached.
    """
    problem = _multi_input_data(jax.random.key(seed), n, T, d, dtype)
    opt = optimal_tokens(problem)
    svm = attention_svm(problem, opt)
    x0 = jnp.zeros((1, d), dtype)
    ngd = _ngd_runs(stack([problem]), x0, learning_rate=learning_rate, steps=steps, eps=eps, metrics=record_attention)
    gd_solver = from_optax("sgd", learning_rate=learning_rate)
    gd = jax.vmap(lambda p, x: solve(p, x, gd_solver, max_steps=steps, tol=0.0, metrics=record_attention))(
        stack([problem]), x0)
    fig, axes = _figure(1, 3)
    results = {"svm": {"feasible": bool(svm.feasible), "objective": float(svm.objective),
                       "kkt_residual": float(svm.kkt_residual), "locally_optimal": bool(is_locally_optimal(problem, opt)),
                       "selection": np.asarray(opt).tolist()}, "methods": {}}
    steps_axis = np.arange(steps + 1)
    for name, run in (("normalized GD", ngd), ("GD", gd)):
        p = np.asarray(run.trace.metrics["params"][0])
        attention = np.asarray(run.trace.metrics["attention"][0])  # (steps + 1, n, T)
        prob = np.take_along_axis(attention, np.asarray(opt)[None, :, None], axis=2)[..., 0].mean(axis=1)
        corr = cosine(p, np.asarray(svm.solution))
        results["methods"][name] = {
            "corr_final": float(corr[-1]), "norm_final": float(np.linalg.norm(p[-1])), "selected_probability_final":
            float(prob[-1]), "selection": np.asarray(selected_tokens(problem, run.state.params[0])).tolist(),
            "corr": corr[:: max(1, steps // 100)].tolist(),
        }
        _log_steps(axes[0, 0], corr, steps_axis, label=name)
        _log_steps(axes[0, 1], prob, steps_axis, label=name)
        _log_steps(axes[0, 2], np.linalg.norm(p, axis=1), steps_axis, label=name)
    axes[0, 0].set(xlabel="step", ylabel="corr(p_k, p_mm)", title="alignment with the ATT-SVM (model's W)")
    axes[0, 1].set(xlabel="step", ylabel="mean softmax probability of the selected token", title="saturation")
    axes[0, 2].set(xlabel="step", ylabel="||p||", yscale="log", title="norm growth")
    for ax in axes[0]:
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    return results, fig


def _joint_data(third, dtype):
    X = jnp.asarray([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, -1.0]], [[0.0, 0.0], list(third)]], dtype)
    return PromptAttention(X, jnp.asarray([1.0, -1.0, 1.0], dtype), trainable="vp")


@experiment
def joint_training(
    *, learning_rate: float = 0.1, steps: int = 1000, eps: float = 0.0, seed: int = 0, dtype: str = "float64",
):
    """Joint NGD on (v, p) from v0 = (-1, 0), p0 = (0, -1), W = I, logistic loss, for the "tight"
    (x_3 = (0.5, 1)) and "relaxed" (x_3 = (0.5, 1.5)) data. Selection: token 1 of every input.

    Reports the p-SVM with all margins 1 (published 0.94444 = 1/2 ||p_mm||^2) and the relaxed
    p-SVM (margin 0 for inputs that are not support vectors of the v-SVM; published 0.5), the
    v-SVM, and the final corr of p and v with each.
    """
    del seed
    cases = {"tight": (0.5, 1.0), "relaxed": (0.5, 1.5)}
    problems = [_joint_data(x, dtype) for x in cases.values()]
    x0 = (jnp.asarray([[-1.0, 0.0]] * 2, dtype), jnp.asarray([[0.0, -1.0]] * 2, dtype))
    runs = _ngd_runs(stack(problems), x0, learning_rate=learning_rate, steps=steps, eps=eps)
    alpha = jnp.ones(3, jnp.int32)
    fig, axes = _figure(1, 2)
    results = {}
    for j, (case, problem) in enumerate(zip(cases, problems)):
        v_svm = value_svm(problem, alpha)
        relaxed = jnp.where(v_svm.support, 1.0, 0.0).astype(problem.X.dtype)
        full, part = attention_svm(problem, alpha), attention_svm(problem, alpha, margins=relaxed)
        v_path, p_path = (np.asarray(leaf[j]) for leaf in runs.trace.metrics["params"])
        corr = {
            "p_vs_full_svm": cosine(p_path, np.asarray(full.solution)),
            "p_vs_relaxed_svm": cosine(p_path, np.asarray(part.solution)),
            "v_vs_v_svm": cosine(v_path, np.asarray(v_svm.solution)),
        }
        results[case] = {
            "p_svm_half_norm_squared": float(0.5 * full.objective ** 2),
            "relaxed_p_svm_half_norm_squared": float(0.5 * part.objective ** 2),
            "relaxed_margins": np.asarray(relaxed).tolist(),
            "v_svm_objective": float(v_svm.objective),
            "kkt_residual": max(float(full.kkt_residual), float(part.kkt_residual), float(v_svm.kkt_residual)),
            **{f"{name}_final": float(values[-1]) for name, values in corr.items()},
        }
        for name, values in corr.items():
            _log_steps(axes[0, j], values, np.arange(steps + 1), label=name)
        axes[0, j].set(xlabel="step", ylabel="corr", title=f"{case}: x_3 = {cases[case]}", ylim=(-1.05, 1.05))
        axes[0, j].legend(fontsize="small")
        axes[0, j].grid(True, alpha=0.3)
    return results, fig


@experiment
def diff_loss(
    *, C: list = (1.0, 2.0, 5.0, 10.0, 100.0), losses: list = ("logistic", "linear"), learning_rate: float = 0.1,
    steps: int = 1000, eps: float = 0.0, seed: int = 0, dtype: str = "float64",
):
    """Two inputs X_1 = [0, (1, 1, C)], X_2 = [0, (1, -1, 1)], Y = (1, 1), W = diag(1, 1, 0), v = e3,
    NGD on p from 0 for each C and loss: the direction reached depends on the loss.

    Reports corr of the final p with (1, 0, 0) and with the ATT-SVM of the optimal tokens (whose
    solution is (1, 0, 0)), and draws corr(p_k, p_mm) against steps for each C (published: with
    C = 100 the logistic run ends at corr 0.7071 with (1, 0, 0)).
    """
    del seed
    C = [float(c) for c in C]
    W = jnp.diag(jnp.asarray([1.0, 1.0, 0.0], dtype))
    e1 = np.array([1.0, 0.0, 0.0])
    fig, axes = _figure(1, len(losses))
    results = {}
    for col, loss in enumerate(losses):
        problems = [
            PromptAttention(jnp.asarray([[[0, 0, 0], [1, 1, c]], [[0, 0, 0], [1, -1, 1]]], dtype), jnp.ones(2, dtype),
                            v=jnp.asarray([0.0, 0.0, 1.0], dtype), W=W, loss=loss)
            for c in C
        ]
        runs = _ngd_runs(stack(problems), jnp.zeros((len(C), 3), dtype), learning_rate=learning_rate, steps=steps, eps=eps)
        svms = [attention_svm(p, optimal_tokens(p)) for p in problems]
        paths = np.asarray(runs.trace.metrics["params"])  # (len(C), steps + 1, 3)
        results[loss] = []
        for i, c in enumerate(C):
            corr_svm = cosine(paths[i], np.asarray(svms[i].solution))
            final = paths[i, -1]
            results[loss].append({
                "C": c, "corr_e1": float(cosine(final, e1)), "corr_svm": float(corr_svm[-1]),
                "svm_feasible": bool(svms[i].feasible), "svm_direction": (np.asarray(svms[i].solution) /
                                                                          float(svms[i].objective)).tolist(),
                "final_direction": (final / np.linalg.norm(final)).tolist(),
            })
            _log_steps(axes[0, col], corr_svm, np.arange(steps + 1), label=f"C = {c:g}")
        axes[0, col].set(xlabel="step", ylabel="corr(p_k, p_mm)", title=f"{loss} loss", ylim=(0.5, 1.02))
        axes[0, col].legend(fontsize="small")
        axes[0, col].grid(True, alpha=0.3)
    return results, fig


# --------------------------------------------------------------------------- 2308.16898, Transformers as SVMs


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _cross_attention_instances(keys, n, T, d, dtype, param):
    """One registry CrossAttention instance per key (stacked); the data do not depend on ``param``."""
    from attnopt.problems.registry import make

    return jax.vmap(lambda k: make("cross_attention", k, n=n, T=T, d=d, param=param, dtype=dtype).problem)(keys)


def local_converge_data(seed: int, instances: int, n: int, T: int, d: int, dtype):
    """Stacked CrossAttention instances (tokens, queries and v uniform on the sphere, random labels)
    with param "W", the same data with param "KQ", and the shared starts: K0, Q0 uniform in
    [-1/sqrt(d), 1/sqrt(d)] and W0 = K0 Q0^T."""
    keys = jax.random.split(jax.random.key(seed), instances)
    W_problems, KQ_problems = (_cross_attention_instances(keys, n, T, d, dtype, param) for param in ("W", "KQ"))
    bound = 1 / np.sqrt(d)
    K0, Q0 = (jax.random.uniform(k, (instances, d, d), dtype, -bound, bound)
              for k in jax.random.split(jax.random.fold_in(jax.random.key(seed), 1)))
    return W_problems, KQ_problems, (K0, Q0), K0 @ jnp.swapaxes(Q0, 1, 2)


def record_key_query(problem, params):
    """Metrics: W (= K Q^T for the factorised parametrisation), the mean over inputs of the top softmax
    probability and of log10(1 - top probability) = log10 sum_{t != top} a_t, from the scores (no
    cancellation or underflow)."""
    s = problem.scores(params)
    top = jnp.max(s, axis=-1, keepdims=True)
    rest = jax.nn.logsumexp(jnp.where(s == top, -jnp.inf, s), axis=-1) - jax.nn.logsumexp(s, axis=-1)
    return {"W": problem.key_query(params), "top_probability": jnp.mean(jnp.max(problem.attention(params), axis=-1)),
            "log10_rest": jnp.mean(rest) / np.log(10)}


#: Batched W-SVM solves and the local-optimality test of selections alpha (batch, n), each one compiled call.
_BATCHED = {
    "fro": jax.jit(jax.vmap(lambda problem, alpha: attention_svm(problem, alpha, norm="fro"))),
    "nuc": jax.jit(jax.vmap(lambda problem, alpha: attention_svm(problem, alpha, norm="nuc"))),
    "local": jax.jit(jax.vmap(is_locally_optimal)),
}


def _w_svms(problems, alpha, steps=("fro", "nuc")):
    """The results of the ``steps`` of :data:`_BATCHED` for the selections alpha (batch, n), run one after
    the other (two solvers' factorizations must not run concurrently, see attnopt.maxmargin._lax)."""
    return tuple(jax.block_until_ready(_BATCHED[step](problems, alpha)) for step in steps)


def _distinct_pairs(alphas):
    """alphas (runs, instances, n) -> (instance (u,), selection (u, n), where (runs, instances)): each
    distinct (instance, selection) pair once, and the row of each run's pair."""
    runs, instances, n = alphas.shape
    index = np.broadcast_to(np.arange(instances)[None, :, None], (runs, instances, 1))
    pairs, where = np.unique(np.concatenate([index, alphas], axis=-1).reshape(-1, n + 1), axis=0, return_inverse=True)
    return pairs[:, 0], pairs[:, 1:], where.reshape(runs, instances)


def _percentiles(values, q):
    """Percentiles q over axis 0 ignoring NaN (np.nanpercentile, slow, only when there is one)."""
    return (np.nanpercentile if np.isnan(values).any() else np.percentile)(values, q, axis=0)


def _band(ax, steps, values, label, **style):
    """Median over instances (axis 0) with the 10-90% band."""
    lo, mid, hi = _percentiles(values, [10, 50, 90])
    line = ax.plot(steps, mid, label=label, **style)
    ax.fill_between(steps, lo, hi, color=line[0].get_color(), alpha=0.2, lw=0)


def _summary(values):
    """{"median", "p10", "p90"} over instances of values (instances,)."""
    p10, median, p90 = _percentiles(values, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


@experiment
def local_converge(
    *, instances: int = 100, n: int = 6, T: int = 8, d: int = 10, learning_rate: float = 0.1, steps: int = 2000,
    report_steps: list = (100, 200, 500, 1000, 2000), record_every: int = 20, eps: float = 0.0, seed: int = 0,
    dtype: str = "float64",
):
    """Cross attention trained by normalized GD on W and on (K, Q) (W = K Q^T, per-factor normalisation),
    logistic loss, all instances in one vmapped solve per parametrisation.

    The selection is each run's final softmax argmax; the Frobenius and nuclear-norm W-SVMs of the
    distinct (instance, selection) pairs of both parametrisations are solved in one batched call
    each. Reports corr of the iterate with both SVMs at ``report_steps`` (median and 10-90% over
    instances), the mean top softmax probability, the numerical ranks, how many selections are
    feasible / locally optimal, and how many runs stopped moving (once the softmax saturates so far
    that the squared gradient norm underflows, NGD's step is 0) and from which step. Published: W
    iterates reach corr about 0.99 with the Frobenius SVM by step 1000; K, Q iterates align with
    the nuclear-norm SVM instead. ``eps`` is the normalisation's ``||g|| + eps`` (the public code
    used 2.2e-16; here the gradient is computed without cancellation, so 0 works).
    """
    from attnopt.maxmargin.tokens import numerical_rank

    W_problems, KQ_problems, (K0, Q0), W0 = local_converge_data(seed, instances, n, T, d, dtype)
    runs = {
        "W": _ngd_runs(W_problems, W0, learning_rate=learning_rate, steps=steps, eps=eps,
                       metrics=record_key_query, record_every=record_every),
        "KQ": _ngd_runs(KQ_problems, (K0, Q0), learning_rate=learning_rate, steps=steps, eps=eps,
                        metrics=record_key_query, record_every=record_every),
    }
    alphas = np.stack([np.asarray(jax.vmap(selected_tokens)(p, run.state.params))
                       for p, run in zip((W_problems, KQ_problems), runs.values())])
    index, selection, where = _distinct_pairs(alphas)
    svms = _w_svms(jax.tree.map(lambda x: x[index], W_problems), jnp.asarray(selection), ("fro", "nuc", "local"))
    recorded = np.asarray(runs["W"].trace.step[0])
    report = [s for s in report_steps if s in recorded]
    results = {"normalisation": f"g / (||g|| + {eps:g}) per parameter leaf", "distinct_svms": len(index),
               "parametrisations": {}}
    fig, axes = _figure(1, 3)
    for col, (name, run) in enumerate(runs.items()):
        fro, nuc, local = jax.tree.map(lambda x: np.asarray(x)[where[col]], svms)
        W_path = np.asarray(run.trace.metrics["W"]).reshape(instances, len(recorded), -1)
        corr = {norm: cosine(W_path, svm.solution.reshape(instances, 1, -1))
                for norm, svm in (("fro", fro), ("nuc", nuc))}
        stopped = _stopped_steps(run, recorded)
        stop = float(np.median(stopped[np.isfinite(stopped)])) if np.isfinite(stopped).any() else None
        results["parametrisations"][name] = {
            "feasible_fro": int(np.sum(fro.feasible)), "feasible_nuc": int(np.sum(nuc.feasible)),
            "locally_optimal": int(np.sum(local)),
            **{f"max_kkt_residual_{norm}": float(np.nanmax(np.where(svm.feasible, svm.kkt_residual, np.nan)))
               for norm, svm in (("fro", fro), ("nuc", nuc))},
            "final_rank_median": float(np.median(numerical_rank(run.trace.metrics["W"][:, -1], 1e-3))),
            "svm_rank_fro_median": float(np.median(numerical_rank(fro.solution, 1e-6))),
            "svm_rank_nuc_median": float(np.median(numerical_rank(nuc.solution, 1e-6))),
            "ngd_stopped": int(np.sum(np.isfinite(stopped))),
            "ngd_stopped_step_median": stop,
            **_at_steps(recorded, report, corr, np.asarray(run.trace.metrics["top_probability"])),
        }
        _draw_run(axes[0, col], axes[0, 2], recorded, corr, np.asarray(run.trace.metrics["log10_rest"]),
                  stop if np.mean(np.isfinite(stopped)) >= 0.5 else None, _TITLES[name])
    axes[0, 2].set(xscale="log", xlabel="NGD step", ylabel=r"$\log_{10}(1 - p_{\mathrm{top}})$, mean over inputs",
                   title=r"softmax saturation ($p_{\mathrm{top}}$: top probability)")
    for ax in axes[0]:
        ax.legend(title=f"median, 10-90% of {instances} instances", fontsize="small", title_fontsize="small",
                  loc="lower right" if ax is not axes[0, 2] else "lower left")
        ax.grid(True, alpha=0.3)
    return results, fig


_TITLES = {"W": "W trained", "KQ": r"$(K, Q)$ trained, $W = KQ^\top$"}


def _stopped_steps(run, recorded):
    """Per instance, the first recorded step from which NGD no longer moves (a zero step: the squared
    gradient norm underflowed, see the ``log10_rest`` metric), NaN where it kept moving."""
    still = np.asarray(run.trace.step_size)[:, 1:] == 0
    return np.where(still.any(axis=1), recorded[1:][still.argmax(axis=1)], np.nan)


def _at_steps(recorded, report, corr, top):
    """The reported numbers at ``report`` steps: corr summaries per norm, mean top softmax probability."""
    columns = [int(np.flatnonzero(recorded == s)[0]) for s in report]
    return {**{f"corr_{norm}": {str(s): _summary(c[:, i]) for s, i in zip(report, columns)}
               for norm, c in corr.items()},
            "top_probability_mean": {str(s): float(np.mean(top[:, i])) for s, i in zip(report, columns)}}


def _draw_run(ax, saturation_ax, recorded, corr, log10_rest, stopped, title):
    """One parametrisation: corr with both SVMs on ``ax``, its saturation curve on ``saturation_ax``, and
    ``stopped`` (the median step from which NGD stopped moving, None to leave out) dotted on both."""
    for norm, label, style in (("fro", "Frobenius", "-"), ("nuc", "nuclear-norm", "--")):
        _band(ax, recorded[1:], corr[norm][:, 1:], f"{label} W-SVM", linestyle=style)
    ax.set(xscale="log", xlabel="NGD step", ylabel=r"corr$(W_k, W^{\mathrm{svm}})$", ylim=(0, 1.02), title=title)
    _band(saturation_ax, recorded[1:], log10_rest[:, 1:], title)
    if stopped is not None:
        for a in (ax, saturation_ax):
            a.axvline(stopped, color="0.4", ls=":", lw=1, label=r"NGD stops: $\|\nabla L\|^2$ underflows")


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _padded_instances(keys, dims, n, T, width, dtype):
    """One registry CrossAttention instance per key with d = dims[i] features, zero-padded to ``width``: the
    registry's instance of width ``width`` with every vector cut to its first d coordinates and
    renormalised (again uniform on the sphere of R^d). Padding leaves each W-SVM's solution embedded,
    its rank unchanged, and compiles once for all d."""
    from attnopt.problems.maxmargin import CrossAttention
    from attnopt.problems.registry import make

    def padded(key, d):
        p = make("cross_attention", key, n=n, T=T, d=width, dtype=dtype).problem
        cut = lambda x: jnp.where(jnp.arange(width) < d, x, 0)
        sphere = lambda x: cut(x) / jnp.linalg.norm(cut(x), axis=-1, keepdims=True)
        return CrossAttention(sphere(p.X), p.Y, sphere(p.Z), sphere(p.v))

    return jax.vmap(padded)(keys, dims)


def _rank_panel(ax, dims, ranks, label, shift):
    """Mean rank against d over the feasible instances (NaN entries skipped), bars from the smallest to the
    largest; x shifted by ``shift`` so that the sizes' bars do not overlap. Returns the means."""
    seen = [r[np.isfinite(r)] for r in ranks]
    mean, lo, hi = (np.array([f(r) if r.size else np.nan for r in seen]) for f in (np.mean, np.min, np.max))
    ax.errorbar(np.asarray(dims) + shift, mean, yerr=[mean - lo, hi - mean], fmt="o-", ms=3, lw=1, capsize=2,
                label=label)
    return mean


def _latex_number(x):
    """x in LaTeX: 10^{k} for a power of ten, else %g."""
    k = np.log10(x)
    return rf"10^{{{round(k)}}}" if np.isclose(k, round(k)) else f"{x:g}"


@experiment
def svm_rank(
    *, sizes: list = ((5, 5), (10, 10), (15, 15)), dims: list = tuple(range(1, 21)), instances: int = 10,
    rtol: float = 1e-6, seed: int = 0, dtype: str = "float64",
):
    """Rank of the Frobenius and nuclear-norm W-SVM solutions of the optimal tokens (argmax gamma)
    for each (n, T) in ``sizes`` and d in ``dims``, ``instances`` random instances each.

    Infeasible instances are counted separately (the published figure counted them as rank 1),
    and the rank is decided relative to the largest singular value of an accurate solution
    (``rtol``). Data as in local_converge (see :func:`_padded_instances`); all d of a size are
    solved in one batched call per norm.
    """
    from matplotlib.ticker import MaxNLocator

    from attnopt.maxmargin.tokens import numerical_rank

    dims = [int(d) for d in dims]
    width = max(dims)
    fig, axes = _figure(1, 3)
    results = []
    for n, T in sizes:
        keys = jnp.concatenate([jax.random.split(jax.random.fold_in(jax.random.key(seed), 1000 * n + d), instances)
                                for d in dims])
        problems = _padded_instances(keys, jnp.repeat(jnp.asarray(dims), instances), n, T, width, dtype)
        svms = dict(zip(("fro", "nuc"), _w_svms(problems, jax.vmap(optimal_tokens)(problems))))
        feasible = {norm: np.asarray(svm.feasible).reshape(len(dims), instances) for norm, svm in svms.items()}
        entry = {"n": n, "T": T, "d": dims, "infeasible": [int(np.sum(~f)) for f in feasible["fro"]],
                 "feasibility_disagreements": int(np.sum(feasible["fro"] != feasible["nuc"]))}
        for col, (norm, svm) in enumerate(svms.items()):
            ranks = np.asarray(numerical_rank(svm.solution, rtol)).reshape(len(dims), instances).astype(float)
            ranks[~feasible[norm]] = np.nan
            mean = _rank_panel(axes[0, col], dims, ranks, f"n = {n}, T = {T}", 0.15 * (len(results) - 1))
            entry[f"{norm}_rank_mean"] = [None if np.isnan(r) else float(r) for r in mean]
            entry[f"{norm}_rank_range"] = [None if not np.any(f) else [int(np.nanmin(r)), int(np.nanmax(r))]
                                           for r, f in zip(ranks, feasible[norm])]
            entry[f"{norm}_max_kkt_residual"] = float(np.nanmax(np.where(svm.feasible, svm.kkt_residual, np.nan)))
        axes[0, 2].plot(dims, entry["infeasible"], "o-", ms=3, label=f"n = {n}, T = {T}")
        results.append(entry)
    for col, norm in enumerate(("Frobenius", "nuclear")):
        axes[0, col].plot(dims, dims, "k:", lw=1, label="rank = d")
        axes[0, col].set(xlabel="d", title=f"{norm}-norm W-SVM of the optimal tokens",
                         ylabel=rf"rank of $W^{{\mathrm{{svm}}}}$ ($\sigma_i > {_latex_number(rtol)}\,\sigma_1$)")
        axes[0, col].legend(title=f"mean, min-max over the feasible\ninstances ({instances} per n, T, d)",
                            fontsize="small", title_fontsize="small", loc="upper left")
    axes[0, 2].set(xlabel="d", ylabel=f"infeasible instances (of {instances})", ylim=(-0.5, instances + 0.5),
                   title="no W separates the optimal tokens")
    axes[0, 2].legend(fontsize="small")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    return {"sizes": results, "instances": instances, "rtol": rtol}, fig
