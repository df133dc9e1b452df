"""``eqml.occupations``: Hubbard occupation matrices of one pw.x run (on-site and inter-site).

Arrays (QE's m order, ``D = 2 lmax + 1`` zero padding, spin axis of length nspin = 1 or 2):

==========================  =====================  ===============================================
``onsite_atoms``            ``[K]`` int            0-based atom index of each Hubbard manifold
``onsite_l``                ``[K]`` int            its angular momentum
``onsite``                  ``[K, nspin, D, D]``   n^{I,s}_{m m'}
``onsite_hubbard_u``        ``[K]`` float          U (eV) of that scf (0 if the atom has only V)
``intersite_keys``          ``[M, 5]`` int         (i, j, S1, S2, S3): neighbour j at cell S
``intersite``               ``[M, nspin, D, D]``   n^{IJ,s}_{m_I m_J}, rows on i, columns on j
``intersite_hubbard_v``     ``[M]`` float          V (eV) of that couple in that scf
``intersite_distances``     ``[M]`` float          |r_j + S.cell - r_i| (Angstrom)
==========================  =====================  ===============================================

Keys follow ``HubbardStructureData.hubbard.parameters`` (``atom_index, neighbour_index,
translation``) and the edge convention of docs/architecture.md. Attributes are queryable, e.g.
``QueryBuilder().append(OccupationMatricesData, filters={'attributes.hubbard_type': 'U+V'})``.
"""

from __future__ import annotations

import numpy as np
from aiida import orm

__all__ = ("OccupationMatricesData", "ORBITAL_ORDER_QE")

#: The m order of every stored matrix: QE's ylmr2 real harmonics (m = 0, +1, -1, +2, -2, ...).
ORBITAL_ORDER_QE = "qe_ylmr2"


class OccupationMatricesData(orm.ArrayData):
    """Occupation matrices n^{I} and n^{IJ} of a DFT+U or DFT+U+V pw.x calculation."""

    def __init__(
        self,
        *,
        nat: int,
        nspin: int,
        hubbard_type: str,
        qe_version: str,
        onsite: dict[int, np.ndarray],
        onsite_labels: dict[int, str],
        onsite_kinds: dict[int, str],
        onsite_hubbard_u: dict[int, float],
        intersite: list[tuple[tuple[int, int, int, int, int], np.ndarray, float, float]] = (),
        **kwargs,
    ):
        """Build from on-site blocks ``{atom: [nspin, 2l+1, 2l+1]}`` and inter-site entries
        ``(key, [nspin, 2l_i+1, 2l_j+1], V in eV, distance in Angstrom)``."""
        super().__init__(**kwargs)
        if hubbard_type not in ("U", "U+V"):
            raise ValueError(f"hubbard_type must be 'U' or 'U+V', got {hubbard_type!r}")
        if nspin not in (1, 2):
            raise ValueError(f"nspin must be 1 or 2, got {nspin}")
        if not onsite:
            raise ValueError("no on-site occupation matrix given")
        atoms = sorted(onsite)
        if atoms[0] < 0 or atoms[-1] >= nat:
            raise ValueError(f"on-site atom indices {atoms} outside 0..{nat - 1}")
        ls = []
        for atom in atoms:
            block = np.asarray(onsite[atom], dtype=np.float64)
            if (
                block.ndim != 3
                or block.shape[0] != nspin
                or block.shape[1] != block.shape[2]
                or block.shape[1] % 2 == 0
            ):
                raise ValueError(
                    f"on-site block of atom {atom} has shape {block.shape}, expected [nspin={nspin}, 2l+1, 2l+1]"
                )
            ls.append((block.shape[1] - 1) // 2)
        l_of = dict(zip(atoms, ls))
        width = 2 * max(ls) + 1
        padded = np.zeros((len(atoms), nspin, width, width))
        for k, atom in enumerate(atoms):
            d = 2 * l_of[atom] + 1
            padded[k, :, :d, :d] = onsite[atom]

        keys = np.zeros((len(intersite), 5), dtype=np.int64)
        blocks = np.zeros((len(intersite), nspin, width, width))
        values_v = np.zeros(len(intersite))
        distances = np.zeros(len(intersite))
        for k, (key, block, v, distance) in enumerate(intersite):
            i, j = key[0], key[1]
            if i not in l_of or j not in l_of:
                raise ValueError(f"inter-site key {tuple(key)} involves an atom without an on-site manifold")
            block = np.asarray(block, dtype=np.float64)
            expected = (nspin, 2 * l_of[i] + 1, 2 * l_of[j] + 1)
            if block.shape != expected:
                raise ValueError(f"inter-site block {tuple(key)} has shape {block.shape}, expected {expected}")
            keys[k] = key
            blocks[k, :, : expected[1], : expected[2]] = block
            values_v[k], distances[k] = v, distance
        if len(np.unique(keys, axis=0)) != len(keys):
            raise ValueError("duplicate inter-site keys")

        self.set_array("onsite_atoms", np.asarray(atoms, dtype=np.int64))
        self.set_array("onsite_l", np.asarray(ls, dtype=np.int64))
        self.set_array("onsite", padded)
        self.set_array("onsite_hubbard_u", np.asarray([onsite_hubbard_u.get(a, 0.0) for a in atoms], dtype=np.float64))
        self.set_array("intersite_keys", keys)
        self.set_array("intersite", blocks)
        self.set_array("intersite_hubbard_v", values_v)
        self.set_array("intersite_distances", distances)

        traces = np.trace(padded, axis1=2, axis2=3)
        self.base.attributes.set_many(
            {
                "nat": int(nat),
                "nspin": int(nspin),
                "hubbard_type": hubbard_type,
                "qe_version": qe_version,
                "orbital_order": ORBITAL_ORDER_QE,
                "onsite_atoms": [int(a) for a in atoms],
                "onsite_manifolds": [f"{onsite_kinds[a]}-{onsite_labels[a]}" for a in atoms],
                "onsite_traces": [[float(t) for t in row] for row in traces],
                "num_intersite": len(intersite),
            }
        )

    @property
    def nspin(self) -> int:
        return self.base.attributes.get("nspin")

    @property
    def hubbard_type(self) -> str:
        return self.base.attributes.get("hubbard_type")

    def _onsite_row(self, atom_index: int) -> int:
        atoms = list(self.get_array("onsite_atoms"))
        if atom_index not in atoms:
            raise KeyError(f"atom {atom_index} has no Hubbard manifold (atoms with one: {atoms})")
        return atoms.index(atom_index)

    def get_onsite(self, atom_index: int) -> np.ndarray:
        """n^{I} of ``atom_index`` as ``[nspin, 2l+1, 2l+1]`` (QE m order)."""
        row = self._onsite_row(atom_index)
        d = 2 * int(self.get_array("onsite_l")[row]) + 1
        return self.get_array("onsite")[row, :, :d, :d]

    def get_intersite(self, i: int, j: int, translation) -> np.ndarray:
        """n^{IJ} of atom ``i`` with neighbour ``j`` at cell ``translation``, ``[nspin, 2l_i+1, 2l_j+1]``."""
        key = np.array([int(i), int(j), *(int(t) for t in translation)])
        matches = np.flatnonzero((self.get_array("intersite_keys") == key).all(axis=1))
        if not len(matches):
            raise KeyError(f"no inter-site block for (i, j, S) = {tuple(key.tolist())}")
        l = dict(zip(self.get_array("onsite_atoms").tolist(), self.get_array("onsite_l").tolist()))
        return self.get_array("intersite")[matches[0], :, : 2 * l[i] + 1, : 2 * l[j] + 1]

    def descriptor_inputs(self) -> dict[str, np.ndarray]:
        """Per-atom padded arrays for ``aiida_eqml.ml.hubbard.site_descriptors`` and the pair arrays
        for ``pair_descriptors``: ``onsite [nat, nspin, D, D]``, ``site_l [nat]`` (-1: none),
        ``hubbard_u [nat]``, ``intersite_keys``, ``intersite``, ``pair_l``, ``hubbard_v``, ``distances``."""
        nat = self.base.attributes.get("nat")
        onsite = self.get_array("onsite")
        atoms = self.get_array("onsite_atoms")
        per_atom = np.zeros((nat,) + onsite.shape[1:])
        per_atom[atoms] = onsite
        site_l = -np.ones(nat, dtype=np.int64)
        site_l[atoms] = self.get_array("onsite_l")
        hubbard_u = np.zeros(nat)
        hubbard_u[atoms] = self.get_array("onsite_hubbard_u")
        keys = self.get_array("intersite_keys")
        return {
            "onsite": per_atom,
            "site_l": site_l,
            "hubbard_u": hubbard_u,
            "intersite_keys": keys,
            "intersite": self.get_array("intersite"),
            "pair_l": np.stack([site_l[keys[:, 0]], site_l[keys[:, 1]]], axis=1)
            if len(keys)
            else np.zeros((0, 2), np.int64),
            "hubbard_v": self.get_array("intersite_hubbard_v"),
            "distances": self.get_array("intersite_distances"),
        }
