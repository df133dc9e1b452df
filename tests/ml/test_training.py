"""Training loop: overfit, masks, normalisation, resume, errors, data parallelism."""

import json
import os
import subprocess
import sys
import textwrap

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aiida_eqml.ml.dataset import Dataset, Sample
from aiida_eqml.ml.training import (
    DivergenceError,
    NaNLossError,
    compute_normalization,
    load_checkpoint,
    loss_sums,
    split_indices,
    train,
)

SPECS = {
    "born_charges": {"level": "node", "tensor": "ij", "unit": "e"},
    "dielectric": {"level": "graph", "tensor": "ij=ji", "unit": "1"},
}
CHARGE = {8: -2.0, 22: 4.0}


def environment_tensors(numbers, positions, cell, cutoff=3.0):
    """Smooth equivariant labels a model can learn: Z_i = q_s I + sum_j w(r_ij) r^_ij r^_ij^T."""
    n = len(numbers)
    born = np.array([np.eye(3) * CHARGE[int(z)] for z in numbers])
    for i in range(n):
        for j in range(n):
            for shift in np.ndindex(3, 3, 3):
                r = positions[j] - positions[i] + (np.array(shift) - 1) @ cell
                d = np.linalg.norm(r)
                if 1e-6 < d < cutoff:
                    born[i] += (1 + 0.5 * (numbers[j] == 22)) * (1 - d / cutoff) ** 2 * np.outer(r, r) / d**2
    eps = 5.0 * np.eye(3) + 0.1 * (born - born.mean(0)).mean(0)
    return born, 0.5 * (eps + eps.T)


def tiny_dataset(n_structures=4, n_atoms=4, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n_structures):
        cell = np.eye(3) * 3.2 + rng.normal(0, 0.05, (3, 3))
        numbers = np.array([22] + [8] * (n_atoms - 1))
        positions = rng.uniform(0, 1, (n_atoms, 3)) @ cell
        born, eps = environment_tensors(numbers, positions, cell)
        samples.append(
            Sample(
                numbers,
                positions,
                cell,
                True,
                node_targets={"born_charges": born},
                graph_targets={"dielectric": eps},
                info={"name": f"t{k}"},
            )
        )
    return Dataset(samples, SPECS)


MODEL = {
    "cutoff": 3.0,
    "num_layers": 1,
    "hidden_irreps": "8x0e + 4x1o + 4x1e + 4x2e",
    "radial_hidden": [16],
    "num_radial_basis": 6,
    "heads": {
        "born_charges": {"level": "node", "tensor": "ij"},
        "dielectric": {"level": "graph", "tensor": "ij=ji", "reduce": "mean"},
    },
}


def base_config(**overrides):
    config = {
        "model": MODEL,
        "epochs": 4,
        "batch_size": 2,
        "seed": 3,
        "split": {"val_fraction": 0.25, "test_fraction": 0.0},
        "optimizer": {"learning_rate": 1e-2, "schedule": "cosine"},
        "progress": False,
    }
    config.update(overrides)
    return config


def test_split_is_seeded_disjoint_and_complete():
    a = split_indices(20, {"val_fraction": 0.2, "test_fraction": 0.1}, seed=1)
    assert a == split_indices(20, {"val_fraction": 0.2, "test_fraction": 0.1}, seed=1)
    assert a != split_indices(20, {"val_fraction": 0.2, "test_fraction": 0.1}, seed=2)
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(20))
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 4, 2)
    with pytest.raises(ValueError, match="more than one subset"):
        split_indices(4, {"train": [0, 1], "val": [1], "test": []}, 0)


def test_normalization_from_training_set():
    ds = tiny_dataset(3)
    config = {**MODEL, "species": ["O", "Ti"]}
    norm = compute_normalization(ds, config)
    # Scalar (0e) component of Z* is trace/sqrt(3) in the orthonormal basis: per-species mean.
    born = np.concatenate([s.node_targets["born_charges"] for s in ds])
    numbers = np.concatenate([s.numbers for s in ds])
    shift = np.array(norm["born_charges"]["species_shift"])
    assert shift.shape == (2, 9)
    for k, z in enumerate((8, 22)):
        expected = np.trace(born[numbers == z], axis1=1, axis2=2).mean() / np.sqrt(3)
        assert abs(shift[k]).max() == pytest.approx(abs(expected), rel=1e-6)
        assert np.count_nonzero(shift[k]) == 1  # only the 0e entry is shifted
    assert norm["born_charges"]["scale"] > 0 and norm["dielectric"]["scale"] > 0


def test_loss_masks_padding_and_missing_labels():
    irreps = e3nn.Irreps("0e+1o")
    pred = e3nn.IrrepsArray(irreps, jnp.array([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [7.0, 7, 7, 7]]))
    true = e3nn.IrrepsArray(irreps, jnp.array([[0.0, 0, 0, 0], [0.0, 0, 0, 0], [0.0, 0, 0, 0]]))
    mask = jnp.array([True, False, False])
    sums = loss_sums({"x": pred}, {"x": true}, {"x": mask}, {"x": 0.5})
    sq, count = sums["x"]
    assert float(sq) == pytest.approx((1.0 / 0.5) ** 2) and float(count) == 4
    # NaN in a masked prediction does not leak into the loss.
    pred_nan = e3nn.IrrepsArray(irreps, pred.array.at[2].set(jnp.nan))
    assert np.isfinite(float(loss_sums({"x": pred_nan}, {"x": true}, {"x": mask}, {"x": 1.0})["x"][0]))


# Allegro's own sizes: as small as the NequIP model above.
ALLEGRO = {"architecture": "allegro", "allegro_channels": 4, "allegro_lmax": 2, "allegro_latent": [16]}


@pytest.mark.parametrize("architecture", ["nequip", "allegro"])
def test_tiny_overfit_and_nan_labels_masked(architecture):
    ds = tiny_dataset(3)
    ds[1].node_targets["born_charges"][2] = np.nan  # missing label: must be masked, not propagated
    ds[2].graph_targets["dielectric"][:] = np.nan
    config = base_config(
        model={**MODEL, **ALLEGRO} if architecture == "allegro" else MODEL,
        epochs=150,
        batch_size=3,
        split={"train": [0, 1, 2], "val": [], "test": []},
        optimizer={"learning_rate": 2e-2, "schedule": "constant"},
        early_stopping={"patience": 0},
    )
    result = train(ds, config)
    losses = [row["train_loss"] for row in result.history]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    born = result.metrics["train"]["born_charges"]
    assert born["count"] == 3 * 4 - 1  # the NaN atom is not counted
    assert set(born["per_species"]) == {"O", "Ti"}
    assert result.metrics["train"]["dielectric"]["count"] == 2


def test_resume_reproduces_uninterrupted_run(tmp_path):
    ds = tiny_dataset(4)
    config = base_config(epochs=4)
    full = train(ds, config, tmp_path / "full")
    part = train(ds, config, tmp_path / "part", stop_after_epochs=2)
    assert len(part.history) == 2
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoint.msgpack")
    assert ckpt["epoch"] == 2
    resumed = train(ds, config, tmp_path / "part", resume=tmp_path / "part" / "checkpoint.msgpack")
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    leaves_full = jax.tree_util.tree_leaves(full.params)
    leaves_resumed = jax.tree_util.tree_leaves(resumed.params)
    assert all(np.array_equal(a, b) for a, b in zip(leaves_full, leaves_resumed))
    # Logs: CSV and JSON, one row per epoch of the whole run.
    rows = json.loads((tmp_path / "part" / "log.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    header = (tmp_path / "part" / "log.csv").read_text().splitlines()[0]
    assert "train_loss" in header and "val_born_charges" in header and "learning_rate" in header
    # A checkpoint from another config is refused.
    with pytest.raises(ValueError, match="different training config"):
        train(ds, base_config(epochs=5), resume=tmp_path / "part" / "checkpoint.msgpack")


def test_nan_loss_and_divergence_raise():
    ds = tiny_dataset(3)
    # A zero scale makes every scaled error infinite: the loop must stop with NaNLossError.
    model = {**MODEL, "normalization": {"born_charges": {"scale": 0.0}}}
    with pytest.raises(NaNLossError, match="training loss is"):
        train(ds, base_config(model=model, epochs=2, split={"train": [0, 1, 2], "val": [], "test": []}))
    config = base_config(
        epochs=20,
        divergence_factor=2.0,
        split={"train": [0, 1, 2], "val": [], "test": []},
        optimizer={"learning_rate": 50.0, "schedule": "constant", "clip_norm": None},
    )
    with pytest.raises((DivergenceError, NaNLossError)):
        train(ds, config)


def test_bad_config_rejected_with_clear_message():
    ds = tiny_dataset(2)
    with pytest.raises(ValueError, match="unknown training config keys \\['epoch'\\]"):
        train(ds, {"epoch": 3, "model": MODEL})
    with pytest.raises(ValueError, match="element\\(s\\) \\['Ti'\\] not in the model's species"):
        train(ds, base_config(model={**MODEL, "species": ["O"]}))


DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    from test_training import tiny_dataset, base_config
    from aiida_eqml.ml.training import train
    assert len(jax.devices()) == 2, jax.devices()
    ds = tiny_dataset(6)
    out = {{}}
    for devices in (1, 2):
        config = base_config(epochs=2, batch_size=1, num_shards=2, devices=devices,
                             split={{"train": [0, 1, 2, 3, 4], "val": [5], "test": []}})
        result = train(ds, config)
        out[devices] = [[r["train_loss"], r["val_loss"]] for r in result.history]
    print("RESULT" + json.dumps(out))
    """
)


def test_data_parallel_two_devices_equals_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = DATA_PARALLEL_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    one, two = np.array(result["1"]), np.array(result["2"])
    assert one.shape == (2, 2)
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_sigterm_waits_until_logs_and_checkpoint_agree():
    """A walltime SIGTERM arriving while an epoch is persisted kills the process only after the block.

    Run in a subprocess that has started XLA's threads (the kernel may hand the signal to any of them), with the
    default SIGTERM disposition the walltime watchdog relies on.
    """
    import signal
    import subprocess
    import sys

    code = (
        "import time, jax.numpy as jnp\n"
        "jnp.ones(1000).sum().block_until_ready()\n"
        "from aiida_eqml.ml.training import _termination_deferred\n"
        "with _termination_deferred():\n"
        "    print('in', flush=True); time.sleep(2); print('block done', flush=True)\n"
        "print('after the block', flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "in"
    process.send_signal(signal.SIGTERM)
    rest = process.stdout.read()
    assert process.wait(timeout=60) == -signal.SIGTERM  # it did take its normal effect ...
    assert rest == "block done\n"  # ... once the block was through, and not later
