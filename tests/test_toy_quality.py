import ast
from pathlib import Path

import workbench.toy


def test_the_toy_package_never_imports_the_model_loader_that_imports_it():
    folder = Path(workbench.toy.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level == 2 and node.module == "models"), path.name
                assert node.module != "workbench.models", path.name

