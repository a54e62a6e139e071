"""Model families: the one place that knows how a kind of pipeline is built.

A :class:`Family` adapter is chosen once per pipeline (:func:`family_of`, the way diffusers'
AutoPipeline picks a class) from the families registered in :data:`FAMILIES`. It owns what differs
between Stable Diffusion 1.x/2.x, SDXL, SD 3 and FLUX.1: the part names, tokenising with
every tokenizer, encoding prompts into one :class:`Conditioning` (the token rows cross-attention sees,
a pooled vector where the family has one), the denoiser call with that conditioning, the training
target, the layers where text meets image and the blocks a trace restores. Everything above this
package goes through it; none of it names a pipeline attribute. A new family is one module with a
subclass of :class:`Family` and a :func:`register` call.

>>> import workbench
>>> family_of(workbench.load("toy")).name
'sd'
>>> [f.name for f in FAMILIES]
['sd3', 'flux', 'sdxl', 'sd']
"""
from .base import FAMILIES, Conditioning, Family, family_of, refusal, register
from . import sd, sdxl, mmdit, flux, sd3

__all__ = ["Conditioning", "Family", "FAMILIES", "register", "family_of", "refusal"]
