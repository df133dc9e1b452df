"""Loaders for published datasets into the :class:`aiida_eqml.ml.dataset.Dataset` record."""

from aiida_eqml.ml.datasets.bto import BTO_TARGET_SPECS, LoadReport, load_bto400, species_mean_baseline, split_first_n

__all__ = ["BTO_TARGET_SPECS", "LoadReport", "load_bto400", "species_mean_baseline", "split_first_n"]
