"""Every method and the metrics on half-precision pipelines (CPU, bfloat16), and pipelines the workbench
cannot edit."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

import workbench
from conftest import same_state, state_of
from workbench.anatomy import check_supported, parts
from workbench.methods import erase
from workbench.metrics import evaluate


@pytest.mark.parametrize("method", ["uce", "rece", "fewshot"])
def test_every_method_runs_in_bfloat16_and_reverts_exactly(toy_bf16, method):
    state = state_of(toy_bf16)
    edit = erase(toy_bf16, "apple", method, progress=False, **({"steps": 2} if method == "fewshot" else {}))
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() and d.abs().max() > 0
               for d in edit.deltas.values())
    with edit.apply(toy_bf16):
        assert not same_state(toy_bf16, state)
    assert same_state(toy_bf16, state)


@pytest.mark.slow
def test_bfloat16_fewshot_keeps_updates_below_the_weights_last_bit(toy, toy_bf16):
    """Few-shot trains float32 master copies: in bfloat16 its ||dW|| stays within 10% of the float32 run's
    (training the bfloat16 weights themselves gave 0.57x)."""
    norms = [float(erase(p, "apple", "fewshot", progress=False).summary(p)["dW"].pow(2).sum() ** 0.5)
             for p in (toy, toy_bf16)]
    assert norms[1] == pytest.approx(norms[0], rel=0.10)


def test_a_bfloat16_edit_lands_on_the_nearest_bfloat16_weights(toy_bf16):
    edit = erase(toy_bf16, "apple", "uce")
    name = "unet.mid.0.xattn.k"
    W = parts(toy_bf16)[name].weight.detach().clone()
    with edit.apply(toy_bf16):
        got = parts(toy_bf16)[name].weight.detach().clone()
    assert torch.equal(got, (W.float() + edit.deltas[f"{name}.weight"]).to(torch.bfloat16))


@pytest.mark.slow
def test_metrics_measure_a_bfloat16_pipeline(toy_bf16, oracle):
    scores = evaluate(toy_bf16, oracle, "apple", edit=erase(toy_bf16, "apple", "uce"), per_prompt=2, per_other=1,
                      others=["banana", "car"])
    assert scores["base_accuracy"] == 1.0 and 0 <= scores["accuracy"] <= 1


def test_tiny_sd_in_bfloat16_runs_every_method(tiny_sd_dir):
    pipe = workbench.load(tiny_sd_dir, dtype=torch.bfloat16)
    state = state_of(pipe)
    for method in ("uce", "rece", "fewshot"):
        knobs = {"images": [workbench.generate(pipe, ["x"], steps=2)[0]] * 2, "steps": 2} if method == "fewshot" else {}
        edit = erase(pipe, "a red balloon", method, progress=False, **knobs)
        assert all(torch.isfinite(d).all() for d in edit.deltas.values())
    assert same_state(pipe, state)


class _ThreeEncoders:
    """Just the attributes an SD3 pipeline has that matter here (and a UNet in place of its transformer)."""

    def __init__(self, pipe) -> None:
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = pipe.text_encoder
        self.unet, self.tokenizer = pipe.unet, pipe.tokenizer


def test_pipelines_no_family_takes_are_named_and_left_alone(tiny_sd_dir, tmp_path):
    pipe = workbench.load(tiny_sd_dir)
    state = state_of(pipe)
    with pytest.raises(TypeError, match="no model family takes this _ThreeEncoders.*text_encoder_3.*sdxl: .*sd: "):
        erase(_ThreeEncoders(pipe), "a cat", "uce")
    unet = pipe.unet
    pipe.unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                     mid_block_type="UNetMidBlock2D", cross_attention_dim=32, norm_num_groups=8)
    with pytest.raises(TypeError, match="no model family takes this.*UNet2DConditionModel with cross-attention"):
        check_supported(pipe)
    pipe.unet = unet
    assert same_state(pipe, state)
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    video = tmp_path / "wan"
    video.mkdir()
    (video / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="holds a WanPipeline; the workbench loads StableDiffusionPipeline, "
                                         "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline"):
        workbench.load(video)
