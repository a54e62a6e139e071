"""Where the workbench's own files live, found from the package wherever it is imported from."""
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
#: Results the workbench ships (``data/results``): what the README's tables and the notebooks are drawn from.
RESULTS = DATA / "results"
#: Example experiment grids (``data/grids``).
GRIDS = DATA / "grids"
