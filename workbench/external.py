"""Erasures made by other tools (published ESD, UCE, AdvUnlearn or MACE checkpoints) as workbench edits.

:func:`load_edit` reads another tool's erased weights and returns the :class:`~workbench.edits.Edit`
that turns the base pipeline into them, keyed by the workbench's part names, so every analysis
(``summary``, the attacks, the metrics, the localisation) runs on it exactly as on a native edit.
It reads

* a diffusers model folder (``unet/`` or ``text_encoder/`` as ``save_pretrained`` writes it, sharded
  or not), or a pipeline folder with such subfolders;
* a ``.safetensors`` file of whole weights or only the changed modules, in diffusers naming
  (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``, optionally prefixed
  ``unet.`` / ``text_encoder.``) or in LDM/CompVis naming;
* a CompVis ``.ckpt`` / ``.pt`` / ``.pth`` state dict (or a ``.bin``), whole or partial, with or without
  the ``model.diffusion_model.`` prefix, possibly wrapped in ``{"state_dict": ...}``. LDM names are
  mapped with diffusers' own converter (``convert_ldm_unet_checkpoint``, ``convert_ldm_clip_checkpoint``)
  one key at a time, so a file of only the changed modules (ESD-x) reads as well as a whole one.

Pickles are read with ``torch.load(..., weights_only=True)`` only: one that needs more is refused,
never executed. Only parameters that differ from the base become deltas; a changed parameter that
belongs to no part (a norm) is refused unless ``strict=False``. Nothing here changes the pipeline: a
file that does not fit is refused with its mismatches. :func:`save_erased` writes an edit in each of
these formats (the tests' way to make "external" files from native edits).

>>> import tempfile, workbench
>>> from workbench.methods import uce
>>> pipe = workbench.load("toy")
>>> native = uce(pipe, "apple")
>>> path = save_erased(pipe, native, tempfile.mkdtemp() + "/esd.pt", format="ldm-checkpoint")
>>> edit = load_edit(pipe, path, concept="apple")
>>> edit.parts == native.parts, edit.params["format"], edit.params["counts"]["unchanged"] > 0
(True, 'ldm-checkpoint', True)
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_UNET_KEY,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .anatomy import parts
from .edits import Edit
from .families import family_of


def _components(pipe) -> dict[str, nn.Module]:
    """The pipeline's components that hold parts (its denoiser and text encoders) by their diffusers names."""
    return {name: module for name, module in family_of(pipe).components(pipe).items() if name != "vae"}


#: What :func:`save_erased` writes and :func:`load_edit` reports in ``edit.params["format"]`` (a pickle in
#: diffusers naming, as AdvUnlearn saves its text encoder, reads as ``"torch-checkpoint"``).
FORMATS = ("diffusers-folder", "safetensors", "ldm-checkpoint")
_PICKLES = (".ckpt", ".pt", ".pth", ".bin")
#: The prefix of an LDM checkpoint's CLIP text encoder (SD 1.x), as diffusers' converter removes it.
_LDM_TEXT = "cond_stage_model.transformer."
#: Top-level names of an LDM UNet without its ``model.diffusion_model.`` prefix.
_LDM_UNET_BARE = re.compile(r"^(time_embed|input_blocks|middle_block|output_blocks|out|label_emb)\.")
#: Parts of a whole LDM checkpoint that are not the UNet or text encoder (the VAE, EMA copies, the noise
#: schedule's buffers): read past and counted in ``edit.params["ignored"]``.
_LDM_OTHER = ("first_stage_model.", "model_ema.")
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_SHOWN = 6
#: Tensors read, by component and parameter name, each with the key it had in the file.
_Found = dict[str, dict[str, tuple[torch.Tensor, str]]]
#: Per module, transformers' renamings into its names and back (see :func:`_renamings`).
_RENAMINGS: "weakref.WeakKeyDictionary[nn.Module, tuple[list, list]]" = weakref.WeakKeyDictionary()


def load_edit(pipe, source: str | os.PathLike, *, component: str | None = None, concept: str = "",
              method: str = "external", strict: bool = True) -> Edit:
    """The :class:`Edit` from ``pipe``'s weights to the erased weights at ``source`` (see the module doc
    for the folders and files it reads); ``pipe`` is not changed.

    ``component`` (``"unet"`` / ``"text_encoder"``) says which component a file of unprefixed keys
    holds; without it, the keys' names decide. The deltas are (imported - base) in float32 for every
    parameter of an editable part that differs from the base (a file in lower precision than the model is
    compared at its own precision). A differing parameter of no part (a norm, an embedding) is refused,
    or with ``strict=False`` left out and listed in ``edit.params["skipped"]``. Names the pipeline lacks
    and shapes that differ are refused with a ``ValueError`` listing them.

    >>> import tempfile, workbench
    >>> from workbench.methods import uce
    >>> pipe = workbench.load("toy")
    >>> native = uce(pipe, "apple")
    >>> folder = save_erased(pipe, native, tempfile.mkdtemp() + "/unet", format="diffusers-folder")
    >>> edit = load_edit(pipe, folder, concept="apple", method="uce (diffusers folder)")
    >>> edit.parts == native.parts, edit.params["format"], edit.params["components"]
    (True, 'diffusers-folder', ['unet'])
    >>> diff = (edit.deltas["unet.mid.0.xattn.k.weight"] - native.deltas["unet.mid.0.xattn.k.weight"]).abs()
    >>> bool(diff.max() < 1e-6)
    True
    """
    comps = _components(pipe)
    if component is not None and component not in comps:
        raise ValueError(f"component cannot be {component!r}; this pipeline has {', '.join(comps)}")
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        raise FileNotFoundError(f"nothing at {path}; give a diffusers folder, a .safetensors file or a "
                                f"{'/'.join(_PICKLES)} checkpoint")
    ignored: dict[str, int] = {}
    hint = ""
    if path.is_dir():
        fmt, naming = "diffusers-folder", "diffusers"
        found, problems = _read_folder(path, comps, component)
    else:
        tensors = _read_file(path, ignored)
        found, naming, problems = _sort_keys(tensors, path, comps, component, ignored)
        hint = _lora_hint(tensors)
        fmt = ("safetensors" if path.suffix == ".safetensors"
               else "ldm-checkpoint" if naming == "ldm" else "torch-checkpoint")
    base, new, unchanged, skipped = _compare(pipe, comps, found, path, problems, hint)
    if skipped and strict:
        raise ValueError(
            f"{path} changes {len(skipped)} parameter(s) that belong to no editable part (norms, "
            f"embeddings), which an Edit cannot hold: {_listing(skipped)}. Pass strict=False to import the "
            "editable parts only (the edit then differs from that model there; the keys are listed in "
            "edit.params['skipped']). The pipeline was not changed.")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for c in found.values() for t, _ in c.values()})
    params: dict[str, Any] = {
        "source": str(path), "format": fmt, "naming": naming, "components": sorted(c for c in found if found[c]),
        "dtypes": dtypes, "counts": {"read": sum(map(len, found.values())), "changed": len(new),
                                     "unchanged": unchanged, "skipped": len(skipped),
                                     "ignored": sum(ignored.values())},
    }
    if skipped:
        params["skipped"] = skipped
    if ignored:
        params["ignored"] = ignored
    if not new:
        warnings.warn(f"{path} holds the same editable weights as this pipeline: the edit is empty "
                      "(was it made from another base model, or is it the base itself?)", stacklevel=2)
    return Edit.between(base, new, method=method, concept=concept, params=params)


def save_erased(pipe, edit: Edit, path: str | os.PathLike, format: str = "safetensors", *,
                max_shard_size: int | str | None = None) -> Path:
    """Write ``pipe`` with ``edit`` applied the way another tool would publish it; ``pipe`` is left
    exactly as it was. Returns ``path``.

    ``format`` is ``"diffusers-folder"`` (``save_pretrained`` of each changed component: the folder
    itself for one, ``path/<component>/`` for several; ``max_shard_size`` shards it),
    ``"safetensors"`` (only the changed modules' parameters, diffusers names, ``<component>.``-prefixed
    when the edit changes several components) or ``"ldm-checkpoint"`` (the whole UNet, and the text
    encoder if changed, in CompVis names, as ``torch.save`` of a dict of tensors).

    >>> import tempfile, workbench
    >>> from workbench.methods import uce
    >>> pipe = workbench.load("toy")
    >>> path = save_erased(pipe, uce(pipe, "apple"), tempfile.mkdtemp() + "/apple.safetensors")
    >>> from safetensors.torch import load_file
    >>> sorted(load_file(path))[0]
    'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'
    """
    if format not in FORMATS:
        raise ValueError(f"format cannot be {format!r}; choose one of {', '.join(FORMATS)}")
    if not edit.deltas:
        raise ValueError(f"this {edit.method} edit of {edit.concept!r} changes nothing, so there is nothing to write")
    edit.check(pipe)
    comps, where = _components(pipe), _module_paths(pipe)
    changed: dict[str, list[str]] = {}
    for part in edit.parts:
        name, module_path = where[part]
        changed.setdefault(name, []).append(module_path)
    path = Path(path)
    if format == "ldm-checkpoint" and set(changed) - {"unet", "text_encoder"}:
        raise ValueError(f"an LDM checkpoint holds a UNet and one text encoder; this edit also changes "
                         f"{', '.join(sorted(set(changed) - {'unet', 'text_encoder'}))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with edit.apply(pipe):
        if format == "diffusers-folder":
            for name in changed:
                kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
                comps[name].save_pretrained(path if len(changed) == 1 else path / name, **kwargs)
        elif format == "safetensors":
            prefix = len(changed) > 1
            tensors = {}
            for name, module_paths in changed.items():
                for module_path in module_paths:
                    module = comps[name].get_submodule(module_path)
                    for attr, p in module.named_parameters(recurse=False):
                        key = f"{module_path}.{attr}"
                        tensors[f"{name}.{key}" if prefix else key] = p.detach().cpu().clone().contiguous()
            save_file(tensors, path)
        else:
            to_ldm = _ldm_unet_names(comps["unet"])
            state = {LDM_UNET_KEY + to_ldm[k]: v.detach().cpu().clone() for k, v in comps["unet"].state_dict().items()}
            if "text_encoder" in changed:
                text = comps["text_encoder"]
                state |= {_LDM_TEXT + _legacy_name(text, k): v.detach().cpu().clone()
                          for k, v in text.state_dict().items()}
            torch.save(state, path)
    return path


def _listing(items: list[str]) -> str:
    """The first few items, then how many more."""
    more = len(items) - _SHOWN
    return "; ".join(items[:_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def _module_paths(pipe) -> dict[str, tuple[str, str]]:
    """Part name -> (component, the module's diffusers path in it), by module identity."""
    by_id = {id(module): name for name, module in parts(pipe).items()}
    out: dict[str, tuple[str, str]] = {}
    for comp, root in _components(pipe).items():
        for module_path, module in root.named_modules():
            if id(module) in by_id:
                out.setdefault(by_id[id(module)], (comp, module_path))
    return out


def _read_file(path: Path, ignored: dict[str, int]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a pickled state dict (read with ``weights_only=True``)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors' own error type differs between its versions
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        if "workbench" in meta:
            raise ValueError(f"{path} is a workbench edit (deltas, not weights); read it with "
                             "workbench.edits.Edit.load(path)")
        return load_file(path)
    if path.suffix not in _PICKLES:
        raise ValueError(f"cannot read {path.name}: give a diffusers folder, a .safetensors file, or a "
                         f"{', '.join(_PICKLES)} state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(
            f"{path} cannot be read safely: it is not a plain state dict of tensors"
            + (f" (it needs {named.group(1)} to load)" if named else "")
            + ", and the workbench reads pickles only with torch.load(weights_only=True), never running "
            "their code. If you trust the file, convert it to safetensors once and load that: "
            "sd = torch.load(path, weights_only=False); sd = sd.get('state_dict', sd); "
            "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items() "
            "if isinstance(v, torch.Tensor)}, 'erased.safetensors')") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        for key in state:
            if key != "state_dict":
                ignored["(checkpoint wrapper)"] = ignored.get("(checkpoint wrapper)", 0) + 1
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors "
                         "(name -> tensor, possibly as {'state_dict': ...})")
    others = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        ignored["(not tensors)"] = len(others)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_folder(path: Path, comps: dict[str, nn.Module],
                 component: str | None) -> tuple[_Found, list[str]]:
    """Component -> its tensors, from a diffusers component folder or a folder of component subfolders,
    and the names that could not be placed."""
    if (path / "config.json").is_file():
        if component is None:
            component = path.name if path.name in comps else None
        tensors = _read_weights(path)
        if component is None:
            found, _, problems = _sort_keys(tensors, path, comps, None, {})
            return found, problems
        return {component: {k: (v, k) for k, v in tensors.items()}}, []
    subfolders = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file())
    wanted = [component] if component is not None else [n for n in subfolders if n in comps]
    foreign = [n for n in subfolders if n not in comps and n.startswith(("unet", "text_encoder"))]
    if foreign and component is None:
        raise ValueError(f"{path} has {', '.join(f'{n}/' for n in foreign)}, which this pipeline has no "
                         f"component for (it has {', '.join(comps)}): it was made for another kind of model")
    missing = [n for n in wanted if n not in subfolders]
    if not wanted or missing:
        raise ValueError(f"{path} is a folder without "
                         + (f"a {missing[0]}/ subfolder" if missing else
                            "config.json and without unet/ or text_encoder/ subfolders")
                         + "; give a component folder written by save_pretrained (config.json and its "
                         "weights) or a pipeline folder holding such subfolders")
    return {name: {k: (v, k) for k, v in _read_weights(path / name).items()} for name in wanted}, []


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of one ``save_pretrained`` folder: one weights file, or the shards an index lists."""
    indexes = sorted(folder.glob("*.index*.json"))
    plain = [p for p in indexes if p.name in ("diffusion_pytorch_model.safetensors.index.json",
                                               "model.safetensors.index.json")]
    if len(indexes) > 1 and len(plain) == 1:
        indexes = plain
    if len(indexes) == 1:
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out |= _read_file(folder / shard, {})
        return out
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    plain = [p for p in files if p.name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                                             "diffusion_pytorch_model.bin", "pytorch_model.bin")]
    if len(files) > 1 and len(plain) == 1:
        files = plain
    if len(files) != 1 or len(indexes) > 1:
        raise ValueError(f"{folder} has " + (f"several weights files ({', '.join(p.name for p in files + indexes)})"
                                             if files or indexes else "config.json but no weights file")
                         + "; expected diffusion_pytorch_model.safetensors or model.safetensors (or shards "
                         "with their .index.json)")
    return _read_file(files[0], {})


def _sort_keys(tensors: dict[str, torch.Tensor], path: Path, comps: dict[str, nn.Module],
               component: str | None, ignored: dict[str, int]) -> tuple[_Found, str, list[str]]:
    """The file's tensors by component and diffusers parameter name (with the file's key where it
    differs), the naming it used (``"diffusers"`` or ``"ldm"``), and the keys it cannot place; refuses a
    file whose component is unclear."""
    found: _Found = {}
    problems: list[str] = []
    unet_ldm, text_ldm, bare = {}, {}, {}
    prefixes = sorted(comps, key=len, reverse=True)
    for key, tensor in tensors.items():
        if key.startswith(LDM_UNET_KEY):
            unet_ldm[key] = tensor
        elif key.startswith(_LDM_TEXT):
            text_ldm[key] = tensor
        elif key.startswith(_LDM_OTHER) or "." not in key:
            head = key.split(".")[0] if "." in key else "(top level)"
            ignored[head] = ignored.get(head, 0) + 1
        elif key.startswith(("cond_stage_model.", "conditioner.")):
            problems.append(f"{key}: of LDM text encoders only SD 1.x's CLIP (keys {_LDM_TEXT}*) is read; "
                            "convert others with diffusers' from_single_file first")
        elif _LDM_UNET_BARE.match(key) and component in (None, "unet"):
            unet_ldm[key] = tensor
        else:
            prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
            if prefix is not None:
                _put(found, problems, prefix, key[len(prefix) + 1:], tensor, key)
            elif key.startswith(("unet.", "text_encoder")):
                problems.append(f"{key}: this pipeline has no {key.split('.')[0]}")
            else:
                bare[key] = tensor
    naming = "ldm" if unet_ldm or text_ldm else "diffusers"
    if unet_ldm:
        to_diffusers = {v: k for k, v in _ldm_unet_names(comps["unet"]).items()}
        for key, tensor in unet_ldm.items():
            name = to_diffusers.get(key.removeprefix(LDM_UNET_KEY))
            if name is None:
                problems.append(f"{key}: this UNet has no such parameter")
            else:
                _put(found, problems, "unet", name, tensor, key)
    if text_ldm:
        mapped = convert_ldm_clip_checkpoint({k: k for k in text_ldm})  # diffusers name -> LDM name
        for name, key in mapped.items():
            _put(found, problems, "text_encoder", name, text_ldm[key], key)
    if bare:
        if component is None:
            names = {c: set(m.state_dict()) for c, m in comps.items()}
            hits = [c for c in comps if any(_own_name(comps[c], k, names[c]) in names[c] for k in bare)]
            if len(hits) > 1:  # same names (SDXL's two CLIP towers): the one whose shapes fit every key
                states = {c: comps[c].state_dict() for c in hits}
                hits = [c for c in hits if all(_own_name(comps[c], k, names[c]) in names[c] and
                                               states[c][_own_name(comps[c], k, names[c])].shape == t.shape
                                               for k, t in bare.items())] or hits
            if len(hits) != 1:
                why = f"name parameters of {' and '.join(hits)}" if hits else "name no parameter of this pipeline"
                raise ValueError(
                    f"{path}: cannot tell which component its {len(bare)} unprefixed key(s) belong to (e.g. "
                    f"{next(iter(bare))}): they {why}. Pass component= one of {', '.join(comps)}, or "
                    "prefix the keys with 'unet.' / 'text_encoder.'" + _lora_hint(tensors))
            component = hits[0]
        for key, tensor in bare.items():
            _put(found, problems, component, key, tensor, key)
    return found, naming, problems


def _put(found: _Found, problems: list[str], comp: str, key: str, tensor: torch.Tensor, original: str) -> None:
    """File the tensor of the file's key ``original`` as ``comp``'s parameter ``key``."""
    if key in found.setdefault(comp, {}):
        problems.append(f"{original}: {comp}.{key} is given twice")
    found[comp][key] = (tensor, original)


def _lora_hint(tensors: Mapping[str, Any]) -> str:
    return ("; its keys look like a LoRA, which holds low-rank factors rather than weights: fuse it into "
            "the model (pipe.fuse_lora()) and save that" if any("lora" in k.lower() for k in tensors) else "")


def _compare(pipe, comps: dict[str, nn.Module], found: _Found, path: Path, problems: list[str], hint: str = ""):
    """(base tensors, imported tensors) of the changed part parameters, keyed ``"<part>.<attr>"``, how
    many were unchanged, and the changed parameters of no part; refuses ``problems`` (keys that could
    not be placed) together with names the pipeline lacks and other shapes."""
    problems = list(problems)
    states = {c: comps[c].state_dict() for c in found}
    placed: _Found = {}
    for comp, tensors in found.items():
        for key, (tensor, original) in tensors.items():
            _put(placed, problems, comp, _own_name(comps[comp], key, states[comp]), tensor, original)

    def label(comp: str, key: str) -> str:
        original = placed[comp][key][1]
        return f"{comp}.{key}" + ("" if original in (key, f"{comp}.{key}") else f" ({original} in the file)")

    for comp, tensors in placed.items():
        for key, (tensor, _) in tensors.items():
            have = states[comp].get(key)
            if have is None:
                problems.append(f"{label(comp, key)}: this pipeline's {comp} has no such parameter")
            elif have.shape != tensor.shape:
                problems.append(f"{label(comp, key)}: the file has shape {tuple(tensor.shape)}, the model "
                                f"{tuple(have.shape)}")
    if problems:
        raise ValueError(f"{path} does not fit this pipeline; the pipeline was not changed. "
                         f"{len(problems)} mismatch(es): {_listing(problems)}{hint}")
    part_of = {where: part for part, where in _module_paths(pipe).items()}
    base, new, skipped, unchanged = {}, {}, [], 0
    for comp, tensors in placed.items():
        for key, (tensor, _) in tensors.items():
            have = states[comp][key]
            if _same(have, tensor):
                unchanged += 1
                continue
            module_path, attr = key.rsplit(".", 1)
            part = part_of.get((comp, module_path))
            if part is None or attr not in ("weight", "bias"):
                skipped.append(f"{comp}.{key}")
                continue
            base[f"{part}.{attr}"] = have.detach()
            new[f"{part}.{attr}"] = tensor.to(have.device)
    return base, new, unchanged, skipped


def _own_name(module: nn.Module, key: str, names: Mapping[str, Any] | set[str]) -> str:
    """``key`` as ``module`` names it: unchanged if it has it, else renamed by transformers' own rules for
    older checkpoints of that model (``text_model.`` of CLIP before transformers 5, ``LayerNorm.gamma``)
    or without the model's ``base_model_prefix``; unchanged when none of those names it either."""
    if key in names:
        return key
    renamed = _renamings(module)
    if renamed:
        from transformers.core_model_loading import apply_renamings

        new = apply_renamings(key, renamed)
        if new in names:
            return new
    prefix = getattr(module, "base_model_prefix", "")
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:]
    return key


def _renamings(module: nn.Module, reverse: bool = False) -> list:
    """transformers' renamings of checkpoint names into ``module``'s (transformers 5 onwards; none before,
    where the names did not change, and none for other modules). ``reverse``: its prefix changes
    reversed, which give a parameter's earlier name."""
    if module not in _RENAMINGS:
        try:
            from transformers import PreTrainedModel
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange, WeightRenaming
        except ImportError:
            _RENAMINGS[module] = ([], [])
        else:
            transforms = get_model_conversion_mapping(module) if isinstance(module, PreTrainedModel) else []
            _RENAMINGS[module] = ([t for t in transforms if isinstance(t, WeightRenaming)],
                                  [t.reverse_transform() for t in transforms[::-1] if isinstance(t, PrefixChange)])
    return _RENAMINGS[module][reverse]


def _legacy_name(module: nn.Module, key: str) -> str:
    """The name an LDM checkpoint gives ``module``'s parameter ``key`` (the transformers 4 name, e.g.
    ``text_model.encoder...`` for CLIP), checked to rename back to ``key``."""
    renamings = _renamings(module, reverse=True)
    if not renamings:
        return key
    from transformers.core_model_loading import apply_renamings

    old = apply_renamings(key, renamings)
    return old if _own_name(module, old, {key}) == key else key


def _same(have: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether two tensors are equal, compared at the lower precision of the two."""
    if have.dtype == other.dtype or not (have.is_floating_point() and other.is_floating_point()):
        return torch.equal(have, other.to(have.device, have.dtype))
    if have.element_size() == other.element_size():
        return torch.equal(have.float(), other.to(have.device).float())
    low = have.dtype if have.element_size() < other.element_size() else other.dtype
    return torch.equal(have.to(low), other.to(have.device, low))


def _ldm_unet_names(unet: nn.Module) -> dict[str, str]:
    """Each UNet parameter's diffusers name -> its LDM/CompVis name (without ``model.diffusion_model.``),
    checked to be exactly what diffusers' ``convert_ldm_unet_checkpoint`` maps back."""
    config = dict(unet.config)
    keys = list(unet.state_dict())
    if not isinstance(config.get("layers_per_block"), int):
        raise ValueError("this UNet has per-block layer counts; LDM names exist for SD 1.x/2.x UNets")
    per_block = config["layers_per_block"] + 1
    with_attention = {int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    top = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        top |= DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"]
    if config.get("addition_embed_type") == "text_time":
        top |= DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    names = {key: top.get(key) or _ldm_name(key, per_block, with_attention) for key in keys}
    unnamed = [k for k, v in names.items() if v is None]
    back = convert_ldm_unet_checkpoint({LDM_UNET_KEY + v: v for v in names.values() if v is not None}, config)
    if unnamed or back != names:
        wrong = unnamed or [k for k in names if back.get(k) != names[k]] or [k for k in back if k not in names]
        raise ValueError(f"this {type(unet).__name__} has no LDM/CompVis naming that diffusers' converter maps "
                         f"back onto it ({_listing(wrong)}); use a diffusers folder or safetensors file instead")
    return names


def _ldm_name(key: str, per_block: int, with_attention: set[int]) -> str | None:
    """The LDM name of one diffusers UNet parameter inside its down, mid or up block (the inverse of
    ``convert_ldm_unet_checkpoint``)."""
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key) or \
        re.match(r"^(mid)_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
    if m and m.group(1) == "mid":
        kind, i, rest = m.group(2), int(m.group(3)), m.group(4)
        return f"middle_block.{2 * i + (kind == 'attentions')}.{_inner(kind, rest)}"
    if m:
        side, b, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        index = 1 + b * per_block + i if side == "down" else b * per_block + i
        where = "input_blocks" if side == "down" else "output_blocks"
        return f"{where}.{index}.{int(kind == 'attentions')}.{_inner(kind, rest)}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * per_block}.0.op.{m.group(2)}"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$", key)
    if m:
        b = int(m.group(1))
        return f"output_blocks.{b * per_block + per_block - 1}.{2 if b in with_attention else 1}.conv.{m.group(2)}"
    return None


def _inner(kind: str, rest: str) -> str:
    """A ResNet's or attention's parameter path inside its LDM block."""
    if kind == "attentions":
        return rest
    module, attr = rest.split(".", 1)
    return f"{_RESNET_TO_LDM.get(module, module)}.{attr}"
