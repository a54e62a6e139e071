import sys

import numpy as np
import pytest
import torch
from PIL import Image

import workbench
from conftest import same_state, state_of
from workbench.anatomy import parts
from workbench.edits import Edit, applied
from workbench.embed import encode
from workbench.methods import fewshot, rece, uce
from workbench.methods.rece import derive_embedding
from workbench.methods.solver import Gram, solve
from workbench.toy import TOY_CONCEPTS, TOY_LAMBDA

APPLES = TOY_CONCEPTS.image_folder("apple")


def test_solver_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    Ce, Ve, Cp = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64),
                  torch.randn(7, 5, generator=g, dtype=torch.float64))
    lam, se, sp = 0.5, 1.3, 0.7
    expected = (lam * W0 + se * Ve.T @ Ce + sp * (W0 @ Cp.T) @ Cp) @ torch.linalg.inv(
        lam * torch.eye(5, dtype=torch.float64) + se * Ce.T @ Ce + sp * Cp.T @ Cp)
    got = solve(W0, Gram.of(Ce), Ve, Ce, Gram.of(Cp), lam=lam, erase_scale=se, preserve_scale=sp)
    assert float((got - expected).norm() / expected.norm()) < 1e-6


@pytest.mark.parametrize("prompt, word", [("apple", 1), ("a photo of an apple", 5),
                                          ("a painting by mondrian", 4)])  # mon ##dr ##ian: all three
def test_uce_matches_the_formula_on_the_toy_model(toy, prompt, word):
    edit = uce(toy, prompt, preserve=["a pear", "a car"], lam=0.5)
    emb = encode(toy, [prompt, "", "a pear", "a car"]).double()
    W0 = parts(toy)["unet.mid.0.xattn.k"].weight.detach().double()
    # [CLS] a photo of an apple [SEP] ...: only the rows from the last word's first token on are erased,
    # onto the empty prompt's rows from its start token on
    Ce, Cg, Cp = emb[0, word:], emb[1, :-word], emb[2:].reshape(-1, emb.shape[-1])
    sp = 1.0
    expected = (0.5 * W0 + (Cg @ W0.T).T @ Ce + sp * W0 @ Cp.T @ Cp) @ torch.linalg.inv(
        0.5 * torch.eye(W0.shape[1], dtype=torch.float64) + Ce.T @ Ce + sp * Cp.T @ Cp)
    got = W0 + edit.deltas["unet.mid.0.xattn.k.weight"].double()
    assert float((got - expected).norm() / (expected - W0).norm()) < 1e-4  # float32 deltas
    assert edit.method == "uce" and set(edit.parts) == {n for n in parts(toy) if n.endswith((".xattn.k", ".xattn.v"))}


def test_rece_epoch_matches_the_formula_on_the_toy_model(toy):
    """One RECE epoch: the concept and its derived embedding both in the erase set (float64 formula)."""
    edit = rece(toy, "apple", preserve=["a pear"], epochs=1, ridge=0.01, uce_lam=0.5, lam=0.1,
                preserve_scale=0.1, preserve_at="original", preserve_empty=False)  # the toy's variant
    name = "unet.mid.0.xattn.v"
    first = uce(toy, "apple", preserve=["a pear"], lam=0.5)
    emb = encode(toy, ["apple", "", "a pear"]).double()
    W0 = parts(toy)[name].weight.detach().double()
    names = [n for n in parts(toy) if n.endswith((".xattn.k", ".xattn.v"))]
    W1 = {n: parts(toy)[n].weight.detach().double() + first.deltas[f"{n}.weight"].double() for n in names}
    Wb = {n: parts(toy)[n].weight.detach().double() for n in names}
    A = sum(W1[n].T @ W1[n] for n in names) + 0.01 * torch.eye(emb.shape[-1], dtype=torch.float64)
    B = sum(W1[n].T @ Wb[n] for n in names)
    derived = emb[0] @ torch.linalg.solve(A, B).T
    assert torch.allclose(edit.extras["derived.0"].double(), derived, rtol=1e-3, atol=1e-4)
    K = torch.cat([emb[0, 1:], derived[1:]])
    V = torch.cat([emb[1, :-1] @ W0.T, emb[1, :-1] @ W1[name].T])
    Cp = emb[2]
    eye = torch.eye(W0.shape[1], dtype=torch.float64)
    expected = (0.1 * W1[name] + V.T @ K + 0.1 * W0 @ Cp.T @ Cp) @ torch.linalg.inv(
        0.1 * eye + K.T @ K + 0.1 * Cp.T @ Cp)
    got = W0 + edit.deltas[f"{name}.weight"].double()
    assert float((got - expected).norm() / (expected - W0).norm()) < 1e-4


def test_rece_derived_embedding_solves_its_normal_equations():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(8, 5, generator=g), "b": torch.randn(6, 5, generator=g)}
    cur = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    c = torch.randn(3, 5, generator=g)
    derived = derive_embedding(base, cur, c, ridge=0.01).double()
    A = sum(cur[k].double().T @ cur[k].double() for k in base) + 0.01 * torch.eye(5, dtype=torch.float64)
    B = sum(cur[k].double().T @ base[k].double() for k in base)
    assert torch.allclose(derived @ A.T, c.double() @ B.T, rtol=1e-5, atol=1e-5)


def test_rece_returns_derived_embeddings_and_keeps_the_best_epoch(toy):
    state = state_of(toy)
    scores = iter([0.0, 5.0, 1.0, 2.0])
    edit = rece(toy, "apple", epochs=3, validate=lambda e: next(scores))
    assert edit.params["best_epoch"] == 1 and len(edit.extras) == 3
    assert edit.extras["derived.0"].shape == (20, 384)
    assert same_state(toy, state)  # methods never change the pipeline


@pytest.mark.parametrize("model", ["toy", "toy_bf16"])  # bfloat16: half-precision weights, float32 edits, as on a GPU
@pytest.mark.parametrize("selector", ["unet.*.xattn.[kv]", ["unet.down.1.0.xattn.k", "unet.mid.0.xattn.v"]])
def test_matrices_solved_together_give_the_edit_of_solving_them_one_by_one(request, monkeypatch, model, selector):
    pipe = request.getfixturevalue(model)
    edits = lambda: [uce(pipe, "apple", preserve=["a pear"], parts=selector),  # noqa: E731
                     rece(pipe, "apple", preserve=["a pear"], parts=selector, epochs=2),
                     rece(pipe, "apple", preserve=["a pear"], parts=selector, epochs=2, preserve_at="original")]
    one_by_one = edits()
    together = lambda weights: [list(weights)]  # noqa: E731 (as on a GPU)
    for module in ("workbench.methods.uce", "workbench.methods.rece"):  # the names of the modules' functions too
        monkeypatch.setattr(sys.modules[module], "groups", together)
    stacked = edits()
    for a, b in zip(one_by_one, stacked):
        assert a.deltas.keys() == b.deltas.keys() and len(a.deltas) == (2 * 7 if isinstance(selector, str) else 2)
        for key in a.deltas:
            assert torch.allclose(a.deltas[key], b.deltas[key], rtol=1e-4, atol=1e-6 * float(a.deltas[key].abs().max()))
    assert torch.allclose(one_by_one[1].extras["derived.1"], stacked[1].extras["derived.1"], rtol=1e-4, atol=1e-5)


def test_apply_and_revert_are_exact_and_edits_stack(toy):
    state = state_of(toy)
    a, b = uce(toy, "apple"), uce(toy, "car")
    with a.apply(toy), b.apply(toy):
        assert applied(toy) == [a, b]
        assert not same_state(toy, state)
    assert same_state(toy, state) and applied(toy) == []


def test_save_load_roundtrip_and_wrong_model(toy, tiny_sd_dir, tmp_path):
    edit = rece(toy, "cat", epochs=1)
    loaded = Edit.load(edit.save(tmp_path / "cat.safetensors"))
    assert loaded.method == "rece" and loaded.params["ridge"] == edit.params["ridge"]
    assert all(torch.equal(loaded.deltas[k], v) for k, v in edit.deltas.items())
    assert torch.equal(loaded.extras["derived.0"], edit.extras["derived.0"])
    sd = workbench.load(tiny_sd_dir)
    state = state_of(sd)
    with pytest.raises(ValueError, match="made for another model"):
        with loaded.apply(sd):
            pass
    assert same_state(sd, state)


def test_summary_reports_norms(toy):
    table = uce(toy, "apple").summary(toy)
    assert len(table) == 14 and (table["dW"] > 0).all() and (table["relative"] < 1).all()


def test_nan_result_is_refused(toy):
    W = parts(toy)["unet.mid.0.xattn.k"].weight.detach()
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        Edit.between({"x": W}, {"x": W * float("nan")}, method="uce", concept="apple")


def test_concept_that_tokenizes_to_nothing(toy):
    state = state_of(toy)
    for method in (uce, rece, fewshot):
        with pytest.raises(ValueError, match="tokenizes to nothing"):
            method(toy, "   ")
    assert same_state(toy, state)


def test_fewshot_changes_only_selected_parts(toy):
    state = state_of(toy)
    edit = fewshot(toy, "apple", APPLES, parts="text.2.ffn", steps=2, lr=1e-3, progress=False)
    assert set(edit.parts) == {"text.2.ffn.in", "text.2.ffn.out"}
    assert all(float(d.abs().max()) > 0 for d in edit.deltas.values())
    assert same_state(toy, state)
    with edit.apply(toy):
        now = state_of(toy)
        changed = {k for k, v in state.items() if not torch.equal(now[k], v)}
    assert changed == {f"te.encoder.layer.2.{m}.dense.{w}" for m in ("intermediate", "output") for w in ("weight", "bias")}
    assert same_state(toy, state)


def test_fewshot_is_deterministic(toy):
    a = fewshot(toy, "cat", TOY_CONCEPTS.image_folder("cat"), steps=2, lr=1e-4, progress=False)
    b = fewshot(toy, "cat", TOY_CONCEPTS.image_folder("cat"), steps=2, lr=1e-4, progress=False)
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)


def test_fewshot_image_folders(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image folder"):
        fewshot(toy, "apple", images=tmp_path / "missing", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable images"):
        fewshot(toy, "apple", images=empty, progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("not an image")
    Image.fromarray(np.full((50, 70, 3), 200, np.uint8)).save(mixed / "odd.png")
    with pytest.warns(UserWarning, match="notes.txt: not an image"):
        edit = fewshot(toy, "apple", images=mixed, steps=1, progress=False)
    assert edit.params["n_images"] == 1


def test_uce_refuses_text_parts(toy):
    with pytest.raises(ValueError, match="few-shot"):
        uce(toy, "apple", parts="text.1.ffn")


@pytest.mark.slow
def test_erase_fills_in_the_toy_defaults_and_knobs_override_them(toy):
    from workbench.methods import erase

    edit = erase(toy, "apple", "rece", epochs=1)
    assert {k: edit.params[k] for k in TOY_LAMBDA["rece"]} == TOY_LAMBDA["rece"] and edit.params["epochs"] == 1
    assert erase(toy, "apple", "uce", lam=0.3).params["lam"] == 0.3
    assert uce(toy, "apple").params["lam"] == 0.5  # the method itself keeps the paper's value


@pytest.fixture
def registered():
    """A copy of UCE registered as "uce_v" (values only, its own knob control), removed afterwards."""
    from workbench.methods import REGISTRY, Knob, register

    def uce_v(pipe, erase, guide="", preserve=(), parts="unet.*.xattn.v", lam=0.5):
        return uce(pipe, erase, guide, preserve, parts, lam)

    try:
        yield register("uce_v", uce_v, "unet.*.xattn.v", ["xattn.v"], [Knob("lam", "UCE-v lambda", "log", -2, 1,
                                                                                 control="lam_v")])
    finally:
        REGISTRY.pop("uce_v", None)


def test_a_method_registered_once_appears_in_the_sweep_scope_and_the_panel_knobs(toy, registered):
    from workbench.methods import METHODS, erase, quick
    from workbench.sweep import SCOPE, layer_sweep, layers
    from workbench.widgets import ErasePanel

    assert METHODS["uce_v"] is registered.fn and list(METHODS)[-1] == "uce_v" and "uce_v" in quick()
    assert SCOPE["uce_v"] == ("unet.*.xattn.v", ("xattn.v",))
    assert ErasePanel.KNOBS["lam_v"] == ("uce_v", "lam")
    assert layers(toy, "uce_v") == layers(toy, "uce")
    assert erase(toy, "apple", "uce_v", lam=0.3).params["lam"] == 0.3
    table = layer_sweep(toy, "apple", method="uce_v", layers=[0], measure=False, progress=False)
    assert table["part"].tolist() == [f"{layers(toy, 'uce')[0]}.xattn.v"]


def test_a_knob_the_method_does_not_take_or_another_methods_control_is_refused_at_registration():
    from workbench.methods import REGISTRY, Knob, register

    with pytest.raises(ValueError, match="no knob 'alpha'"):
        register("uce_bad", uce, "unet.*.xattn.[kv]", ["xattn.k"], [Knob("alpha", "alpha", "log", -2, 1)])
    with pytest.raises(ValueError, match="control 'lam' is already uce's"):
        register("uce_bad", uce, "unet.*.xattn.[kv]", ["xattn.k"], [Knob("lam", "lambda", "log", -2, 1)])
    assert "uce_bad" not in REGISTRY


def test_the_tables_derived_from_the_registry_are_the_ones_the_workbench_listed_by_hand():
    from workbench.methods import METHODS, esd, prune, quick, sae
    from workbench.sweep import SCOPE
    from workbench.widgets import ErasePanel

    assert dict(METHODS) == {"rece": rece, "uce": uce, "fewshot": fewshot, "esd": esd, "prune": prune, "sae": sae}
    assert dict(SCOPE) == {"rece": ("unet.*.xattn.[kv]", ("xattn.k", "xattn.v")),
                           "uce": ("unet.*.xattn.[kv]", ("xattn.k", "xattn.v")),
                           "fewshot": ("text.*", ("ffn", "attn")), "esd": ("unet.*.xattn.k", ("attn", "xattn", "ffn")),
                           "prune": ("unet.*.ffn.out", ("ffn",)), "sae": ("", ())}
    assert dict(ErasePanel.KNOBS) == {"epochs": ("rece", "epochs"), "ridge": ("rece", "ridge"), "lam": ("uce", "lam"),
                                      "lr": ("fewshot", "lr"), "steps": ("fewshot", "steps"),
                                      "share": ("prune", "share"), "timesteps": ("prune", "timesteps"),
                                      "features": ("sae", "features")}
    assert quick() == ("rece", "uce", "fewshot")
