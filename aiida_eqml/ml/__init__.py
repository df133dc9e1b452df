"""Pure-JAX ML layer of aiida-eqml (never imports aiida; see docs/architecture.md).

Modules: ``graph`` (padded periodic graphs), ``tensors`` (Cartesian <-> irreps), ``layers`` and
``models`` (NequIP / MACE-style equivariant networks, ``build_model(config)``), ``response``
(forces, stress, polarization, Born charges, dielectric and Raman tensors from E(R, F)).
Import the submodules directly; this package import stays light.
"""
