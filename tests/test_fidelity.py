"""The methods' defaults follow their reference code (RECE, UCE, few-shot unlearning); the toy profile
keeps its own measured choices."""
import pytest
import torch

from workbench.anatomy import parts, select
from workbench.embed import encode
from workbench.methods import defaults, fewshot, rece, uce
from workbench.methods.fewshot import REFERENCE_TEMPLATES
from workbench.methods.rece import derive_embedding
from workbench.toy import TOY_CONCEPTS

APPLES = TOY_CONCEPTS.image_folder("apple")
XATTN = "unet.*.xattn.[kv]"


def _weights(toy, edit=None, names=None) -> dict[str, torch.Tensor]:
    """Float64 weights of every cross-attention k/v (or ``names``), with ``edit``'s deltas added."""
    names = names or select(toy, XATTN)
    table = parts(toy)
    return {n: table[n].weight.detach().double()
            + (edit.deltas[f"{n}.weight"].double() if edit is not None and f"{n}.weight" in edit.deltas else 0)
            for n in names}


def _closed_form(W, lam, K, V, Wp, Cp, sp):
    eye = torch.eye(W.shape[1], dtype=torch.float64)
    return (lam * W + V.T @ K + sp * Wp @ Cp.T @ Cp) @ torch.linalg.inv(lam * eye + K.T @ K + sp * Cp.T @ Cp)


def test_rece_epochs_map_derived_rows_onto_the_guide_under_current_weights_and_hold_preserved_prompts_there(toy):
    """One epoch with the reference defaults: derived rows -> W1 c(guide), preserve ["", "a pear"] at W1."""
    edit = rece(toy, "apple", guide="art", preserve=["a pear"], epochs=1, ridge=0.01, uce_lam=0.5, lam=0.1,
                preserve_scale=0.1)
    assert edit.params["preserve_at"] == "current" and edit.params["preserve_empty"] is True
    first = uce(toy, "apple", guide="art", preserve=["a pear"], lam=0.5, preserve_empty=True)
    emb = encode(toy, ["apple", "art", "", "a pear"]).double()
    W0, W1 = _weights(toy), _weights(toy, first)
    A = sum(W.T @ W for W in W1.values()) + 0.01 * torch.eye(emb.shape[-1], dtype=torch.float64)
    B = sum(W1[n].T @ W0[n] for n in W0)
    derived = emb[0] @ torch.linalg.solve(A, B).T
    assert torch.allclose(edit.extras["derived.0"].double(), derived, rtol=1e-3, atol=1e-4)
    name = "unet.mid.0.xattn.v"
    K = torch.cat([emb[0, 1:], derived[1:]])  # "apple" and "art" both start at row 1
    V = torch.cat([emb[1, 1:] @ W0[name].T, emb[1, 1:] @ W1[name].T])
    Cp = emb[2:].reshape(-1, emb.shape[-1])
    expected = _closed_form(W1[name], 0.1, K, V, W1[name], Cp, 0.1)
    got = W0[name] + edit.deltas[f"{name}.weight"].double()
    assert float((got - expected).norm() / (expected - W0[name]).norm()) < 1e-4


def test_rece_with_the_toys_choices_and_the_empty_guide_is_the_earlier_formula(toy):
    """preserve_at="original", preserve_empty=False, guide "": the epoch maps onto W1 c("") and holds
    the preserved prompts at W0 (what the toy profile keeps)."""
    edit = rece(toy, "apple", preserve=["a pear"], epochs=1, ridge=0.01, uce_lam=0.5, lam=0.1, preserve_scale=0.1,
                preserve_at="original", preserve_empty=False)
    first = uce(toy, "apple", preserve=["a pear"], lam=0.5)
    emb = encode(toy, ["apple", "", "a pear"]).double()
    W0, W1 = _weights(toy), _weights(toy, first)
    A = sum(W.T @ W for W in W1.values()) + 0.01 * torch.eye(emb.shape[-1], dtype=torch.float64)
    derived = emb[0] @ torch.linalg.solve(A, sum(W1[n].T @ W0[n] for n in W0)).T
    name = "unet.down.1.0.xattn.k" if "unet.down.1.0.xattn.k" in W0 else next(iter(W0))
    K = torch.cat([emb[0, 1:], derived[1:]])
    V = torch.cat([emb[1, :-1] @ W0[name].T, emb[1, :-1] @ W1[name].T])
    expected = _closed_form(W1[name], 0.1, K, V, W0[name], emb[2], 0.1)
    got = W0[name] + edit.deltas[f"{name}.weight"].double()
    assert float((got - expected).norm() / (expected - W0[name]).norm()) < 1e-4


def test_a_non_empty_guide_changes_what_rece_epochs_map_onto(toy):
    plain = rece(toy, "apple", epochs=1)
    guided = rece(toy, "apple", guide="art", epochs=1)
    assert plain.params["guide"] == "" and guided.params["guide"] == "art"
    assert any(not torch.allclose(plain.deltas[k], guided.deltas[k], atol=1e-4) for k in plain.deltas)


def test_rece_on_one_part_derives_embeddings_from_every_cross_attention_matrix(toy):
    part = "unet.mid.0.xattn.v"
    edit = rece(toy, "apple", parts=part, epochs=1, ridge=0.01)
    assert set(edit.parts) == {part}
    first = uce(toy, "apple", parts=part, lam=0.5, preserve_empty=True)
    base = {n: W.float() for n, W in _weights(toy).items()}
    current = {**base, part: base[part] + first.deltas[f"{part}.weight"]}
    c = encode(toy, ["apple"])[0]
    everything = derive_embedding(base, current, c, 0.01)
    only_edited = derive_embedding({part: base[part]}, {part: current[part]}, c, 0.01)
    assert torch.allclose(edit.extras["derived.0"], everything, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(edit.extras["derived.0"], only_edited, rtol=1e-2, atol=1e-2)


def test_preserve_empty_puts_the_empty_prompt_in_the_preserve_gram(toy):
    name = "unet.mid.0.xattn.k"
    empty = encode(toy, [""])[0].double()
    W0 = _weights(toy, names=[name])[name]

    def drift(edit):
        W = W0 + edit.deltas[f"{name}.weight"].double()
        return float(((W - W0) @ empty.T).norm())

    kept, free = uce(toy, "apple", preserve_empty=True), uce(toy, "apple")
    assert kept.params["preserve_empty"] and not free.params["preserve_empty"] and kept.params["preserve"] == []
    assert drift(kept) < 0.5 * drift(free)
    same = uce(toy, "apple", preserve=[""])
    assert all(torch.allclose(kept.deltas[k], same.deltas[k], atol=1e-6) for k in kept.deltas)
    assert drift(rece(toy, "apple", epochs=1)) < drift(rece(toy, "apple", epochs=1, preserve_empty=False))


def test_fewshot_draws_prompts_from_the_reference_pools_of_27_and_19_templates(toy):
    objects = fewshot(toy, "apple", APPLES, steps=1, progress=False)
    styles = fewshot(toy, "van gogh", TOY_CONCEPTS.image_folder("van gogh"), kind="style", steps=1, progress=False)
    assert len(objects.params["prompts"]) == 27 and objects.params["prompts"][0] == "a photo of a apple"
    assert len(styles.params["prompts"]) == 19 and styles.params["prompts"][1] == "a rendering in the style of van gogh"
    assert len(REFERENCE_TEMPLATES["object"]) == 27 and len(REFERENCE_TEMPLATES["style"]) == 19
    assert {k: objects.params[k] for k in ("eps", "weight_decay", "latent", "flip")} == dict(
        eps=1e-6, weight_decay=1e-8, latent="sample", flip=True)


@pytest.mark.slow
def test_fewshot_with_sampled_latents_and_flips_is_deterministic_per_seed(toy):
    def run(seed, **knobs):
        return fewshot(toy, "cat", TOY_CONCEPTS.image_folder("cat"), steps=2, lr=1e-4, seed=seed, progress=False,
                       **knobs)

    a, b, other = run(3), run(3), run(4)
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
    assert any(not torch.equal(a.deltas[k], other.deltas[k]) for k in a.deltas)
    mean = run(3, latent="mean", flip=False)  # the sampled latents and flips do reach the training
    assert any(not torch.equal(a.deltas[k], mean.deltas[k]) for k in a.deltas)


def test_the_methods_default_to_the_reference_and_the_toy_profile_keeps_its_measured_choices(toy):
    generic = {m: defaults(object(), m) for m in ("rece", "uce", "fewshot")}
    assert (generic["rece"]["preserve_at"], generic["rece"]["preserve_empty"]) == ("current", True)
    assert generic["uce"]["preserve_empty"] is False  # the UCE authors' current script preserves only what is given
    assert (generic["fewshot"]["eps"], generic["fewshot"]["weight_decay"], generic["fewshot"]["prompts"]) == (
        1e-6, 1e-8, None)
    on_toy = {m: defaults(toy, m) for m in ("rece", "uce", "fewshot")}
    assert (on_toy["rece"]["preserve_at"], on_toy["rece"]["preserve_empty"], on_toy["rece"]["lam"]) == (
        "original", False, 0.5)
    assert (on_toy["uce"]["preserve_empty"], on_toy["uce"]["lam"]) == (False, 2.0)
    assert {k: on_toy["fewshot"][k] for k in ("eps", "weight_decay", "latent", "flip")} == dict(
        eps=1e-8, weight_decay=0.0, latent="mean", flip=False)
