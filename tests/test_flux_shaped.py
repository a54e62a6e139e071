"""The FLUX.1-dev-shaped pipeline's configs, checked on the meta device (no memory, no weights)."""
import torch

from workbench import flux_shaped


def test_flux_shapes_have_flux_1_devs_parameter_counts():
    counts = flux_shaped.parameter_counts()
    assert counts["transformer"] == 11_901_408_320
    assert counts["text2"] == 4_762_310_656  # T5 v1.1 XXL's encoder
    assert counts["text"] == 123_060_480 and counts["vae"] == 83_819_683


def test_reduced_depth_keeps_the_width():
    with torch.device("meta"):
        modules = flux_shaped.flux_modules(double=1, single=2, t5_layers=3, dtype=torch.bfloat16)
    dit, t5 = modules["transformer"], modules["text2"]
    assert len(dit.transformer_blocks) == 1 and len(dit.single_transformer_blocks) == 2
    assert dit.context_embedder.in_features == 4096 and dit.context_embedder.out_features == 3072
    assert dit.config.guidance_embeds and modules["vae"].config.latent_channels == 16
    assert len(t5.encoder.block) == 3 and t5.config.d_model == 4096
    assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
    size = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    full, small = flux_shaped.parameter_counts(), flux_shaped.parameter_counts(1, 2, 3)
    assert full["transformer"] - small["transformer"] == (18 * size(dit.transformer_blocks[0])
                                                          + 36 * size(dit.single_transformer_blocks[0]))
