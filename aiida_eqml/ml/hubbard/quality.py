"""The quality filter of Hubbard labels: which hp.x labels to trust, from the scf it perturbed (no aiida import).

A label is kept when its scf converged and is gapped in each spin channel (:func:`hubbard_label_issues`); the
gaps come from the pw.x bands (:func:`spin_channel_gaps`). Flagged labels stay in the record (``info``) and are
neither trained on nor scored (:func:`filter_hubbard_record`). Re-exported by :mod:`.records`.
"""

from __future__ import annotations

import numpy as np

from aiida_eqml.ml.dataset import Dataset

__all__ = ["SCF_QUALITY_KEYS", "filter_hubbard_record", "hubbard_label_issues", "spin_channel_gaps"]


def spin_channel_gaps(bands, occupations, weights, fermi_energy=None, tol: float = 0.01):
    """``[(electrons, gap_eV)]`` per spin channel of a pw.x run from its bands ``[nspin, nk, nb]`` (eV),
    occupations (same shape, 0..1 per state; 0..2 for a non-polarized run, halved here), k weights and, for smeared
    occupations, the Fermi energy.

    Smearing: a channel is metallic (gap 0) when one of its bands crosses the Fermi energy on the k
    mesh; otherwise the gap is lowest band above minus highest band below E_F. (The electron count of
    a gapped channel can be off an integer by ~0.02 under cold smearing, so it is reported but not
    used.) Fixed occupations: the channel holds an integer number N of electrons (else gap 0) and the
    gap is min_k e_{N+1} - max_k e_N, negative when filled and empty bands overlap. Pure numpy.
    """
    bands, occupations = np.asarray(bands, float), np.asarray(occupations, float)
    if bands.ndim == 2:
        bands, occupations = bands[None], occupations[None]
        if occupations.max(initial=0.0) > 1.0 + tol:
            # a non-polarized run stores 2 electrons per state (aiida's BandsData): one channel, half of each
            occupations = occupations / 2.0
    w = np.asarray(weights, float) / np.sum(weights)
    out = []
    for e, f in zip(bands, occupations):
        electrons = float(np.sum(w[:, None] * f))
        if fermi_energy is not None:
            below, above = np.all(e < fermi_energy, axis=0), np.all(e > fermi_energy, axis=0)
            if not np.all(below | above) or not below.any() or not above.any():
                gap = 0.0
            else:
                gap = float(np.min(e[:, above]) - np.max(e[:, below]))
        else:
            n = int(round(electrons))
            if abs(electrons - n) > tol:
                gap = 0.0
            elif n == 0 or n >= e.shape[1]:
                gap = float("nan")
            else:
                gap = float(np.min(e[:, n]) - np.max(e[:, n - 1]))
        out.append((electrons, gap))
    if len(out) == 1:
        out = out * 2
    return out


#: ``Sample.info`` scalars describing the scf that hp.x perturbed, read by :func:`hubbard_label_issues`
#: (written from the pw.x outputs by ``harvest_hubbard_labels``, i.e. by every ``eqml.labels.hubbard`` run,
#: see ``aiida_eqml.calculations.functions.harvest.scf_diagnostics``).
#: Band gaps are per spin channel (eV): the gap between the highest filled and lowest empty band of that
#: channel over the k mesh, 0 when the channel is partially filled (metallic, fractional electron count).
SCF_QUALITY_KEYS = ("scf_converged", "band_gap_up_ev", "band_gap_down_ev", "total_magnetization")


def hubbard_label_issues(
    info: dict,
    *,
    require_converged: bool = True,
    min_gap_ev: float | None = 0.0,
    channels: str = "both",
) -> list[str]:
    """Why the hp.x label of one sample should not be trusted (empty list: keep it).

    Uses only scalars of the scf that hp.x perturbed (:data:`SCF_QUALITY_KEYS` in ``info``), never
    the U/V label itself:

    * ``require_converged``: the scf reached self-consistency;
    * ``min_gap_ev``: the perturbed ground state is gapped by more than this in each spin channel
      (``channels="both"``) or in the majority channel only (``channels="majority"``, the channel
      with the larger electron count, i.e. the sign of the total magnetization; both when it is 0).
      ``None`` skips the check. A metallic ground state makes hp.x's response contain a
      Fermi-surface term that the coarse k meshes used for labels do not converge.

    Raises ``ValueError`` when a needed key is missing (an old record without scf diagnostics).
    """
    if channels not in ("both", "majority"):
        raise ValueError(f"channels must be 'both' or 'majority', got {channels!r}")
    needed = ["scf_converged"] if require_converged else []
    if min_gap_ev is not None:
        needed += ["band_gap_up_ev", "band_gap_down_ev", "total_magnetization"]
    missing = [k for k in needed if k not in info]
    if missing:
        raise ValueError(f"{info.get('name', 'sample')}: no scf diagnostics {missing} in info (re-harvest the record)")
    issues = []
    if require_converged and not info["scf_converged"]:
        issues.append("scf not converged")
    if min_gap_ev is not None:
        gaps = {"up": float(info["band_gap_up_ev"]), "down": float(info["band_gap_down_ev"])}
        if channels == "majority":
            m = float(info["total_magnetization"])
            gaps = {k: v for k, v in gaps.items() if abs(m) < 1e-6 or (k == "up") == (m > 0)}
        for spin, gap in gaps.items():
            if not gap > min_gap_ev:
                issues.append(
                    f"{spin}-spin channel {'metallic' if gap <= 0 else f'gap {gap:.2f} eV'} (needs > {min_gap_ev:g} eV)"
                )
    return issues


def filter_hubbard_record(record: Dataset, **criteria) -> tuple[Dataset, dict[str, list[str]]]:
    """``(kept samples, {sample name: issues} of the removed ones)`` with :func:`hubbard_label_issues`."""
    kept, removed = [], {}
    for index, s in enumerate(record.samples):
        name = s.info.get("name", s.label(index))
        issues = hubbard_label_issues({**s.info, "name": name}, **criteria)
        if issues:
            removed[name] = issues
        else:
            kept.append(index)
    return record.subset(kept), removed
