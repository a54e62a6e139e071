"""Every hook the workbench puts on a model, each a context manager that restores the model exactly.

==========================  ================================================================
``hooked(pairs)``           forward hooks ``(module, fn(module, inputs, output) -> output)``
``hooked(pairs, pre=True)`` pre-hooks ``(module, fn(module, inputs) -> inputs)``: what a module reads
``frozen(*modules)``        gradients off for the modules' parameters; the flags come back
``processors(layers, make)`` attention processors swapped, the very same objects put back
``cache(pipe, names)``      every output (or input) of the named parts or blocks, captured per call
``trainable_attention(pipe)`` attention kernels that train through a transformer on CUDA
==========================  ================================================================

>>> import torch, workbench
>>> from workbench.families import family_of
>>> pipe = workbench.load("toy")
>>> with cache(pipe, ["text.0.ffn.out"]) as seen:
...     _ = family_of(pipe).encode(pipe, ["an apple"])
>>> seen["text.0.ffn.out"][0].shape
torch.Size([1, 20, 384])
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .families import family_of

Hook = Callable[[nn.Module, tuple, object], object]


@contextmanager
def hooked(pairs: Sequence[tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Forward hooks ``(module, fn)`` for the duration of the block (``fn`` may return a new output); with
    ``pre``, hooks on what the module reads (``fn(module, inputs)`` may return new inputs)."""
    with ExitStack() as stack:
        for module, fn in pairs:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            stack.callback(register(fn).remove)
        yield


def on_states(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``output`` with ``fn`` applied to its hidden states (a tensor, or the first item of a tuple)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Gradients off for the modules' parameters (nothing is written into the model); flags restored."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def processors(layers: dict[str, nn.Module], make: Callable[[str, object], object]) -> Iterator[None]:
    """Give each attention layer the processor ``make(name, its processor)``; on exit every layer gets
    back the very processor object it had."""
    saved = {name: m.processor for name, m in layers.items()}
    try:
        for name, m in layers.items():
            m.set_processor(make(name, saved[name]))
        yield
    finally:
        for name, m in layers.items():
            m.set_processor(saved[name])


def modules(pipe, names: Sequence[str]) -> dict[str, nn.Module]:
    """The modules named: parts (``text.0.ffn.out``), layers where text meets image (``unet.mid.0``) or
    blocks (``unet.up.1``); an error listing what exists when a name is none of them."""
    family = family_of(pipe)
    known = {**family.parts(pipe), **family.cross_attention(pipe), **family.blocks(pipe)}
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"{', '.join(map(repr, missing))}: no such part, layer or block; blocks: "
                       f"{', '.join(family.blocks(pipe))}; parts are listed by workbench.anatomy.names(pipe)")
    return {n: known[n] for n in names}


@contextmanager
def cache(pipe, names: Sequence[str], detach: bool = True,
          inputs: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Capture the output (hidden states) of each named module at every call while the block runs:
    ``{name: [output of call 1, call 2, ...]}``; with ``inputs``, its first input instead (the keys a
    k/v projection reads)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    take_input = inputs

    def keep(name: str) -> Hook:
        def hook(module, inputs, output):
            states = inputs[0] if take_input else output[0] if isinstance(output, tuple) else output
            seen[name].append(states.detach() if detach else states)
        return hook

    with hooked([(m, keep(n)) for n, m in modules(pipe, list(names)).items()]):
        yield seen


@contextmanager
def trainable_attention(pipe) -> Iterator[None]:
    """A context for training through a transformer on CUDA: attention without the cuDNN kernel, whose
    backward gave NaN gradients through a frozen FLUX transformer in float16 and bfloat16 (PyTorch 2.11,
    H200) where the flash, memory-efficient and math kernels give finite ones. Elsewhere (a UNet, the CPU)
    it changes nothing."""
    family = family_of(pipe)
    if family.denoiser(pipe).device.type != "cuda" or "transformer" not in family.components(pipe):
        yield
        return
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
