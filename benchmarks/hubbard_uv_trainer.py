"""The model side of ``hubbard_uv.py evaluate`` (pure ML): the candidate sizes and the ``Trainer`` that fits a
candidate on a subset of the record and predicts U / V rows of others."""
from __future__ import annotations

import time

import numpy as np

#: Model sizes among which the selection picks (``--sizes``); overrides of ``SMALL_HUBBARD_CONFIG``.
SIZES = {
    "tiny": {
        "num_layers": 1,
        "hidden_irreps": "8x0e + 2x1o + 2x1e + 2x2e",
        "radial_hidden": [8, 8],
        "readout_product_mul": 2,
    },
    "small": {},
    "medium": {
        "hidden_irreps": "32x0e + 8x1o + 8x1e + 8x2e + 4x2o",
        "radial_hidden": [32, 32],
        "readout_product_mul": 8,
    },
}



# ============================================================================ training (pure ML)
class Trainer:
    """Trains one model on a subset of the usable samples and predicts U / V rows of others. Descriptors are built
    once for the whole record with fixed slots, so every split reads the occupations the same way."""

    def __init__(self, record, args):
        import ase.data

        from aiida_eqml.ml.hubbard.records import hubbard_training_dataset, record_manifolds

        self.record = record
        self.args = args
        self.manifold_ls, self.pair_ls = record_manifolds(record)
        # one descriptor set per (--spin-order, --scf-inputs) choice: with or without the local magnetic order, and
        # with or without the scf's own U / V
        self._descriptors = {
            (order, scf): hubbard_training_dataset(record, self.manifold_ls, self.pair_ls, spin_order=order,
                                                   scf_inputs=scf)
            for order in sorted(set(args.spin_order)) for scf in sorted(set(args.scf_inputs))
        }
        self.species = [ase.data.chemical_symbols[z] for z in record.atomic_numbers]
        self.seconds = 0.0
        self.runs = 0

    def fit(self, indices, candidate: dict, seed: int):
        from aiida_eqml.ml.hubbard.models import hubbard_model_config
        from aiida_eqml.ml.hubbard.training import residual_targets
        from aiida_eqml.ml.training import train

        descriptors, attrs = self._descriptors[(bool(candidate.get("spin_order", False)),
                                                bool(candidate.get("scf_inputs", True)))]
        subset = descriptors.subset(indices)
        if candidate.get("residual"):
            subset = residual_targets(subset)  # learn U - U_scf (aiida_eqml.ml.hubbard.training)
        has_v = any("hubbard_v" in s.edge_targets and np.isfinite(s.edge_targets["hubbard_v"].values).any()
                    for s in subset.samples)
        model = hubbard_model_config(self.species, attrs, cutoff=self.args.cutoff, predict_u=True,
                                     predict_v=has_v and bool(self.pair_ls),
                                     v_sum_images=bool(candidate.get("v_sum_images")),
                                     u_sum_images=bool(candidate.get("u_sum_images")), **SIZES[candidate["size"]])
        config = {
            "model": model, "epochs": int(candidate["epochs"]), "batch_size": min(self.args.batch_size, len(subset)),
            "split": {"train": list(range(len(subset))), "val": [], "test": []}, "seed": int(seed),
            "optimizer": {"learning_rate": self.args.learning_rate, "schedule": "cosine", "decay_rate": 0.02,
                          "warmup_epochs": min(10, max(0, int(candidate["epochs"]) // 10))},
            "early_stopping": {"patience": 0}, "progress": False,
        }
        t0 = time.time()
        result = train(subset, config, None)
        self.seconds += time.time() - t0
        self.runs += 1
        result.residual = bool(candidate.get("residual"))
        result.spin_order = bool(candidate.get("spin_order", False))
        result.scf_inputs = bool(candidate.get("scf_inputs", True))
        return result

    def predict(self, result, rows) -> dict:
        """``{(sample, kind, key): prediction}`` for the rows."""
        from aiida_eqml.ml.hubbard.models import predict_hubbard

        samples = sorted({r["sample"] for r in rows})
        if not samples:
            return {}
        descriptors = self._descriptors[(result.spin_order, result.scf_inputs)][0]
        out = predict_hubbard(result.model, result.params, descriptors.subset(samples),
                              residual=getattr(result, "residual", False))
        values = {}
        for index, entry in zip(samples, out):
            if "hubbard_u" in entry:
                for atom, value in enumerate(np.asarray(entry["hubbard_u"]).reshape(-1)):
                    values[(index, "U", (atom,))] = float(value)
            if "hubbard_v" in entry:
                keys, v = entry["hubbard_v"]
                for key, value in zip(np.asarray(keys).tolist(), np.asarray(v).reshape(-1)):
                    values[(index, "V", tuple(int(x) for x in key))] = float(value)
        return {
            (r["sample"], r["kind"], r["key"]): values.get((r["sample"], r["kind"], r["key"]), float("nan"))
            for r in rows
        }
