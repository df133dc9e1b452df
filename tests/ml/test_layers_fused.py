"""The fused convolution (``Convolution(fused=True)``, the default) against the e3nn-jax composition it replaces: the
same parameters (names, shapes, initial values), the same messages and gradients to float32 rounding, for hidden
irreps with parities and multiplicities, edge attributes with multiplicities, padding edges; and the NequIP layer
built on it stays equivariant under proper and improper rotations."""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aiida_eqml.ml.layers import Convolution, NequIPLayer, gate_irreps

CASES = [
    ("32x0e", "0e + 1o + 2e", "32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o"),  # first layer: scalars in
    ("32x0e + 16x1o + 8x2e", "0e + 1o + 2e", "32x0e + 8x0o + 16x1o + 8x1e + 8x2e + 4x2o"),
    (
        "4x0e + 2x0o + 3x1o + 2x1e + 2x2e + 1x2o + 1x3o",
        "3x0e + 1o + 2x1e + 2e",
        "4x0e + 2x1o + 2x2e + 1x3o",
    ),  # edge attrs
    ("5x0e + 2x1o", "0e + 1o + 2e + 3o", "5x0e + 2x1o + 1x2e"),
]


def _inputs(irreps_x, irreps_y, n=7, e=40, seed=0):
    rng = np.random.default_rng(seed)
    x = e3nn.normal(irreps_x, jax.random.PRNGKey(seed + 1), (n,))
    y = e3nn.normal(irreps_y, jax.random.PRNGKey(seed + 2), (e,))
    radial = jnp.asarray(rng.normal(size=(e, 8)), jnp.float32)
    senders, receivers = jnp.asarray(rng.integers(0, n, e)), jnp.asarray(rng.integers(0, n, e))
    mask = jnp.asarray(rng.random(e) > 0.2)  # some padding edges
    return x, y, radial, senders, receivers, mask


@pytest.mark.parametrize("irreps_x, irreps_y, irreps_out", CASES)
def test_fused_convolution_equals_the_e3nn_composition(irreps_x, irreps_y, irreps_out):
    x, y, radial, senders, receivers, mask = _inputs(irreps_x, irreps_y)
    out_irreps = gate_irreps(e3nn.Irreps(irreps_out))
    reference = Convolution(out_irreps, 5.0, (16,), fused=False)
    fused = Convolution(out_irreps, 5.0, (16,))
    assert fused.fused  # the default
    params = reference.init(jax.random.PRNGKey(0), x, y, radial, senders, receivers, mask)
    params_fused = fused.init(jax.random.PRNGKey(0), x, y, radial, senders, receivers, mask)
    flat, flat_fused = (
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_flatten_with_path(params_fused)[0],
    )
    assert [k for k, _ in flat] == [k for k, _ in flat_fused]  # model files written by either load in the other
    for (_, a), (_, b) in zip(flat, flat_fused):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def run(module, xa):
        return module.apply(params, e3nn.IrrepsArray(x.irreps, xa), y, radial, senders, receivers, mask)

    a, b = run(reference, x.array), run(fused, x.array)
    assert a.irreps == b.irreps
    np.testing.assert_allclose(
        np.asarray(b.array), np.asarray(a.array), rtol=0, atol=2e-6 * float(jnp.abs(a.array).max())
    )
    grad = lambda module: jax.grad(lambda xa: jnp.sum(jnp.sin(run(module, xa).array)))(x.array)  # noqa: E731
    ga, gb = grad(reference), grad(fused)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=0, atol=1e-5 * float(jnp.abs(ga).max()))


@pytest.mark.parametrize("improper", [False, True])
def test_nequip_layer_on_the_fused_convolution_is_equivariant(improper):
    hidden = e3nn.Irreps("8x0e + 2x0o + 4x1o + 2x1e + 2x2e + 2x2o")
    rng = np.random.default_rng(3)
    n, e = 6, 30
    vectors = rng.normal(size=(e, 3))
    x = e3nn.normal(hidden, jax.random.PRNGKey(4), (n,))
    species = jnp.asarray(rng.integers(0, 2, n))
    senders, receivers = jnp.asarray(rng.integers(0, n, e)), jnp.asarray(rng.integers(0, n, e))
    radial = jnp.asarray(rng.normal(size=(e, 8)), jnp.float32)
    mask = jnp.ones(e, bool)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    q = q if np.linalg.det(q) > 0 else -q
    rot = -q if improper else q
    layer = NequIPLayer(hidden, num_species=2, avg_num_neighbors=5.0, radial_hidden=(16,))

    def sh(v):
        return e3nn.spherical_harmonics(
            [0, 1, 2], e3nn.IrrepsArray("1o", jnp.asarray(v, jnp.float32)), normalize=True, normalization="component"
        )

    params = layer.init(jax.random.PRNGKey(0), x, species, sh(vectors), radial, senders, receivers, mask)
    out = layer.apply(params, x, species, sh(vectors), radial, senders, receivers, mask)
    x_rot = x.transform_by_matrix(jnp.asarray(rot, jnp.float32))
    out_rot = layer.apply(params, x_rot, species, sh(vectors @ rot.T), radial, senders, receivers, mask)
    expected = out.transform_by_matrix(jnp.asarray(rot, jnp.float32))
    assert out_rot.irreps == expected.irreps
    np.testing.assert_allclose(
        np.asarray(out_rot.array), np.asarray(expected.array), atol=2e-5 * float(jnp.abs(out.array).max())
    )
