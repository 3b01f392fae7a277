"""Fixtures: tiny fake dataset roots (see data_fakes.py for the layouts)."""
import pytest
from data_fakes import make_cifar100, make_cub, make_imagenet_r, make_imagenet_subset, make_ucf101


@pytest.fixture
def cifar_root(tmp_path):
    return make_cifar100(tmp_path / "cifar")


@pytest.fixture
def imagenet_r_root(tmp_path):
    return make_imagenet_r(tmp_path / "imr")


@pytest.fixture
def imagenet_subset_root(tmp_path):
    return make_imagenet_subset(tmp_path / "imagenet")


@pytest.fixture
def cub_root(tmp_path):
    return make_cub(tmp_path / "cub")


@pytest.fixture
def ucf_root(tmp_path):
    return make_ucf101(tmp_path / "ucf")
