import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def ref21(tmp_path_factory):
    """A tiny random QwenImage21Pipeline saved by the reference, and its folder."""
    pytest.importorskip("diffusers")
    from tests.reference import build_reference_21

    folder = tmp_path_factory.mktemp("qwenimage21")
    pipe = build_reference_21(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder
