"""Pure-JAX ML layer of aiida-eqml (never imports aiida; see docs/architecture.md).

Modules: ``graph`` (padded periodic graphs), ``tensors`` (Cartesian <-> irreps), ``targets`` (the registry of
target names, levels, formulas and units), ``layers``, ``architectures`` and ``models`` (NequIP, MACE and Allegro
trunks from a registry, ``build_model(config)``), ``response`` (forces, stress, polarization, Born charges,
dielectric and Raman tensors from E(R, F)), ``training`` and its parts, ``predict`` / ``calculator`` (the one
prediction path), ``ensemble``, ``rundir`` (the training run directory). Import the submodules directly; this
package import stays light.
"""
