"""The published max-margin experiments, each a function of its settings returning (results, figure).

Every experiment runs all its instances and starts in one vmapped solve, solves
its SVMs in one batched call, checks feasibility and local optimality, and
reports the alignment numbers the papers plot (``corr`` is the cosine of the
flattened iterate with an SVM solution). ``attnopt run configs/NAME.toml``
runs one (see :mod:`attnopt.experiments`); :data:`EXPERIMENTS` maps the config's
``kind`` to the function. Settings are the keyword arguments; ``seed`` and
``dtype`` come from the config's ``[experiment]`` table.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnopt.maxmargin.svm import attention_svm, value_svm
from attnopt.maxmargin.tokens import is_locally_optimal, optimal_tokens, selected_tokens
from attnopt.problems.base import stack
from attnopt.problems.maxmargin import PromptAttention
from attnopt.solvers import from_optax, normalized_gd, solve

EXPERIMENTS: dict[str, Callable] = {}


def experiment(fn):
    EXPERIMENTS[fn.__name__] = fn
    return fn


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
