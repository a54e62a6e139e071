"""The oracle: a small CNN that says which object, colour and style an icon-world image shows.

It is the toy world's measuring instrument (the stand-in for the classifiers papers use on
Stable Diffusion outputs).

>>> from workbench.toy.oracle import Oracle
>>> from workbench.toy.render import render
>>> from workbench.toy.world import Scene
>>> oracle = Oracle.load()
>>> oracle.predict([render(Scene("cat", "blue", "seurat", ""), seed=1)])[0]
{'object': 'cat', 'colour': 'blue', 'style': 'seurat'}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..judges import Judge
from .paths import REBUILD_HINT, TOY_DIR
from .world import COLOURS, OBJECTS, STYLES

HEADS: dict[str, tuple[str, ...]] = {"object": OBJECTS, "colour": tuple(COLOURS), "style": STYLES}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
    )


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and small shifts of brightness and contrast, so decoded images read like renders."""
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur, 0.5 * x + 0.5 * soft, x)
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5))
    x = x + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + 0.04 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def to_batch(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """PIL images (or a tensor in [-1, 1]) -> float tensor [N, 3, 32, 32] in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    arrs = [np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1


class Oracle(nn.Module, Judge):
    """Three heads (object, colour, style) on a shared 32x32 CNN trunk; as a judge, each call's labels
    must all come from one head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            _block(3, width), nn.MaxPool2d(2),
            _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def probs(self, images: Sequence[Image.Image] | torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Class probabilities per head: ``{"object": [N, 16], "colour": [N, 7], "style": [N, 5]}``."""
        x = to_batch(images)
        outs = [self(x[i:i + batch]) for i in range(0, len(x), batch)]
        return {k: torch.cat([o[k] for o in outs]).softmax(-1) for k in HEADS}

    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> list[dict[str, str]]:
        """The most likely label of each head, per image."""
        p = self.probs(images)
        return [{k: HEADS[k][int(p[k][i].argmax())] for k in HEADS} for i in range(len(p["object"]))]

    def classify(self, images: Sequence[Image.Image], labels: Sequence[str]) -> np.ndarray:
        """Probabilities of ``labels`` (all of one head), renormalised over them: the :class:`Judge` protocol.

        >>> from workbench.toy.render import render
        >>> from workbench.toy.world import Scene
        >>> Oracle.load().choose([render(Scene("cat", "blue", "seurat", ""), seed=1)], ["cat", "dog", "fish"])
        ['cat']
        """
        labels = list(labels)
        head = next((h for h, names in HEADS.items() if set(labels) <= set(names)), None)
        if head is None or not labels:
            heads = "; ".join(f"{h}: {', '.join(v)}" for h, v in HEADS.items())
            raise ValueError(f"the oracle's labels come in heads ({heads}); {labels} are not labels of one head")
        p = self.probs(images)[head][:, [HEADS[head].index(label) for label in labels]].double()
        return (p / p.sum(1, keepdim=True)).numpy()

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "oracle.safetensors")
        (folder / "oracle.json").write_text(json.dumps({"heads": HEADS}, indent=1))

    @classmethod
    def load(cls, folder: Path | None = None) -> "Oracle":
        """The trained oracle from ``data/toy`` (or ``folder``), in eval mode."""
        path = Path(folder or TOY_DIR) / "oracle.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"the oracle's weights {path} are missing; {REBUILD_HINT}")
        heads = json.loads((path.parent / "oracle.json").read_text())["heads"]
        if {k: tuple(v) for k, v in heads.items()} != HEADS:
            raise ValueError(f"{path} was trained for other labels than this icon world; {REBUILD_HINT}")
        oracle = cls()
        oracle.load_state_dict(load_file(path))
        return oracle.eval()
