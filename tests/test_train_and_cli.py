import json

import numpy as np
import pytest
from PIL import Image

from workbench import cli
from workbench.toy import train


@pytest.mark.slow
def test_quick_training_run_writes_a_loadable_model_and_resumes(tmp_path, monkeypatch):
    out, work = tmp_path / "data" / "toy", tmp_path / "work"
    train.main(["--quick", "--out", str(out), "--work", str(work)])
    report = json.loads((out / "training.json").read_text())
    assert report["settings"]["unet_steps"] == 4 and np.isfinite(report["final_loss"])
    assert (tmp_path / "data" / "fewshot" / "apple" / "0.png").exists()
    ckpt = work / "unet.ckpt"
    first = ckpt.stat().st_mtime_ns
    train.main(["--quick", "--out", str(out), "--work", str(work), "--unet-steps", "6"])  # resumes at 4
    import torch

    assert torch.load(ckpt, weights_only=False)["step"] == 6 and ckpt.stat().st_mtime_ns != first

    from workbench import models
    from workbench.toy import model as toy_model

    monkeypatch.setattr(toy_model, "TOY_DIR", out)
    pipe = models.load("toy")
    assert pipe("a cat", num_inference_steps=2).images[0].size == (32, 32)


@pytest.mark.slow
def test_quick_dit_training_reuses_the_work_folder_writes_a_flux_pipeline_and_resumes(tmp_path, monkeypatch):
    out, work = tmp_path / "data" / "toy-dit", tmp_path / "work"
    train.main(["--arch", "dit", "--quick", "--out", str(out), "--work", str(work)])
    report = json.loads((out / "training.json").read_text())
    assert report["settings"]["unet_steps"] == 4 and np.isfinite(report["final_loss"])
    assert report["vae"]["scaling_factor"] > 0
    ckpt = work / "dit.ckpt"
    train.main(["--arch", "dit", "--quick", "--out", str(out), "--work", str(work), "--unet-steps", "6"])
    import torch

    assert torch.load(ckpt, weights_only=False)["step"] == 6
    from workbench import models
    from workbench.families import family_of
    from workbench.toy import model as toy_model

    monkeypatch.setattr(toy_model, "TOY_DIT_DIR", out)
    pipe = models.load("toy-dit")
    assert family_of(pipe).name == "flux" and pipe.vae.config.shift_factor == report["vae"]["shift_factor"]
    assert pipe("a cat", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)


def test_cli_generate_writes_an_image(tmp_path, capsys):
    path = tmp_path / "two.png"
    cli.main(["generate", "--prompt", "a red apple", "--prompt", "a cat by seurat", "--steps", "5", "--out", str(path)])
    assert "wrote" in capsys.readouterr().out
    img = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert img.shape[0] > 50 and img.std() > 10


def test_cli_erase_then_generate_with_the_edit(tmp_path, capsys):
    from workbench.edits import Edit
    from workbench.toy import TOY_LAMBDA

    edit_path = tmp_path / "apple.safetensors"
    cli.main(["erase", "--concept", "apple", "--method", "uce", "--out", str(edit_path)])
    assert "uce erased 'apple'" in capsys.readouterr().out
    edit = Edit.load(edit_path)
    # the toy defaults: "apple" in four templates; the 19 other concepts in the templates of their kind
    assert edit.method == "uce" and edit.params["erase"][0] == "a photo of an apple"
    assert len(edit.params["erase"]) == 4 and len(edit.params["preserve"]) == 19 * 4
    assert edit.params["lam"] == TOY_LAMBDA["uce"]["lam"]
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    cli.main(["generate", "--prompt", "an apple", "--steps", "10", "--out", str(before)])
    cli.main(["generate", "--prompt", "an apple", "--steps", "10", "--edit", str(edit_path), "--out", str(after)])
    assert not np.array_equal(np.asarray(Image.open(before)), np.asarray(Image.open(after)))


@pytest.mark.slow
def test_cli_demo_writes_grid_report_and_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    cli.main(["demo", "--concept", "cat", "--per-prompt", "2", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_on_concept"]["before"] >= 0.5
    assert report["accuracy_on_concept"]["after"] < report["accuracy_on_concept"]["before"]
    assert 0 < report["preservation"] <= 1.5
    for name in ("before_after.png", "accuracy.png", "edit.safetensors"):
        assert (out / name).stat().st_size > 1000
    assert "erased 'cat' with rece" in capsys.readouterr().out
