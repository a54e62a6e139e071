"""Judges: what measures an image. A judge says, for each image, how likely each of a given set of labels is.

The toy world's oracle is one judge (:class:`workbench.toy.oracle.Oracle`); on Stable Diffusion, CLIP
zero-shot classification is another. Metrics, sweeps and reports measure through a judge and a concept
set (:mod:`workbench.concepts`), so the same code measures any model for which both exist.

>>> import numpy as np
>>> class Brightness(Judge):
...     def classify(self, images, labels):
...         bright = np.array([float(np.asarray(im).mean() > 127) for im in images])
...         return np.stack([1 - bright, bright], axis=1)
>>> from PIL import Image
>>> Brightness().choose([Image.new("RGB", (4, 4), "white")], ["dark", "bright"])
['bright']
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import transformers
from huggingface_hub import snapshot_download
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer, T5Tokenizer
from transformers.utils import logging as transformers_logging


class Judge:
    """Anything that maps images to probabilities over labels; subclasses define :meth:`classify`."""

    def classify(self, images: Sequence[Image.Image], labels: Sequence[str]) -> np.ndarray:
        """``[len(images), len(labels)]`` probabilities (each row sums to 1) that an image shows a label."""
        raise NotImplementedError

    def choose(self, images: Sequence[Image.Image], labels: Sequence[str]) -> list[str]:
        """The most likely of ``labels`` for each image."""
        labels = list(labels)
        if not images:
            return []
        probs = np.asarray(self.classify(images, labels))
        return [labels[int(i)] for i in probs.argmax(axis=1)]


# --------------------------------------------------------------------------------------------------
# CLIP zero-shot classification

#: The CLIP a Stable Diffusion 1.x judge is usually pointed at: OpenAI's ViT-L/14, whose text tower is
#: SD 1.x's (frozen) text encoder.
CLIP_L14 = "openai/clip-vit-large-patch14"
#: OpenAI CLIP's image normalisation (what ``preprocessor_config.json`` of the OpenAI checkpoints holds).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DOWNLOAD_HINT = (f"download it once with `huggingface-cli download {CLIP_L14}` (or `hf download {CLIP_L14}`), "
                 "or give a local folder written by `CLIPModel.save_pretrained` with its tokenizer and "
                 "image processor")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _field(obj, key: str):
    """``obj[key]`` for a dict, ``obj.key`` otherwise (processor configs come as both), else None."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; give a torch dtype such as torch.float16 or 'bfloat16'")
    return value


class ClipJudge(Judge):
    """Zero-shot classification with CLIP: the label whose prompt's text embedding is nearest an image's.

    Each label becomes a prompt (``prompts[label]`` if given, else ``template.format(label)``); the image
    and prompt embeddings are L2-normalised and their cosine similarities, times CLIP's learned
    temperature ``logit_scale.exp()``, are softmaxed over the labels.

    Which weights: for Stable Diffusion 1.x, OpenAI's CLIP ViT-L/14 (``openai/clip-vit-large-patch14``),
    the model whose text tower SD 1.x uses as its frozen text encoder; other CLIP checkpoints in the
    transformers format work the same. Concept-erasure papers measure erased styles and objects with CLIP
    (CLIP score, zero-shot accuracy) or with dedicated classifiers (ResNet-50 on Imagenette classes,
    NudeNet); those are other :class:`Judge` s. Nothing is downloaded at run time: :meth:`load` reads a
    local folder or the local Hugging Face cache (``huggingface-cli download openai/clip-vit-large-patch14``
    once, where a network is available).

    Images are resized (shortest edge), centre-cropped and normalised with PIL and numpy from the image
    processor's config, in batches of ``batch_size``; inputs follow the model's device and dtype
    (float16/bfloat16 models work), similarities and softmax are float32. Prompt embeddings are cached
    per list of prompts.

    Labels are names; the prompt wording is the judge's. For styles with a neutral label (so that an
    erased style can be judged "none of these", as ``data/concept_sets/painters.json`` has), e.g.
    ``ClipJudge.load(CLIP_L14, template="a painting by {}", prompts={"a photo": "a photo"})``.

    A tiny random CLIP (:func:`tiny_clip`) shows the calls; its answers are noise:

    >>> import tempfile
    >>> from PIL import Image
    >>> judge = ClipJudge.load(tiny_clip(tempfile.mkdtemp()))
    >>> images = [Image.new("RGB", (48, 40), "red"), Image.new("RGB", (40, 40), "blue")]
    >>> probs = judge.classify(images, ["van gogh", "monet", "a photo"])
    >>> probs.shape, probs.sum(axis=1).round(6).tolist()
    ((2, 3), [1.0, 1.0])
    >>> judge.prompt("monet"), set(judge.choose(images, ["van gogh", "monet"])) <= {"van gogh", "monet"}
    ('a photo of monet', True)
    """

    def __init__(self, model, tokenizer, processor=None, *, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 template: str = "a photo of {}", prompts: dict[str, str] | None = None,
                 batch_size: int = 32) -> None:
        """``model``: a transformers ``CLIPModel``; ``tokenizer``: its tokenizer; ``processor``: a CLIP
        image processor or its config dict (``preprocessor_config.json``), from which the resize size,
        crop size, mean and std are read. ``image_size``, ``mean`` and ``std`` override those (default:
        the vision tower's image size and OpenAI CLIP's mean and std)."""
        if "{" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' for the label, e.g. 'a photo of {{}}'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.prompts = dict(prompts or {})
        self.batch_size = int(batch_size)
        vision_size = int(model.config.vision_config.image_size)
        size, crop = _field(processor, "size"), _field(processor, "crop_size")
        self.resize_to: int | tuple[int, int] = vision_size
        if isinstance(size, int):
            self.resize_to = size
        elif _field(size, "shortest_edge"):
            self.resize_to = int(_field(size, "shortest_edge"))
        elif _field(size, "height") and _field(size, "width"):
            self.resize_to = (int(_field(size, "width")), int(_field(size, "height")))  # exact, no aspect
        if _field(processor, "do_center_crop") is False:
            crop_hw = None
        elif _field(crop, "height") and _field(crop, "width"):
            crop_hw = (int(_field(crop, "height")), int(_field(crop, "width")))
        elif isinstance(crop, int):
            crop_hw = (crop, crop)
        else:
            crop_hw = (vision_size, vision_size)
        if image_size is not None:
            self.resize_to, crop_hw = int(image_size), (int(image_size), int(image_size))
        self.crop = crop_hw
        self.resample = int(_field(processor, "resample") or Image.Resampling.BICUBIC)
        self.mean = np.asarray(mean if mean is not None else (_field(processor, "image_mean") or CLIP_MEAN),
                               dtype=np.float32)
        self.std = np.asarray(std if std is not None else (_field(processor, "image_std") or CLIP_STD),
                              dtype=np.float32)
        self._text_cache: dict[tuple[str, ...], tuple[torch.device, torch.dtype, torch.Tensor]] = {}

    @classmethod
    def load(cls, source: str | os.PathLike = CLIP_L14, device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None, template: str = "a photo of {}",
             prompts: dict[str, str] | None = None, batch_size: int = 32) -> "ClipJudge":
        """A judge from a CLIP folder (``config.json`` of a ``CLIPModel``, tokenizer files,
        ``preprocessor_config.json``) or a hub id already in the local Hugging Face cache (default:
        ``openai/clip-vit-large-patch14``); never downloads. ``device`` and ``dtype`` (e.g.
        ``"cuda"``, ``torch.float16``) place the model."""
        folder = _clip_folder(source)
        dtype = _dtype(dtype)
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True, **{dtype_kw: dtype or torch.float32})
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load the CLIP model in {str(folder)!r} ({e}); {DOWNLOAD_HINT}") from e
        processor_file = folder / "preprocessor_config.json"
        processor = json.loads(processor_file.read_text()) if processor_file.is_file() else None
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, processor, template=template, prompts=prompts, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prompt(self, label: str) -> str:
        """The text a label is compared to: ``prompts[label]``, else ``template.format(label)``."""
        return self.prompts[label] if label in self.prompts else self.template.format(label)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[n, 3, h, w]`` float32 pixel values, as CLIP's image processor makes them: RGB, resized
        (bicubic, shortest edge), centre-cropped, scaled to [0, 1] and normalised."""
        arrays = []
        for image in images:
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            image = image.convert("RGB")
            if isinstance(self.resize_to, tuple):
                size = self.resize_to
            else:
                w, h = image.size
                s = self.resize_to
                size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            if image.size != size:
                image = image.resize(size, resample=self.resample)
            if self.crop is not None:
                (ch, cw), (w, h) = self.crop, image.size
                left, top = (w - cw) // 2, (h - ch) // 2
                image = image.crop((left, top, left + cw, top + ch))
            x = np.asarray(image, dtype=np.float32) / 255.0
            arrays.append(((x - self.mean) / self.std).transpose(2, 0, 1))
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings ``[len(texts), d]`` on the model's device (cached)."""
        key = tuple(texts)
        device, dtype = self.device, self.dtype
        hit = self._text_cache.get(key)
        if hit is not None and hit[0] == device and hit[1] == dtype:
            return hit[2]
        tokens = self.tokenizer(list(key), padding=True, truncation=True, return_tensors="pt").to(device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens.get("attention_mask")).pooler_output
        features = self.model.text_projection(pooled).float()
        features = features / features.norm(dim=-1, keepdim=True)
        self._text_cache[key] = (device, dtype, features)
        return features

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised float32 image embeddings ``[len(images), d]`` on the model's device."""
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        features = self.model.visual_projection(pooled).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image], labels: Sequence[str]) -> np.ndarray:
        labels = list(labels)
        if not labels:
            raise ValueError("classify needs at least one label to choose among")
        images = list(images)
        if not images:
            return np.zeros((0, len(labels)))
        text = self.text_features([self.prompt(label) for label in labels])
        scale = self.model.logit_scale.float().exp()
        rows = []
        for start in range(0, len(images), self.batch_size):
            logits = scale * self.image_features(images[start:start + self.batch_size]) @ text.T
            rows.append(logits.softmax(dim=-1).double().cpu().numpy())
        probs = np.concatenate(rows)
        return probs / probs.sum(axis=1, keepdims=True)  # rows sum to 1 in float64, not just float32


def _clip_folder(source: str | os.PathLike) -> Path:
    """The local folder of a CLIP model given as a folder or a cached hub id, checked; else ValueError."""
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
            raise ValueError(f"no folder {str(source)!r}, and it is not a hub id like {CLIP_L14!r}; "
                             f"give a CLIP model folder or a hub id in the local Hugging Face cache")
        try:
            path = Path(snapshot_download(str(source), local_files_only=True))
        except Exception as e:  # LocalEntryNotFoundError, HFValidationError, offline errors
            raise ValueError(f"{str(source)!r} is not a local folder and not in the local Hugging Face cache "
                             f"(nothing is downloaded at run time); {DOWNLOAD_HINT}") from e
    expected = ("expected a CLIPModel folder: config.json with model_type 'clip', tokenizer files "
                "(tokenizer.json or vocab.json + merges.txt), preprocessor_config.json and the weights, "
                f"as `huggingface-cli download {CLIP_L14}` or `tiny_clip(folder)` write")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a folder; {expected}")
    config_file = path / "config.json"
    if not config_file.is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(f"{str(path)!r} has no config.json (found: {', '.join(found) or 'nothing'}); {expected}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({e}); {expected}") from e
    model_type = config.get("model_type")
    if model_type != "clip":
        what = f"model_type {model_type!r}" if model_type else "no model_type"
        also = (" (a CLIP text or vision tower alone, such as Stable Diffusion's text_encoder/, cannot "
                "compare images with text)") if str(model_type).startswith("clip") else ""
        raise ValueError(f"{str(path)!r} holds a model with {what}, not a CLIP model{also}; {expected}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{str(path)!r} has a CLIP config but no tokenizer files "
                         f"({', '.join(_TOKENIZER_FILES)}); {expected}")
    return path


def ascii_clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIP tokenizer over printable ASCII with no merges (one token per character), for the tiny
    random-weight fixtures: CLIP's byte BPE maps printable ASCII to itself.

    >>> ascii_clip_tokenizer(8)("ab").input_ids
    [188, 64, 159, 189]
    """
    chars = [chr(i) for i in range(33, 127)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=max_length)


def ascii_t5_tokenizer(max_length: int) -> T5Tokenizer:
    """A T5 (unigram) tokenizer over printable ASCII, for the tiny fixtures: each word is a first piece
    with T5's word-start mark and one piece per further character, then ``</s>``; no start token.

    >>> tok = ascii_t5_tokenizer(8)
    >>> tok.convert_ids_to_tokens(tok("ab").input_ids)
    ['▁a', 'b', '</s>']
    """
    chars = [chr(i) for i in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised ``CLIPModel`` with its tokenizer and image processor config to
    ``folder`` (the judge's fixture, as :func:`workbench.models.build_tiny_sd` is the pipelines').

    Vision tower: 32x32 images, 8x8 patches, 32 wide, 2 layers, 4 heads; text tower: 32 wide, 2 layers,
    a CLIP tokenizer over printable ASCII with no merges. Same classes and files as a real CLIP
    checkpoint, so every code path of :class:`ClipJudge` runs without a download; it judges at random.
    """
    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = ascii_clip_tokenizer(77)
    tokenizer.save_pretrained(folder)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.eos_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32, **special),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    # what CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained writes, written
    # directly: transformers' image processor classes differ by version and by whether torchvision is there
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }, indent=2) + "\n")
    return folder
