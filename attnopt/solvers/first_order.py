"""First-order solvers: any optax transformation, and normalized gradient descent."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from attnopt.solvers.state import Sealed, Solver, SolverState, advance, check_option, solver_class, start, static, tree_norm

# --------------------------------------------------------------------------- optax specs
# An optax spec is {"name": <optax function>, **options}, or a list of specs (a chain). An option
# given as {"name": <schedule>, **options} is an optax schedule. Float options are hyperparameters:
# they are split off into a flat list of leaves, and the rest becomes a hashable template.


def _is_hyper(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _freeze(value, leaves: list):
    """A hashable template of ``value`` with its hyperparameters replaced by indices into ``leaves``."""
    if isinstance(value, Mapping):
        return ("dict", tuple((k, _freeze(v, leaves)) for k, v in sorted(value.items())))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_freeze(v, leaves) for v in value))
    if _is_hyper(value):
        leaves.append(value)
        return ("hyper", len(leaves) - 1)
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"optax option {value!r} is neither a number nor hashable") from None
    return ("static", value)


def _thaw(template, leaves):
    kind, content = template
    if kind == "dict":
        return {k: _thaw(v, leaves) for k, v in content}
    if kind == "list":
        return [_thaw(v, leaves) for v in content]
    return leaves[content] if kind == "hyper" else content


def _lookup(name: str, module, what: str):
    fn = getattr(module, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not callable(fn):
        raise ValueError(f"unknown {what} {name!r}")
    return fn


def schedule_option(value):
    """An option given as ``{"name": <optax schedule>, **options}`` built into that schedule; others as they are."""
    if isinstance(value, Mapping) and "name" in value:
        options = {k: schedule_option(v) for k, v in value.items() if k != "name"}
        return _lookup(value["name"], optax.schedules, "optax schedule")(**options)
    return value


def build_transformation(spec) -> optax.GradientTransformation:
    """The optax transformation of a spec (a name-keyed dict, or a list of them for ``optax.chain``)."""
    if isinstance(spec, list):
        return optax.chain(*(build_transformation(s) for s in spec))
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"an optax spec is {{'name': ..., **options}} or a list of them, got {spec!r}")
    options = {k: schedule_option(v) for k, v in spec.items() if k != "name"}
    try:
        tx = _lookup(spec["name"], optax, "optax transformation")(**options)
    except TypeError as err:
        raise ValueError(f"{spec['name']}: {err}") from None
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"optax.{spec['name']} does not build a GradientTransformation")
    return tx


def _probe(tx: optax.GradientTransformation):
    """One init and update of ``tx`` on a two-parameter quadratic."""
    tx = optax.with_extra_args_support(tx)
    x = jnp.zeros(2)
    state = tx.init(x)
    return tx.update(x, state, x, value=jnp.zeros(()), grad=x, value_fn=lambda y: y @ y)[0]


def _traceable(template, leaves) -> bool:
    """Whether the transformation can be built from traced hyperparameters (some optax functions
    branch in Python on a value, e.g. ``exponential_decay`` on ``decay_rate``)."""
    try:
        jax.eval_shape(lambda h: _probe(build_transformation(_thaw(template, h))), [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves])
        return True
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
        return False


# --------------------------------------------------------------------------- solvers


@solver_class
class Optax(Solver):
    """An optax transformation run as a solver (build it with :func:`from_optax`).

    ``spec`` is a frozen optax spec (or a ready ``GradientTransformation``) and ``hyper`` its float
    options, traced: ``from_optax("adam", learning_rate=lr)`` compiles once for every ``lr``.
    """

    spec: Any = static()
    hyper: tuple = ()
    label: str = static("optax")

    @property
    def name(self) -> str:
        return self.label

    @property
    def sweepable(self) -> bool:
        """Whether some option is traced (so a sweep over it is one compiled program)."""
        return bool(self.hyper)

    def transformation(self) -> optax.GradientTransformation:
        tx = self.spec if isinstance(self.spec, optax.GradientTransformation) else build_transformation(_thaw(self.spec, self.hyper))
        return optax.with_extra_args_support(tx)

    def init(self, problem, params) -> SolverState:
        return start(problem, params, Sealed(self.transformation().init(params)))

    def step(self, problem, state: SolverState) -> SolverState:
        updates, opt_state = self.transformation().update(
            state.grad, state.inner.content, state.params,
            value=state.value, grad=state.grad, value_fn=problem.loss,
        )
        params = optax.apply_updates(state.params, updates)
        value, grad = _value_and_grad(problem, params, opt_state)
        return advance(state, params, value, grad, Sealed(opt_state))


def _value_and_grad(problem, params, opt_state):
    """Loss and gradient at params, reused from the optax state when it stores them
    (line-search optimisers such as ``optax.lbfgs`` do) and they are finite."""
    value, grad = optax.tree.get(opt_state, "value"), optax.tree.get(opt_state, "grad")
    if value is None or grad is None:
        return problem.loss(params), problem.grad(params)
    return jax.lax.cond(
        jnp.isfinite(value),
        lambda: (value, grad),
        lambda: (problem.loss(params), problem.grad(params)),
    )


def from_optax(tx, **options) -> Optax:
    """An optax optimiser as a solver.

    Args:
      tx: an optax function name (``"adam"``, ``"adamw"``, ``"sgd"``, ``"lbfgs"``, ...), a list of
        specs ``{"name": ..., **options}`` for ``optax.chain``, or a ready
        ``optax.GradientTransformation`` (then it is compiled per object: build it once).
      options: the optax function's options (with a name). A float option is a traced
        hyperparameter; an option given as ``{"name": <optax schedule>, **options}`` is that schedule
        (e.g. ``learning_rate={"name": "cosine_decay_schedule", "init_value": 0.1, "decay_steps": 100}``).

    Line-search optimisers (``lbfgs``, ``optax.scale_by_zoom_linesearch`` chains) get the loss
    through optax's extra arguments.
    """
    if isinstance(tx, optax.GradientTransformation):
        if options:
            raise ValueError("options go with an optax name, not with a ready GradientTransformation")
        return Optax(tx, (), "optax")
    spec = {"name": tx, **options} if isinstance(tx, str) else tx
    if isinstance(spec, list):
        spec = [{"name": s} if isinstance(s, str) else s for s in spec]
    build_transformation(spec)  # checks names and options now, with concrete values
    leaves: list = []
    template = _freeze(spec, leaves)
    if leaves and not _traceable(template, leaves):
        template, leaves = _freeze_static(spec), []
    label = tx if isinstance(tx, str) else "chain"
    return Optax(template, tuple(leaves), label)


def _freeze_static(spec):
    """The template with every float kept static (for optax functions that cannot trace them)."""
    if isinstance(spec, Mapping):
        return ("dict", tuple((k, _freeze_static(v)) for k, v in sorted(spec.items())))
    if isinstance(spec, (list, tuple)):
        return ("list", tuple(_freeze_static(v) for v in spec))
    return ("static", float(spec) if _is_hyper(spec) else spec)


@solver_class
class NormalizedGD(Solver):
    """Normalized gradient descent, per leaf: ``x <- x - eta g / (||g|| + eps)`` (docs/math.md, Normalized gradient descent)."""

    learning_rate: Any = 0.1
    eps: Any = 0.0
    name = "normalized_gd"

    def init(self, problem, params) -> SolverState:
        return start(problem, params, None)

    def step(self, problem, state: SolverState) -> SolverState:
        def update(x, g):
            scale = jnp.sqrt(jnp.sum(g * g)) + self.eps
            return x - self.learning_rate * g / jnp.where(scale > 0, scale, 1)

        params = jax.tree.map(update, state.params, state.grad)
        return advance(state, params, problem.loss(params), problem.grad(params), None)


def normalized_gd(learning_rate: float = 0.1, *, eps: float = 0.0) -> NormalizedGD:
    """Normalized gradient descent on any pytree of params, each leaf along its own normalized gradient.

    Args:
      learning_rate: eta > 0 (traced: a sweep over it is one compiled program).
      eps: added to each leaf's gradient norm (>= 0). With 0 the step keeps length eta even when
        the gradient is at rounding level; a small eps (e.g. float64 machine epsilon) lets steps
        shrink there instead. A zero gradient gives a zero step.
    """
    check_option("learning_rate", learning_rate, lambda x: x > 0, "> 0")
    check_option("eps", eps, lambda x: x >= 0, ">= 0")
    return NormalizedGD(learning_rate, eps)
