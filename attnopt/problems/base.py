"""The problem base class: a frozen pytree of arrays plus pure methods.

A problem's array fields are pytree leaves and its static fields (a link, a
choice of formulation) are auxiliary data, so ``jax.jit`` and ``jax.vmap`` over
a stack of instances need no special cases. ``__init__`` validates its
arguments (shapes, dtypes, finiteness) and raises ``ValueError``; rebuilding a
problem from leaves (inside jit or vmap) bypasses that check.

Every problem has pure methods over params (an array or a pytree of arrays)::

    loss(params) -> ()             the objective (with the factor 1/2)
    grad(params) -> like params    gradient
    hvp(params, v) -> like params  Hessian-vector product
    hessian(params) -> (N, N)      Hessian, N = size of params, in the order
                                   of ``jax.flatten_util.ravel_pytree``

A subclass must define ``loss``; ``grad``, ``hvp`` and ``hessian`` default to
autodiff of it (NaN where ``in_domain(params)`` is False), and a subclass
overrides them with its hand-derived formulas (:meth:`Problem.hand_derived`
lists which). ``arguments()`` and ``rebuild(**changes)`` rebuild an instance
through ``__init__``. ``lower_bound`` states a known lower bound of the loss
(0 for sums of squares), which lets an experiment recognise a global minimum.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

#: The derivatives a problem may hand-derive; the rest come from autodiff of ``loss``.
DERIVATIVES = ("grad", "hvp", "hessian")


class Problem:
    """Base class; subclasses list their array fields in ``leaves`` and static fields in ``static``."""

    leaves: ClassVar[tuple[str, ...]] = ()
    static: ClassVar[tuple[str, ...]] = ()
    #: A lower bound of the loss over all params, or None if unknown.
    lower_bound: ClassVar[float | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(
            cls, cls._flatten_with_keys, cls._unflatten, cls._flatten
        )

    def _set(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is frozen; use .replace({name}=...)")

    def _flatten(self):
        return tuple(getattr(self, k) for k in self.leaves), tuple(getattr(self, k) for k in self.static)

    def _flatten_with_keys(self):
        keyed = tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in self.leaves)
        return keyed, tuple(getattr(self, k) for k in self.static)

    @classmethod
    def _unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj._set(**dict(zip(cls.leaves, children)), **dict(zip(cls.static, aux)))
        return obj

    def replace(self, **changes) -> "Problem":
        """A copy with some leaves replaced (no validation, like a pytree map)."""
        children, aux = self._flatten()
        fields = dict(zip(self.leaves, children))
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no array fields {sorted(unknown)}")
        fields.update(changes)
        return self._unflatten(aux, tuple(fields[k] for k in self.leaves))

    def __repr__(self):
        parts = [f"{k}={getattr(self, k)!r}" for k in self.static]
        parts += [f"{k}={_describe(getattr(self, k))}" for k in self.leaves]
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def dtype(self):
        return getattr(self, self.leaves[0]).dtype

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``__init__`` that rebuild this instance.

        Each parameter of ``__init__`` is read from the field of the same name;
        a subclass whose field differs from its argument overrides this.
        """
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {k: getattr(self, k) for k in names}

    def rebuild(self, **changes) -> "Problem":
        """A new instance from :meth:`arguments` updated with ``changes``, validated by ``__init__``.

        Raises ValueError for an unknown argument or a bad value.
        """
        arguments = self.arguments()
        unknown = set(changes) - set(arguments)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no arguments {sorted(unknown)}; known: {list(arguments)}")
        return type(self)(**(arguments | changes))

    @classmethod
    def hand_derived(cls) -> tuple[str, ...]:
        """Which of ``DERIVATIVES`` the class overrides with its own code (the rest use autodiff)."""
        return tuple(q for q in DERIVATIVES if getattr(cls, q) is not getattr(Problem, q))

    def loss(self, params) -> jax.Array:
        """The scalar objective; every subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(params)")

    def in_domain(self, params) -> jax.Array:
        """Whether the loss formula is defined at params (bool scalar); a problem with a domain overrides it."""
        del params
        return jnp.asarray(True)

    @jax.jit
    def grad(self, params):
        """Gradient, like params: ``jax.grad(loss)``, NaN outside the domain."""
        return nan_outside(self.in_domain(params), jax.grad(self.loss)(params))

    @jax.jit
    def hvp(self, params, v):
        """Hessian-vector product, like params: ``jvp`` of ``jax.grad(loss)`` at params in direction v,
        NaN outside the domain."""
        return nan_outside(self.in_domain(params), jax.jvp(jax.grad(self.loss), (params,), (v,))[1])

    @jax.jit
    def hessian(self, params):
        """Hessian (N, N): ``jax.hessian`` of loss over the ``ravel_pytree`` flattening of params, NaN
        outside the domain."""
        flat, unravel = ravel_pytree(params)
        return nan_outside(self.in_domain(params), jax.hessian(lambda y: self.loss(unravel(y)))(flat))


def nan_outside(ok, out):
    """``out`` (a pytree) where ``ok`` (bool scalar, or None for always), NaN elsewhere.

    Problems wrap every output with it so that leaving a formula's domain
    (overflow, a non-positive normaliser) gives NaN, never plausible numbers.
    With a domain (``ok`` not None) an entry that overflowed anyway is NaN
    too, so that no method returns inf.
    """
    if ok is None:
        return out
    return jax.tree.map(lambda o: jnp.where(ok & jnp.isfinite(o), o, jnp.nan), out)


def _describe(x: Any) -> str:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    return f"{dtype}{list(shape)}" if shape is not None else repr(x)


def stack(problems: Sequence[Problem]) -> Problem:
    """Stack instances of one problem type into one with a leading batch axis on every leaf."""
    problems = list(problems)
    if not problems:
        raise ValueError("stack needs at least one problem")
    structures = {jax.tree.structure(p) for p in problems}
    if len(structures) != 1:
        raise ValueError("stack needs problems of one type with the same static fields")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
