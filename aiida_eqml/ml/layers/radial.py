"""Edge geometry and radial pieces of the equivariant layers (:mod:`aiida_eqml.ml.layers`).

* :func:`radial_basis`: Bessel functions times a smooth polynomial envelope (NequIP / MACE).
* :func:`safe_norm_vectors`: padding edges get a dummy unit vector (finite gradients at r = 0).
* :class:`RadialMLP`: scalar MLP of the radial embedding, one weight per message irrep.
* ``_FactorisedRadialMLP``: the same parameters, its last layer returned unapplied as ``(h, kernel)`` for
  :func:`aiida_eqml.ml.layers.convolution.fused_convolution`.
"""

from __future__ import annotations

from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["radial_basis", "safe_norm_vectors", "RadialMLP"]


def radial_basis(lengths: jnp.ndarray, cutoff: float, num_basis: int, envelope_p: int = 6) -> jnp.ndarray:
    """``[E] -> [E, num_basis]``: Bessel basis times polynomial envelope u_p(r/cutoff), 0 beyond."""
    x = lengths / cutoff
    envelope = e3nn.poly_envelope(envelope_p - 1, 2)(x)
    envelope = jnp.where(x < 1.0, envelope, 0.0)
    return e3nn.bessel(lengths, num_basis, x_max=cutoff) * envelope[:, None]


def safe_norm_vectors(vectors: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Replace masked (padding, zero-length) edge vectors by a dummy unit vector.

    Padding edges have r = 0, where |r| and r/|r| have NaN derivatives; ``where`` before the norm
    keeps gradients (and forward-over-reverse Hessians) finite and zero for them.
    """
    dummy = jnp.array([1.0, 0.0, 0.0], dtype=vectors.dtype)
    return jnp.where(mask[:, None], vectors, dummy)


class RadialMLP(nn.Module):
    """Scalar MLP of the radial embedding giving one weight per message irrep."""

    hidden: Sequence[int]
    num_out: int

    @nn.compact
    def __call__(self, radial: jnp.ndarray) -> jnp.ndarray:
        return e3nn.flax.MultiLayerPerceptron(
            tuple(self.hidden) + (self.num_out,), act=jax.nn.silu, output_activation=False
        )(radial)


class _Kernel(nn.Module):
    """The kernel of a bias-free ``flax.linen.Dense`` (same name, shape and initialiser), returned unapplied."""

    features: int
    alpha: float
    gradient_normalization: float

    @nn.compact
    def __call__(self, num_in: int, dtype) -> jnp.ndarray:
        stddev = jnp.sqrt(self.alpha) ** (1.0 - self.gradient_normalization)  # as e3nn.flax.MultiLayerPerceptron
        return self.param("kernel", nn.initializers.normal(stddev=stddev), (num_in, self.features), dtype)


class _FactorisedMLP(nn.Module):
    """``e3nn.flax.MultiLayerPerceptron(hidden + (num_out,), silu, output_activation=False)`` with the same parameter
    names and initialisation, returning ``(h, kernel)`` such that its output is ``h @ kernel``: the last layer is left
    to the caller, who may apply only (or repeat) some of its columns."""

    hidden: Sequence[int]
    num_out: int

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        gn = e3nn.config("gradient_normalization")
        gn = {"element": 0.0, "path": 1.0}[gn] if isinstance(gn, str) else gn
        act = e3nn.normalize_function(jax.nn.silu)
        for i, h in enumerate(tuple(self.hidden)):
            alpha = 1 / x.shape[-1]
            dense = nn.Dense(
                h,
                use_bias=False,
                kernel_init=nn.initializers.normal(stddev=jnp.sqrt(alpha) ** (1.0 - gn)),
                param_dtype=x.dtype,
                name=f"Dense_{i}",
            )
            x = act(jnp.sqrt(alpha) ** gn * dense(x))
        alpha = 1 / x.shape[-1]
        kernel = _Kernel(self.num_out, alpha, float(gn), name=f"Dense_{len(tuple(self.hidden))}")(x.shape[-1], x.dtype)
        return x * jnp.sqrt(alpha) ** gn, kernel


class _FactorisedRadialMLP(nn.Module):
    """:class:`RadialMLP`'s parameters (``MultiLayerPerceptron_0/Dense_i/kernel``), output as ``(h, kernel)``."""

    hidden: Sequence[int]
    num_out: int

    @nn.compact
    def __call__(self, radial: jnp.ndarray):
        return _FactorisedMLP(self.hidden, self.num_out, name="MultiLayerPerceptron_0")(radial)
