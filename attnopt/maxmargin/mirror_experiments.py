"""The l_p mirror-descent attention experiments: joint_md and local_md (docs/math.md, Mirror descent).

Normalized l_p mirror descent on cross attention converges in direction to the
l_p-norm W-SVM of the selection it reaches. Both experiments run every value of
p and every instance in one vmapped solve (p is a traced option of the solver,
so the sweep compiles once), start each instance from one seeded point shared by
all p, and measure the final iterate against each l_p SVM by the cosine and by
the directional Bregman divergence ``D_p(svm, iterate)`` of the potential
``||w||_p^p / p`` of the run's own p (:func:`attnopt.maxmargin.bregman`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnopt.maxmargin.experiments import _band, _figure, cosine, local_converge_data
from attnopt.maxmargin.lp import bregman
from attnopt.maxmargin.svm import attention_svm, value_svm
from attnopt.maxmargin.tokens import is_locally_optimal, selected_tokens
from attnopt.problems.maxmargin import CrossAttention
from attnopt.solvers import mirror_descent, solve
from attnopt.studies import experiment


def _md_runs(problems, starts, ps, *, learning_rate, steps, record_every, metrics):
    """Normalized l_p-MD for every p in ``ps`` on every stacked (problem, start): one vmapped solve.

    Returns the solve results with leading axes (len(ps), instances)."""
    solvers = jax.tree.map(lambda *x: jnp.stack(x), *[mirror_descent(learning_rate, float(p)) for p in ps])
    run = lambda solver, p, x: solve(p, x, solver, max_steps=steps, tol=0.0, metrics=metrics, record_every=record_every)
    return jax.vmap(jax.vmap(run, in_axes=(None, 0, 0)), in_axes=(0, None, None))(solvers, problems, starts)


@functools.partial(jax.jit, static_argnums=2)
def _divergences(svms, paths, p):
    """D_p(svm_i / ||svm_i||_p, W_ik / ||W_ik||_p) for svms (I, ...) and recorded iterates paths (I, K, ...) -> (I, K)."""
    return jax.vmap(jax.vmap(lambda s, w: bregman(s, w, p), (None, 0)))(svms, paths)


def record_vW(problem, params):
    """Metrics: the readout v and the key-query matrix W."""
    return {"v": problem.readout(params), "W": problem.key_query(params)}


def _joint_md_data(dtype):
    X = jnp.asarray([[[-2.7, 1.2], [1.4, 2.1], [1.3, -0.1]], [[0.4, -2.2], [-1.1, -0.4], [0.9, 0.1]]], dtype)
    return CrossAttention(X, jnp.asarray([1.0, -1.0], dtype), X[:, 0], trainable="vW")


@experiment
def joint_md(
    *, ps: list = (1.75, 2.0, 3.0), budgets: list = (1500, 2000, 20000), learning_rate: float = 0.1,
    record_every: int = 10, seed: int = 0, dtype: str = "float64",
):
    """n = 2, T = 3, d = 2 with the published tokens, Y = (1, -1), queries z_i = the first token of X_i;
    (v, W) trained jointly from zero by normalized l_p-MD (each leaf normalised by its dual norm)
    with ``learning_rate``, run ``budgets[j]`` steps for ``ps[j]``.

    At each run's last step: the selection, whether it is locally optimal, and the cosine and
    Bregman divergence of W with the l_p W-SVM and of v with the l_p v-SVM of that selection.
    """
    del seed
    ps, budgets = [float(p) for p in ps], [int(b) for b in budgets]
    if len(budgets) != len(ps):
        raise ValueError(f"budgets must have one entry per p ({len(ps)}), got {len(budgets)}")
    if any(b % record_every for b in budgets):
        raise ValueError(f"budgets must be multiples of record_every ({record_every}), got {budgets}")
    problem = _joint_md_data(dtype)
    start = (jnp.zeros((1, 2), dtype), jnp.zeros((1, 2, 2), dtype))
    runs = _md_runs(jax.tree.map(lambda x: x[None], problem), start, ps, learning_rate=learning_rate,
                    steps=max(budgets), record_every=record_every, metrics=record_vW)
    steps = np.asarray(runs.trace.step[0, 0])
    fig, axes = _figure(1, 3)
    results = {"runs": []}
    for j, (p, budget) in enumerate(zip(ps, budgets)):
        last = int(np.flatnonzero(steps == budget)[0])
        v_path = np.asarray(runs.trace.metrics["v"][j, 0, : last + 1])
        W_path = np.asarray(runs.trace.metrics["W"][j, 0, : last + 1])
        alpha = selected_tokens(problem, (v_path[-1], W_path[-1]))
        w_svm, v_svm = attention_svm(problem, alpha, norm=p), value_svm(problem, alpha, norm=p)
        cos_W = cosine(W_path.reshape(last + 1, -1), np.asarray(w_svm.solution).ravel())
        div_W = np.asarray(_divergences(w_svm.solution[None], W_path[None], p))[0]
        results["runs"].append({
            "p": p, "steps": budget, "selection": np.asarray(alpha).tolist(),
            "locally_optimal": bool(is_locally_optimal(problem, alpha, v=jnp.asarray(v_path[-1]), norm=p)),
            "W_svm_feasible": bool(w_svm.feasible), "v_svm_feasible": bool(v_svm.feasible),
            "cos_W": float(cos_W[-1]), "bregman_W": float(div_W[-1]),
            "cos_v": float(cosine(v_path[-1], np.asarray(v_svm.solution))),
            "bregman_v": float(bregman(v_svm.solution, v_path[-1], p)),
            "W_final": W_path[-1].tolist(), "W_svm": np.asarray(w_svm.solution).tolist(),
        })
        label = f"p = {p:g}"
        axes[0, 0].plot(steps[1: last + 1], cos_W[1:], label=label)
        axes[0, 1].plot(steps[1: last + 1], div_W[1:], label=label)
        axes[0, 2].plot(steps[1: last + 1], cosine(v_path[1:], np.asarray(v_svm.solution)), label=label)
    axes[0, 0].set(ylabel="cos(W_k, W_svm,p)", title="W against its l_p W-SVM")
    axes[0, 1].set(ylabel="D_p(W_svm,p, W_k)", yscale="log", title="directional Bregman divergence")
    axes[0, 2].set(ylabel="cos(v_k, v_svm,p)", title="v against its l_p v-SVM")
    for ax in axes[0]:
        ax.set(xscale="log", xlabel="step")
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    return results, fig


def record_W(problem, params):
    """Metric: the key-query matrix W."""
    return {"W": problem.key_query(params)}


@experiment
def local_md(
    *, instances: int = 100, n: int = 6, T: int = 8, d: int = 10, ps: list = (1.75, 2.0, 3.0),
    learning_rate: float = 0.1, steps: int = 2000, record_every: int = 100, seed: int = 0, dtype: str = "float64",
):
    """The local_converge instances trained on W by normalized l_p-MD for each p in ``ps`` from one
    seeded start W0 ~ N(0, 1) per instance, shared by all p; logistic loss.

    For each p (the run) and each p' (the SVM): the l_p' W-SVM of the run's final selection, the
    directional Bregman divergence D_p(W_svm,p' , W_final) and the cosine (median and 10-90% over
    instances; the published table has the smallest divergence on the diagonal p = p'), plus the
    fraction of instances whose selections agree across all p (and of single inputs whose selected
    token does), and feasibility and local
    optimality of each run's selection.
    """
    problems, *_ = local_converge_data(seed, instances, n, T, d, dtype)
    W0 = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 2), (instances, d, d), dtype)
    runs = _md_runs(problems, W0, ps, learning_rate=learning_rate, steps=steps, record_every=record_every,
                    metrics=record_W)
    recorded = np.asarray(runs.trace.step[0, 0])
    alpha = jax.vmap(jax.vmap(selected_tokens), in_axes=(None, 0))(problems, runs.state.params)  # (P, I, n)
    agree = np.all(np.asarray(alpha) == np.asarray(alpha[:1]), axis=0)  # (instances, n)
    ps = [float(p) for p in ps]
    results = {"selections_agree": float(np.mean(np.all(agree, axis=1))), "tokens_agree": float(np.mean(agree)),
               "runs": []}
    fig, axes = _figure(1, 2)
    table = np.full((len(ps), len(ps)), np.nan)
    for i, p in enumerate(ps):
        W_path = np.asarray(runs.trace.metrics["W"][i])  # (instances, records, d, d)
        svms = {q: jax.vmap(lambda pr, a: attention_svm(pr, a, norm=q))(problems, alpha[i]) for q in ps}
        local = np.asarray(jax.vmap(lambda pr, a: is_locally_optimal(pr, a, norm=p))(problems, alpha[i]))
        entry = {"p": p, "feasible": int(np.sum(svms[p].feasible)), "locally_optimal": int(np.sum(local)),
                 "max_kkt_residual": float(np.nanmax(np.where(svms[p].feasible, svms[p].kkt_residual, np.nan))),
                 "bregman": {}, "cos": {}}
        for j, q in enumerate(ps):
            ok = np.asarray(svms[q].feasible)
            div = np.asarray(_divergences(svms[q].solution, W_path[:, -1:], p))[ok, 0]
            cos = cosine(W_path[:, -1].reshape(instances, -1), np.asarray(svms[q].solution).reshape(instances, -1))[ok]
            table[i, j] = np.median(div)
            entry["bregman"][f"{q:g}"] = _summary(div)
            entry["cos"][f"{q:g}"] = _summary(cos)
        results["runs"].append(entry)
        own = np.asarray(_divergences(svms[p].solution, W_path, p))
        _band(axes[0, 0], recorded[1:], own[:, 1:], f"p = {p:g}")
    axes[0, 0].set(xscale="log", yscale="log", xlabel="step", ylabel="D_p(W_svm,p, W_k): median, 10-90%",
                   title=f"l_p-MD vs its own l_p W-SVM ({instances} instances)")
    axes[0, 0].legend(fontsize="small")
    axes[0, 0].grid(True, alpha=0.3)
    from matplotlib.colors import LogNorm

    relative = table / np.nanmin(table, axis=1, keepdims=True)
    image = axes[0, 1].imshow(relative, cmap="viridis", norm=LogNorm(1, max(10.0, float(np.nanmax(relative)))))
    for (i, j), value in np.ndenumerate(table):
        axes[0, 1].text(j, i, f"{value:.2g}", ha="center", va="center", fontweight="bold" if relative[i, j] == 1 else None,
                        color="w" if image.norm(relative[i, j]) < 0.6 else "k")
    labels = [f"{p:g}" for p in ps]
    axes[0, 1].set(xticks=range(len(ps)), yticks=range(len(ps)), xticklabels=labels, yticklabels=labels,
                   xlabel="p' of the W-SVM", ylabel="p of the mirror descent",
                   title=f"median D_p(W_svm,p', W_final) at step {steps}")
    fig.colorbar(image, ax=axes[0, 1], label="divergence / smallest of its row (bold)")
    results["bregman_median_table"] = table.tolist()
    return results, fig


def _summary(values):
    """Median and 10-90% of a 1-D array (NaN when empty)."""
    if len(values) == 0:
        return {"median": float("nan"), "p10": float("nan"), "p90": float("nan")}
    lo, mid, hi = np.percentile(values, [10, 50, 90])
    return {"median": float(mid), "p10": float(lo), "p90": float(hi)}
