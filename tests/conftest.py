import pytest

import workbench
from workbench.toy.oracle import Oracle


@pytest.fixture(scope="session")
def toy():
    return workbench.load("toy")


@pytest.fixture(scope="session")
def oracle():
    return Oracle.load()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return workbench.build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))
