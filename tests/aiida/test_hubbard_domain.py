"""The ML loop's domain check by element: U of an element, or V of an element pair, that no training label carried.

The descriptor of a site knows the shell (l), not the element, so a model trained on Ni 3d reads a Co 3d site without
complaint; only the record of which elements carried the labels (``metadata["hubbard"]["u_species"]`` and
``["v_species_pairs"]``, written at training) can refuse it. Real model nodes: the shipped ``hubbard-tmo`` members
(U+V heads), re-saved with those lists.
"""
import pytest


@pytest.fixture
def tmo_member(aiida_profile, tmp_path):
    """``make(u_species, v_species_pairs)`` -> a stored eqml.model: a hubbard-tmo member with those label lists."""
    from aiida_eqml.data.model import EqmlModelData
    from aiida_eqml.ml.hubbard.reference import reference_member_files
    from aiida_eqml.ml.modelfile import read_model_file, save_model

    config, params, metadata = read_model_file(reference_member_files('hubbard-tmo')[0])

    def make(u_species, v_species_pairs):
        slots = {**metadata['hubbard'], 'u_species': u_species, 'v_species_pairs': v_species_pairs}
        path = tmp_path / f'member-{len(list(tmp_path.iterdir()))}.eqml'
        save_model(path, config, params, {**metadata, 'hubbard': slots})
        return EqmlModelData(filepath=path).store()

    return make


def test_u_and_v_of_unlabelled_elements_are_refused(tmo_member):
    from aiida_eqml.local.hubbard_materials import hubbard_structure
    from aiida_eqml.workflows.hubbard.domain import ModelDomainError, check_model_domain

    licoo2 = hubbard_structure('LiCoO2-layered')  # U(Co 3d), V(Co 3d - O 2p)
    assert check_model_domain({'m0': tmo_member(['Co', 'Ni'], [['Co', 'O'], ['Ni', 'O']])}, licoo2, None)['predicts_v']

    with pytest.raises(ModelDomainError, match=r"trained on U labels of \['Mn', 'Ni'\]; the structure asks U of "
                                               r"\['Co'\]") as info:
        check_model_domain({'m0': tmo_member(['Mn', 'Ni'], [['Co', 'O']])}, licoo2, None)
    assert info.value.kind == 'species'  # the loop's exit code for an element outside the model

    with pytest.raises(ModelDomainError, match='trained on V labels of the element pairs Ni-O; the structure asks V '
                                               'of Co-O'):
        check_model_domain({'m0': tmo_member(['Co', 'Ni'], [['Ni', 'O']])}, licoo2, None)

    # a U-only structure of the same element needs no V label
    nio = hubbard_structure('NiO-rocksalt-afm2')
    assert not check_model_domain({'m0': tmo_member(['Ni'], [])}, nio, None)['predicts_v']
