"""Where the toy world's files live: the trained weights, the few-shot image sets, the vocabulary."""
from ..paths import DATA
TOY_DIR = DATA / "toy"
#: The toy DiT: the same icon world drawn by a FLUX-shaped transformer.
TOY_DIT_DIR = DATA / "toy-dit"
FEWSHOT_DIR = DATA / "fewshot"
VOCABULARY_FILE = DATA / "vocabulary.txt"
REBUILD_HINT = "rebuild it with `python -m workbench.toy.train` (about an hour on a laptop CPU)"
