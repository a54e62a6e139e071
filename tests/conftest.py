import os

import pytest
import torch

import workbench
from workbench.toy.oracle import Oracle

if os.environ.get("PYTEST_XDIST_WORKER"):
    # test processes share the cores: one torch thread each, and for the notebook kernels they start
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy():
    return workbench.load("toy")


@pytest.fixture(scope="session")
def toy_bf16():
    return workbench.load("toy", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def oracle():
    return Oracle.load()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return workbench.build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return workbench.models.build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl_dir):
    return workbench.load(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    return workbench.models.build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    return workbench.models.build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def flux(tiny_flux_dir):
    return workbench.load(tiny_flux_dir)


@pytest.fixture(scope="session")
def sd3(tiny_sd3_dir):
    return workbench.load(tiny_sd3_dir)


@pytest.fixture(scope="session", params=["flux", "sd3"])
def dit(request):
    """Each transformer family's tiny pipeline in turn."""
    return request.getfixturevalue(request.param)


def family_state(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of every weight-bearing component (text encoders, UNet or transformer), cloned."""
    from workbench.families import family_of
    return {f"{name}.{k}": v.clone() for name, module in family_of(pipe).components(pipe).items() if name != "vae"
            for k, v in module.state_dict().items()}


def same_family_state(pipe, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``pipe``'s tensors equal ``state`` (from :func:`family_state`) exactly."""
    now = family_state(pipe)
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def state_of(pipe) -> dict[str, torch.Tensor]:
    """Every text-encoder and UNet tensor of ``pipe``, cloned."""
    return {**{f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()},
            **{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}}


def same_state(pipe, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``pipe``'s tensors equal ``state`` exactly."""
    now = state_of(pipe)
    return all(torch.equal(now[k], v) for k, v in state.items())


#: Doctests of these modules run the toy model through whole measurements.
SLOW_DOCTESTS = {"workbench.metrics", "workbench.sweep", "workbench.attacks.table", "workbench.report",
                 "workbench.edits"}


def pytest_collection_modifyitems(config, items):
    """Notebooks (nbval), the browser test and the slowest doctests are ``slow``; so is every test marked
    by hand (over about two seconds on a quiet 2-core CPU)."""
    for item in items:
        if item.path.suffix == ".ipynb" or item.get_closest_marker("browser") or item.name in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)
