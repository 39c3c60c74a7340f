"""Command line (``attnopt ...`` or ``python -m attnopt ...``): check derivatives, run configs, list problems."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

_EPILOG = """\
examples:
  attnopt check                          every problem's hand derivatives vs autodiff (float64)
  attnopt check softmax attention        only these problems
  attnopt run configs/default.toml       an experiment or study config; writes results/default/
  attnopt run my.toml --out runs/try1    the same, into another folder
  attnopt problems                       the generators a [problem] section can name, with options

exit status:
  0    done
  1    a derivative check failed
  2    a bad command, config or output folder: one line naming the key, before any work
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM. The results folder then holds
       either its previous results or the new ones, never a mix.

environment:
  ATTNOPT_CACHE_DIR  folder of the compilation cache (default: $XDG_CACHE_HOME/attnopt/jax,
                     else ~/.cache/attnopt/jax); "off" turns it off. Delete the folder to clear it.
"""


#: The commands that compile programs, and so use the persistent compilation cache.
_COMPILES = ("check", "run")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error: one line and exit status 2."""
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _fail(command: str, message) -> int:
    print(f"attnopt {command}: {message}", file=sys.stderr)
    return 2


def _interrupted(command: str, err: KeyboardInterrupt, detail: str = "") -> int:
    name, code = ("SIGTERM", 143) if isinstance(err, _Terminated) else ("SIGINT", 130)
    print(f"attnopt {command}: interrupted ({name}){detail}", file=sys.stderr)
    return code


def _check(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from attnopt.problems import registry
    from attnopt.verify import check_derivatives, format_reports

    known = sorted(registry.GENERATORS)
    names = args.problems or known
    unknown = [n for n in names if n not in registry.GENERATORS]
    if unknown:
        return _fail("check", f"unknown problem(s) {unknown}; known: {known}")
    reports = []
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name} ...", end=" ", flush=True)
        start = time.perf_counter()
        key = jax.random.PRNGKey(args.seed + i)
        inst = registry.make(name, key)
        leaves, treedef = jax.tree.flatten(inst.x0)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        x = jax.tree.unflatten(
            treedef, [l + 0.3 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
        )
        report = check_derivatives(inst.problem, x, name=name)
        reports.append(report)
        verdict = ("ok" if report.ok else "FAILED") if report.errors else "autodiff only"
        print(f"{verdict} ({time.perf_counter() - start:.1f}s)", flush=True)
    print(format_reports(reports))
    failed = [r.name for r in reports if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(reports)} problems match autodiff")
    return 0


def _run(args) -> int:
    from attnopt import experiments, results

    try:
        config = experiments.load_config(args.config)
        output = results.claim(*experiments.output_folder(config, args.out, "--out"))
    except OSError as err:
        return _fail("run", f"{args.config}: {err.strerror or err}")
    except ValueError as err:
        return _fail("run", err)
    with output:
        try:
            outcome = experiments.run(config, output)
        except KeyboardInterrupt as err:
            state = "the new results were written" if output.committed else "its previous contents are unchanged"
            return _interrupted("run", err, f"; {output.folder}: {state}")
    if isinstance(config, experiments.Config):
        print(experiments.summary_table(outcome))
    else:
        from attnopt.studies import summary

        print(summary(outcome))
    return 0


def _problems(args) -> int:
    from attnopt import experiments

    print(experiments.generator_table())
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``attnopt`` argument parser."""
    top = _Parser(
        prog="attnopt",
        description="attnopt: optimization problems that model attention, their solvers and experiments.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="compare every problem's hand-derived derivatives with autodiff (float64)")
    check.add_argument("problems", nargs="*", metavar="NAME", help="generators to check (default: all)")
    check.add_argument("--seed", type=int, default=0, help="PRNG seed of the instances and points (default 0)")
    check.set_defaults(func=_check)
    run = sub.add_parser("run", help="run an experiment or study config (TOML): results.json and a figure")
    run.add_argument("config", help="path to a TOML config, e.g. configs/default.toml")
    run.add_argument("--out", metavar="DIR", default=None,
                     help="output folder (default: the config's out_dir, else results/<config file name>)")
    run.set_defaults(func=_run)
    problems = sub.add_parser("problems", help="list the problem generators and their options")
    problems.set_defaults(func=_problems)
    return top


def _compilation_cache(command: str) -> int:
    """Turn on the persistent compilation cache (``ATTNOPT_CACHE_DIR``, see :mod:`attnopt._runtime`); 2 if its
    value is bad, else 0."""
    from attnopt import _runtime

    try:
        _runtime.enable_compilation_cache()
    except ValueError as err:
        return _fail(command, err)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command in _COMPILES and _compilation_cache(args.command):
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        return _interrupted(args.command, err)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
