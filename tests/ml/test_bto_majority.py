"""bto400: the reference atom order is the majority's, so a faulty first record does not exclude the good ones."""
import numpy as np
from test_bto_loader import _write_record

from aiida_eqml.ml.datasets.bto import load_bto400


def test_faulty_first_record_is_the_one_excluded(tmp_path, reliability):
    rng = np.random.default_rng(3)
    _write_record(tmp_path, "00000", rng, symbols=["Ti", "Ba", "O", "O", "O"])  # the odd one, and the first file
    for index in ("00001", "00002", "00003"):
        _write_record(tmp_path, index, rng)
    dataset, report = load_bto400(tmp_path)
    assert report.loaded == ["structure_00001", "structure_00002", "structure_00003"] and len(dataset) == 3
    assert list(report.excluded) == ["structure_00000"]
    reason = " ".join(report.excluded["structure_00000"])
    assert "differs from the majority of records (3 of 4" in reason
    reliability.record(
        "load_bto400(root)",
        "first record with another atom order",
        f"that record excluded ({reason}); {len(dataset)} good records loaded",
    )
