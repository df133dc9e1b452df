"""The Hubbard dataset record and its conversion to model inputs (no aiida import).

A *Hubbard record* is a :class:`~aiida_eqml.ml.dataset.Dataset` in which every sample is one hp.x run
(one iteration of a self-consistent DFT+U(+V) cycle), as written by
``aiida_eqml.calculations.functions.harvest.harvest_hubbard_labels`` or by :func:`hubbard_record_sample`:

=================================  ===============  ==========================================================
field                              shape            meaning
=================================  ===============  ==========================================================
``node_attrs["occupations"]``      ``[n, 2, D, D]``  on-site n^{I,s} of the scf hp.x perturbed, QE m order,
                                                     zero padded to ``D = 2 lmax + 1``; non-magnetic runs
                                                     carry two equal spin channels
``node_attrs["hubbard_l"]``        ``[n]``           manifold l of each atom, -1 where it has none
``node_attrs["hubbard_u_scf"]``    ``[n]``           U (eV) used in that scf, 0 where none
``edge_attrs["intersite_occupations"]``  ``[M, 2, D, D]``  n^{IJ,s} of the V couples (U+V only), rows on I
``edge_attrs["hubbard_v_scf"]``    ``[M, 1]``        V (eV) used in that scf on the couple (i, j, S)
``node_targets["hubbard_u"]``      ``[n, 1]``        U (eV) hp.x returned, NaN where none
``edge_targets["hubbard_v"]``      ``[M', 1]``       V (eV) hp.x returned on the couples (i, j, S)
=================================  ===============  ==========================================================

Edge keys are ``(i, j, S1, S2, S3)`` as in ``HubbardStructureData.hubbard.parameters`` and
docs/architecture.md (neighbour j at ``r_j + S.cell``).

:func:`hubbard_training_dataset` turns such a record into what the model reads: the raw matrices
become rotation-equivariant, spin-swap-invariant descriptors (``node_attrs[SITE_ATTR]``,
``edge_attrs[PAIR_ATTR]``, flat ``[n, irreps.dim]`` arrays whose irreps are
:func:`site_attr_irreps` / :func:`pair_attr_irreps`). Species one-hot is *not* in them: the model's
species-indexed embedding provides it (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np

from aiida_eqml.ml.dataset import Dataset, EdgeValues, Sample
from aiida_eqml.ml.targets import target_specs

from .occupations import occupation_irreps, spin_invariant_irreps, spin_invariant_irreps_of, to_e3nn_basis
from .quality import SCF_QUALITY_KEYS, filter_hubbard_record, hubbard_label_issues, spin_channel_gaps

__all__ = [
    "SITE_ATTR",
    "PAIR_ATTR",
    "HUBBARD_EV_SCALE",
    "HUBBARD_TARGET_SPECS",
    "RAW_NODE_ATTRS",
    "site_attr_irreps",
    "pair_attr_irreps",
    "site_features",
    "pair_features",
    "record_manifolds",
    "check_hubbard_record",
    "hubbard_record_sample",
    "hubbard_training_dataset",
    "SCF_QUALITY_KEYS",
    "hubbard_label_issues",
    "filter_hubbard_record",
    "spin_channel_gaps",
]

#: Names of the descriptor attributes the Hubbard models read.
SITE_ATTR = "hubbard_site"
PAIR_ATTR = "hubbard_pair"
#: U/V inputs enter the descriptors in units of 10 eV, so they are O(1) like the occupations.
HUBBARD_EV_SCALE = 10.0
#: From the target registry (:mod:`aiida_eqml.ml.targets`), like the AiiDA harvester's.
HUBBARD_TARGET_SPECS = target_specs("hubbard_u", "hubbard_v")
RAW_NODE_ATTRS = ("occupations", "hubbard_l", "hubbard_u_scf")
RAW_EDGE_ATTRS = ("intersite_occupations", "hubbard_v_scf")


# ----------------------------------------------------------------------------- irreps of the descriptors
def site_attr_irreps(manifold_ls: Sequence[int], max_l: int = 4, spin_order: bool = False) -> e3nn.Irreps:
    """One spin-invariant slot per manifold l (on-site block: even L), then ``U_scf`` (0e) and, with
    ``spin_order``, the local magnetic order (0e, :mod:`aiida_eqml.ml.hubbard.spin_order`)."""
    irreps = e3nn.Irreps("")
    for l in manifold_ls:
        irreps = irreps + spin_invariant_irreps_of(l, l, True, max_l)
    return irreps + e3nn.Irreps("0e") + e3nn.Irreps("0e" if spin_order else "")


def pair_attr_irreps(pair_ls: Sequence[tuple[int, int]], max_l: int = 4) -> e3nn.Irreps:
    """One spin-invariant slot per (l_I, l_J) block type, then ``V_scf`` (0e)."""
    irreps = e3nn.Irreps("")
    for l1, l2 in pair_ls:
        irreps = irreps + spin_invariant_irreps_of(l1, l2, False, max_l)
    return irreps + e3nn.Irreps("0e")


# ----------------------------------------------------------------------------- descriptors
def _block_invariants(blocks: np.ndarray, l1: int, l2: int, symmetric: bool, max_l: int) -> e3nn.IrrepsArray:
    """``[K, 2, D1, D2]`` QE blocks -> spin-swap invariants in e3nn's basis (see occupations.py)."""
    up = occupation_irreps(to_e3nn_basis(blocks[:, 0], l1, l2), l1, l2, symmetric)
    down = occupation_irreps(to_e3nn_basis(blocks[:, 1], l1, l2), l1, l2, symmetric)
    return spin_invariant_irreps(up, down, max_l)


def _two_channels(blocks: np.ndarray, what: str, square: bool = True) -> np.ndarray:
    """``[count, nspin, D1, D2]`` -> two spin channels (a non-magnetic run gets two equal ones)."""
    blocks = np.asarray(blocks, dtype=np.float64)
    if blocks.ndim != 4 or blocks.shape[1] not in (1, 2) or (square and blocks.shape[2] != blocks.shape[3]):
        shape = "D, D" if square else "D1, D2"
        raise ValueError(f"{what}: expected shape [count, nspin (1 or 2), {shape}], got {blocks.shape}")
    return np.repeat(blocks, 2, axis=1) if blocks.shape[1] == 1 else blocks


def site_features(
    occupations, hubbard_l, hubbard_u_scf, manifold_ls: Sequence[int], max_l: int = 4, spin_order=None
) -> e3nn.IrrepsArray:
    """Per-atom descriptors ``[n, site_attr_irreps(manifold_ls, spin_order=spin_order is not None)]`` from raw
    record arrays; ``spin_order``: ``[n]`` local magnetic order (:func:`aiida_eqml.ml.hubbard.spin_order.spin_order`)
    appended as the last scalar when given.

    Atoms whose manifold is not ``l`` get zeros in the slot of ``l`` (atoms without a manifold: all
    zeros but their ``U_scf``, which is 0 too).
    """
    occupations = _two_channels(occupations, "occupations")
    hubbard_l = np.asarray(hubbard_l, dtype=np.int64).reshape(-1)
    n = occupations.shape[0]
    if hubbard_l.shape != (n,):
        raise ValueError(f"hubbard_l must have shape ({n},), got {hubbard_l.shape}")
    unknown = sorted(set(hubbard_l.tolist()) - set(manifold_ls) - {-1})
    if unknown:
        raise ValueError(
            f"atoms with Hubbard manifold l={unknown} but the descriptor has slots for l={list(manifold_ls)}"
        )
    width = occupations.shape[-1]
    slots = []
    for l in manifold_ls:
        if 2 * l + 1 > width:
            raise ValueError(f"occupations are padded to {width} orbitals, too few for l={l}")
        values = _block_invariants(occupations[:, :, : 2 * l + 1, : 2 * l + 1], l, l, True, max_l)
        slots.append(values * jnp.asarray(hubbard_l == l, jnp.float32)[:, None])
    u_scf = np.asarray(hubbard_u_scf, dtype=np.float64).reshape(n, 1) / HUBBARD_EV_SCALE
    slots.append(e3nn.IrrepsArray("0e", jnp.asarray(u_scf, jnp.float32)))
    if spin_order is not None:
        slots.append(e3nn.IrrepsArray("0e", jnp.asarray(np.reshape(spin_order, (n, 1)), jnp.float32)))
    return e3nn.concatenate(slots, axis=-1)


def pair_features(
    intersite_occupations, pair_l, hubbard_v_scf, pair_ls: Sequence[tuple[int, int]], max_l: int = 4
) -> e3nn.IrrepsArray:
    """Per-couple descriptors ``[M, pair_attr_irreps(pair_ls)]``; ``pair_l [M, 2]`` = (l_I, l_J)."""
    blocks = _two_channels(intersite_occupations, "intersite_occupations")
    m = blocks.shape[0]
    pair_l = np.asarray(pair_l, dtype=np.int64).reshape(m, 2)
    unknown = sorted({tuple(p) for p in pair_l.tolist()} - {tuple(p) for p in pair_ls})
    if unknown:
        raise ValueError(
            f"couples with (l_I, l_J)={unknown} but the descriptor has slots for {list(map(tuple, pair_ls))}"
        )
    slots = []
    for l1, l2 in pair_ls:
        values = _block_invariants(blocks[:, :, : 2 * l1 + 1, : 2 * l2 + 1], l1, l2, False, max_l)
        slots.append(values * jnp.asarray((pair_l[:, 0] == l1) & (pair_l[:, 1] == l2), jnp.float32)[:, None])
    v_scf = np.asarray(hubbard_v_scf, dtype=np.float64).reshape(m, 1) / HUBBARD_EV_SCALE
    return e3nn.concatenate(slots + [e3nn.IrrepsArray("0e", jnp.asarray(v_scf, jnp.float32))], axis=-1)


# ----------------------------------------------------------------------------- the record
def check_hubbard_record(dataset: Dataset) -> None:
    """Raise ``ValueError`` naming the sample and field when ``dataset`` is not a Hubbard record."""
    if "hubbard_u" not in dataset.target_specs and "hubbard_v" not in dataset.target_specs:
        raise ValueError(
            f"not a Hubbard record: no 'hubbard_u' / 'hubbard_v' target (targets: {list(dataset.target_specs)})"
        )
    for name in ("hubbard_u", "hubbard_v"):
        spec = dataset.target_specs.get(name)
        if spec is not None and (spec.get("level"), spec.get("irreps")) != (
            HUBBARD_TARGET_SPECS[name]["level"],
            HUBBARD_TARGET_SPECS[name]["irreps"],
        ):
            raise ValueError(f"target {name!r} must be {HUBBARD_TARGET_SPECS[name]}, got {spec}")
    for index, s in enumerate(dataset.samples):
        missing = [k for k in RAW_NODE_ATTRS if k not in s.node_attrs]
        if missing:
            raise ValueError(
                f"{s.label(index)}: Hubbard record lacks node attribute(s) {missing} (has {sorted(s.node_attrs)})"
            )
        occ = s.node_attrs["occupations"]
        if occ.ndim != 4 or occ.shape[1] != 2 or occ.shape[2] != occ.shape[3] or occ.shape[2] % 2 == 0:
            raise ValueError(
                f"{s.label(index)}: node attribute 'occupations' must be [n, 2, D, D] with odd D, got {occ.shape}"
            )
        has_pairs = "intersite_occupations" in s.edge_attrs
        if has_pairs != ("hubbard_v_scf" in s.edge_attrs):
            raise ValueError(f"{s.label(index)}: give both or neither of the edge attributes {list(RAW_EDGE_ATTRS)}")
        if has_pairs and not np.array_equal(
            s.edge_attrs["intersite_occupations"].keys, s.edge_attrs["hubbard_v_scf"].keys
        ):
            raise ValueError(
                f"{s.label(index)}: 'intersite_occupations' and 'hubbard_v_scf' have different (i, j, S) keys"
            )
        if "hubbard_v" in s.edge_targets and not has_pairs:
            raise ValueError(
                f"{s.label(index)}: has V targets but no inter-site occupations "
                "(edge attribute 'intersite_occupations')"
            )


def record_manifolds(dataset: Dataset) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """``(manifold_ls, pair_ls)`` present in a Hubbard record (sorted), for the descriptor slots."""
    ls, pairs = set(), set()
    for s in dataset.samples:
        hubbard_l = s.node_attrs["hubbard_l"].astype(np.int64)
        ls |= set(hubbard_l[hubbard_l >= 0].tolist())
        if "intersite_occupations" in s.edge_attrs:
            keys = s.edge_attrs["intersite_occupations"].keys
            pairs |= {(int(hubbard_l[i]), int(hubbard_l[j])) for i, j in keys[:, :2].tolist()}
    return tuple(sorted(ls)), tuple(sorted(pairs))


def hubbard_record_sample(
    atoms,
    onsite: dict[int, np.ndarray],
    hubbard_u_scf: dict[int, float],
    target_u: dict[int, float] | None = None,
    intersite: dict[tuple[int, ...], np.ndarray] | None = None,
    hubbard_v_scf: dict[tuple[int, ...], float] | None = None,
    target_v: dict[tuple[int, ...], float] | None = None,
    width: int = 5,
    info: dict | None = None,
) -> Sample:
    """One record sample from plain arrays (what the AiiDA harvester builds from its nodes).

    onsite: ``{atom: [nspin, 2l+1, 2l+1]}`` (QE m order); intersite: ``{(i, j, S1, S2, S3): [nspin,
    2l_i+1, 2l_j+1]}``; U/V in eV. Targets missing for an atom / couple are NaN (masked).
    """
    n = len(atoms)
    occupations = np.zeros((n, 2, width, width))
    hubbard_l = -np.ones(n, dtype=np.int64)
    for atom, block in onsite.items():
        block = _two_channels(np.asarray(block)[None], f"onsite[{atom}]")[0]
        d = block.shape[-1]
        if d > width:
            raise ValueError(f"onsite[{atom}] has {d} orbitals, more than width={width}")
        occupations[atom, :, :d, :d] = block
        hubbard_l[atom] = (d - 1) // 2
    u_scf = np.zeros(n)
    for atom, value in hubbard_u_scf.items():
        u_scf[atom] = value
    node_targets = {}
    if target_u is not None:
        u = np.full((n, 1), np.nan)
        for atom, value in target_u.items():
            u[atom, 0] = value
        node_targets["hubbard_u"] = u
    edge_attrs, edge_targets = {}, {}
    if intersite:
        keys = np.array(sorted(intersite), dtype=np.int64)
        blocks = np.zeros((len(keys), 2, width, width))
        for k, key in enumerate(keys.tolist()):
            block = _two_channels(np.asarray(intersite[tuple(key)])[None], f"intersite[{tuple(key)}]", square=False)[0]
            blocks[k, :, : block.shape[1], : block.shape[2]] = block
        v = [float((hubbard_v_scf or {}).get(tuple(key), 0.0)) for key in keys.tolist()]
        edge_attrs = {"intersite_occupations": (keys, blocks), "hubbard_v_scf": (keys, np.array(v)[:, None])}
    if target_v:
        keys = np.array(sorted(target_v), dtype=np.int64)
        edge_targets["hubbard_v"] = (keys, np.array([[target_v[tuple(k)]] for k in keys.tolist()]))
    return Sample.from_ase(
        atoms,
        node_targets=node_targets,
        edge_targets=edge_targets,
        node_attrs={"occupations": occupations, "hubbard_l": hubbard_l, "hubbard_u_scf": u_scf},
        edge_attrs=edge_attrs,
        info=dict(info or {}),
    )


def hubbard_training_dataset(
    record: Dataset,
    manifold_ls: Sequence[int] | None = None,
    pair_ls: Sequence[tuple[int, int]] | None = None,
    max_l: int = 4,
    spin_order: bool = False,
    scf_inputs: bool = True,
) -> tuple[Dataset, dict[str, dict[str, str]]]:
    """Record -> ``(dataset with descriptor attributes, {"node_attrs": ..., "edge_attrs": ...})``.

    The second item is the irreps to put in the model config (``config["node_attrs"]`` /
    ``config["edge_attrs"]``). ``manifold_ls`` / ``pair_ls`` default to those in the record; pass
    them explicitly so that a model trained on one record reads another one. ``spin_order``: the site descriptor
    ends with each site's local magnetic order (:mod:`aiida_eqml.ml.hubbard.spin_order`). ``scf_inputs=False``:
    the U_scf / V_scf slots are zero, so the model reads the ground state only through its occupations (the
    parameters the scf ran with are the previous iteration's output, which a model would otherwise learn to copy:
    docs/hubbard.md, "The scf's own U and V as inputs"). Raw attributes and targets are kept (the model only reads
    what its config names).
    """
    from .spin_order import spin_order as local_spin_order

    check_hubbard_record(record)
    found_ls, found_pairs = record_manifolds(record)
    manifold_ls = tuple(found_ls if manifold_ls is None else manifold_ls)
    pair_ls = tuple(tuple(p) for p in (found_pairs if pair_ls is None else pair_ls))
    if not manifold_ls:
        raise ValueError("the record has no atom with a Hubbard manifold (all hubbard_l are -1)")
    samples = []
    for s in record.samples:
        node_attrs = dict(s.node_attrs)
        node_attrs[SITE_ATTR] = np.asarray(
            site_features(
                s.node_attrs["occupations"],
                s.node_attrs["hubbard_l"],
                s.node_attrs["hubbard_u_scf"] if scf_inputs else np.zeros_like(s.node_attrs["hubbard_u_scf"]),
                manifold_ls,
                max_l,
                local_spin_order(s.numbers, s.positions, s.cell, s.pbc, s.node_attrs["occupations"],
                                 s.node_attrs["hubbard_l"]) if spin_order else None,
            ).array,
            dtype=np.float64,
        )
        edge_attrs = dict(s.edge_attrs)
        if pair_ls:
            hubbard_l = s.node_attrs["hubbard_l"].astype(np.int64)
            if "intersite_occupations" in s.edge_attrs:
                occ, v_scf = s.edge_attrs["intersite_occupations"], s.edge_attrs["hubbard_v_scf"]
                keys = occ.keys
                v_in = v_scf.values if scf_inputs else np.zeros_like(v_scf.values)
                features = pair_features(occ.values, hubbard_l[keys[:, :2]], v_in, pair_ls, max_l).array
            else:  # a U-only sample read by a U+V model: no couple carries a descriptor
                keys, features = np.zeros((0, 5), np.int64), np.zeros((0, pair_attr_irreps(pair_ls, max_l).dim))
            edge_attrs[PAIR_ATTR] = EdgeValues(keys=keys, values=np.asarray(features, dtype=np.float64))
        samples.append(
            Sample(
                numbers=s.numbers,
                positions=s.positions,
                cell=s.cell,
                pbc=s.pbc,
                node_targets=dict(s.node_targets),
                graph_targets=dict(s.graph_targets),
                edge_targets=dict(s.edge_targets),
                node_attrs=node_attrs,
                edge_attrs=edge_attrs,
                info=dict(s.info),
            )
        )
    attrs = {"node_attrs": {SITE_ATTR: str(site_attr_irreps(manifold_ls, max_l, spin_order))}, "edge_attrs": {}}
    if pair_ls:
        attrs["edge_attrs"][PAIR_ATTR] = str(pair_attr_irreps(pair_ls, max_l))
    return Dataset(samples, record.target_specs), attrs
