"""Every method and the metrics on a Stable Diffusion 1.4-shaped pipeline in float16 on CUDA
(``pytest -m gpu`` on a GPU machine; skipped without one)."""
import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from PIL import Image

from conftest import same_state, state_of
from workbench.concepts import ConceptSet
from workbench.edits import Edit
from workbench.judges import ClipJudge, tiny_clip
from workbench.methods import erase
from workbench.metrics import evaluate
from workbench.sd14 import SD14_SCHEDULER, clip_tokenizer, sd14_modules

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _sd14(dtype: torch.dtype) -> StableDiffusionPipeline:
    with torch.device("cuda"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        modules = sd14_modules()
    pipe = StableDiffusionPipeline(
        text_encoder=modules["text"].to(dtype), unet=modules["unet"].to(dtype), vae=modules["vae"].to(dtype),
        tokenizer=clip_tokenizer(), scheduler=PNDMScheduler(**SD14_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd14_half():
    return _sd14(torch.float16)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.mark.parametrize("method", ["uce", "rece", "fewshot"])
def test_every_method_runs_on_cuda_in_float16_and_reverts_exactly(sd14_half, images, method, tmp_path):
    state = state_of(sd14_half)
    knobs = {"images": images, "steps": 2} if method == "fewshot" else {"preserve": ["a photo of a church"]}
    edit = erase(sd14_half, "van gogh", method, progress=False, **knobs)
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in edit.deltas.values())
    assert all(d.device.type == "cuda" and d.dtype == torch.float32 for d in edit.deltas.values())
    loaded = Edit.load(edit.save(tmp_path / "edit.safetensors"))  # saved from the GPU, read to the CPU
    assert all(torch.equal(loaded.deltas[k], d.cpu()) for k, d in edit.deltas.items())
    with edit.apply(sd14_half):
        assert not same_state(sd14_half, state)
    assert same_state(sd14_half, state)


def test_float16_fewshot_moves_the_weights_as_far_as_float32(sd14_half, images):
    half = erase(sd14_half, "van gogh", "fewshot", images=images, steps=8, progress=False)
    full_pipe = _sd14(torch.float32)
    full = erase(full_pipe, "van gogh", "fewshot", images=images, steps=8, progress=False)
    norm = [float(e.summary(p)["dW"].pow(2).sum() ** 0.5) for e, p in ((half, sd14_half), (full, full_pipe))]
    assert norm[0] == pytest.approx(norm[1], rel=0.10)


def test_metrics_measure_on_cuda_through_a_clip_judge(sd14_half, tmp_path):
    judge = ClipJudge.load(tiny_clip(tmp_path / "clip"), device="cuda", dtype=torch.float16)
    concepts = ConceptSet.of(objects=["church", "parachute", "golf ball"])
    scores = evaluate(sd14_half, judge, "church", edit=erase(sd14_half, "church", "uce"), per_prompt=1,
                      per_other=1, concept_set=concepts)
    assert 0 <= scores["accuracy"] <= 1 and scores["n_images"] == 1


@pytest.mark.parametrize("build", ["build_tiny_flux", "build_tiny_sd3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transformer_families_erase_on_cuda_in_half_precision_and_revert_exactly(build, dtype, tmp_path):
    import workbench
    from conftest import family_state, same_family_state

    pipe = workbench.load(getattr(workbench.models, build)(tmp_path / "tiny"), dtype=dtype, device="cuda")
    state = family_state(pipe)
    edits = [erase(pipe, "apple", "uce", parts=["dit.context.proj", "dit.pooled.in", "dit.*.text.[kv]"]),
             erase(pipe, "apple", "rece", parts=["dit.context.proj", "dit.0.text.k"]),
             erase(pipe, "apple", "esd", parts="dit.*.text.[kv]", iterations=2, sample_steps=2, progress=False)]
    for edit in edits:
        assert all(torch.isfinite(d).all() and d.device.type == "cuda" for d in edit.deltas.values())
        with edit.apply(pipe):
            assert not same_family_state(pipe, state)
        assert same_family_state(pipe, state)
