"""Command line (``attnopt ...`` or ``python -m attnopt ...``).

    attnopt check                      verify every problem's derivatives against autodiff
    attnopt run CONFIG [--out DIR]     run an experiment config (see attnopt.experiments)
"""
from __future__ import annotations

import argparse
import sys


def _check(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from attnopt.problems import registry
    from attnopt.verify import check_derivatives, format_reports

    reports = []
    for i, name in enumerate(sorted(registry.GENERATORS)):
        key = jax.random.PRNGKey(args.seed + i)
        inst = registry.make(name, key)
        leaves, treedef = jax.tree.flatten(inst.x0)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        x = jax.tree.unflatten(
            treedef, [l + 0.3 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
        )
        reports.append(check_derivatives(inst.problem, x, name=name))
    print(format_reports(reports))
    failed = [r.name for r in reports if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(reports)} problems match autodiff")
    return 0


def _run(args) -> int:
    from attnopt import experiments

    try:
        config = experiments.load_config(args.config)
    except (OSError, ValueError) as err:
        print(f"attnopt run: {err}", file=sys.stderr)
        return 2
    outcome = experiments.run(config, args.out)
    if isinstance(config, experiments.Config):
        print(experiments.summary_table(outcome))
    else:
        from attnopt.studies import summary

        print(summary(outcome))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify every problem's derivatives against autodiff (float64)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_check)
    run = sub.add_parser("run", help="run an experiment config (TOML): solvers, results JSON, convergence plot")
    run.add_argument("config", help="path to a TOML config, e.g. configs/default.toml")
    run.add_argument("--out", default=None, help="output folder (default: the config's out_dir or results/<name>)")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
