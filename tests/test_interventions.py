"""Interventions: erasures made of hooks, installed and removed exactly, taken wherever an edit is."""
import pytest
import torch

from conftest import same_state, state_of
from workbench.attacks.common import unedited
from workbench.edits import Edit, applied
from workbench.interventions import Scaled, load, suspended
from workbench.methods import uce
from workbench.metrics import evaluate
from workbench.sampling import generate


def _silence(site: str = "unet.mid.0.xattn.out") -> Scaled:
    return Scaled({"scale": torch.tensor(0.0)}, "scaled", "apple", params={"sites": [site]})


def _pixels(pipe) -> bytes:
    return generate(pipe, ["an apple"], steps=2)[0].tobytes()


def test_an_intervention_changes_the_images_while_applied_and_nothing_after(toy):
    state, before = state_of(toy), _pixels(toy)
    with _silence().apply(toy):
        assert _pixels(toy) != before and same_state(toy, state)
    assert _pixels(toy) == before and applied(toy) == []


def test_interventions_and_edits_nest_and_undo_in_any_order(toy):
    state, before = state_of(toy), _pixels(toy)
    edit = uce(toy, "apple")
    with edit.apply(toy), _silence().apply(toy):
        assert [e.method for e in applied(toy)] == ["uce", "scaled"]
    with _silence().apply(toy), edit.apply(toy):
        pass
    assert same_state(toy, state) and _pixels(toy) == before


def test_suspended_and_unedited_turn_interventions_off_and_back_on(toy):
    before = _pixels(toy)
    with _silence().apply(toy):
        silenced = _pixels(toy)
        with suspended(toy):
            assert _pixels(toy) == before
        with unedited(toy):
            assert _pixels(toy) == before
        assert _pixels(toy) == silenced


def test_an_intervention_saves_and_loads_as_its_own_kind_and_edits_load_as_edits(tmp_path):
    path = _silence().save(tmp_path / "silence.safetensors")
    back = load(path)
    assert isinstance(back, Scaled) and back.parts == ["unet.mid.0.xattn.out"] and float(back.tensors["scale"]) == 0
    edit_path = Edit({"a.weight": torch.ones(2)}, "uce", "apple").save(tmp_path / "edit.safetensors")
    assert isinstance(load(edit_path), Edit)
    with pytest.raises(FileNotFoundError, match="no erasure file"):
        load(tmp_path / "missing.safetensors")


def test_an_intervention_on_a_module_the_model_lacks_is_refused_with_the_blocks_it_has(toy):
    with pytest.raises(ValueError, match="left unchanged.*unet.mid"):
        with _silence("unet.nowhere").apply(toy):
            pass
    assert applied(toy) == []


def test_metrics_measure_an_intervention_as_they_measure_an_edit(toy, oracle):
    scores = evaluate(toy, oracle, "apple", edit=_silence("unet.mid"), per_prompt=1, per_other=1, others=["car"])
    assert 0 <= scores["accuracy"] <= 1 and applied(toy) == []
