"""The toy world, in one place: the icon world and its renderer, the oracle, the trained model, and the
profile (concept set, judge, method defaults) that ``workbench.load("toy")`` attaches."""
from .profile import PROFILE, TOY_CONCEPTS, TOY_FEWSHOT_LR, TOY_LAMBDA, concept_prompts

__all__ = ["PROFILE", "TOY_CONCEPTS", "TOY_FEWSHOT_LR", "TOY_LAMBDA", "concept_prompts"]
