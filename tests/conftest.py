import os

import pytest

from tests.pg_support import postgres_url  # noqa: F401 - a PostgreSQL server per test module

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


@pytest.fixture(scope="session")
def ref_v1_parts():
    """One set of tiny random v1 components (tokenizer, processor, Qwen2.5-VL, RGB VAE, transformer)."""
    pytest.importorskip("diffusers")
    from tests.reference_v1 import v1_parts

    return v1_parts()


@pytest.fixture(scope="session")
def ref_v1(ref_v1_parts, tmp_path_factory):
    """Reference v1 pipelines on the shared components, each saved by diffusers in its own folder:
    {"t2i", "edit", "edit_plus", "edit_plus_2511"} -> (pipeline, folder)."""
    from tests.reference_v1 import build_edit, build_t2i

    root = tmp_path_factory.mktemp("qwenimage_v1")
    builders = {"t2i": lambda f: build_t2i(f, ref_v1_parts),
                "edit": lambda f: build_edit(f, ref_v1_parts, plus=False),
                "edit_plus": lambda f: build_edit(f, ref_v1_parts, plus=True),
                "edit_plus_2511": lambda f: build_edit(f, ref_v1_parts, plus=True, zero_cond_t=True)}
    return {name: (build(root / name), root / name) for name, build in builders.items()}


@pytest.fixture(scope="session")
def ref_layered(ref_v1_parts, tmp_path_factory):
    """A reference QwenImageLayeredPipeline (RGBA VAE, Layer3D transformer) saved by diffusers, and its folder."""
    from tests.reference_v1 import build_layered

    folder = tmp_path_factory.mktemp("qwenimage_layered")
    return build_layered(folder, ref_v1_parts), folder
