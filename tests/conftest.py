"""Shared fixtures: tiny models written once per session in the standard folder layouts."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from fdreamer import tiny_models as tm


def make_untrained_tiny_models(out: Path, **kwargs: object) -> dict:
    """``make_tiny_models`` with a random VAE, silencing its "untrained VAE" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tm.make_tiny_models(out, allow_untrained_vae=True, **kwargs)


@pytest.fixture(scope="session")
def no_asset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE asset folder that does not exist: tests behave the same before and after training."""
    return tmp_path_factory.mktemp("assets") / "tiny_vae"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, no_asset: Path) -> Path:
    """Tiny models (random VAE, seed 0) written once per session."""
    out = tmp_path_factory.mktemp("tiny") / "models"
    make_untrained_tiny_models(out, seed=0, vae_asset_dir=no_asset)
    return out


@pytest.fixture(scope="session")
def memory(no_asset: Path) -> tm.TinyModels:
    """The same models, in memory, before saving."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tm.build_tiny_models(seed=0, allow_untrained_vae=True, vae_asset_dir=no_asset)
