"""Sigma schedules against the reference scheduler, and the Euler/CFG loop."""

import numpy as np
import pytest
import torch

from qimg.sampling.sample import cfg_combine, euler
from qimg.sampling.schedule import SchedulerConfig, get_sigmas, mu_for_tokens

diffusers = pytest.importorskip("diffusers")

QWEN = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
        "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
        "time_shift_type": "exponential", "invert_sigmas": False, "stochastic_sampling": False,
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
CONFIGS = [
    QWEN,
    {**QWEN, "time_shift_type": "linear", "shift_terminal": None},  # Layered
    {**QWEN, "base_shift": float(np.log(3)), "max_shift": float(np.log(3)), "shift_terminal": None},  # Lightning
    {"shift": 3.0, "use_dynamic_shifting": False},
    {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": 0.1},
]


def reference_sigmas(config, steps, tokens, sigmas=None):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    base = sched.config
    m = (base.max_shift - base.base_shift) / (base.max_image_seq_len - base.base_image_seq_len)
    mu = tokens * m + base.base_shift - m * base.base_image_seq_len
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(sigmas=sigmas, mu=mu if base.use_dynamic_shifting else None)
    return sched.sigmas.numpy()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps,tokens", [(1, 16), (4, 64), (20, 4096), (50, 16384)])
def test_sigmas_match_reference(config, steps, tokens):
    cfg = SchedulerConfig.from_dict(config)
    ours = get_sigmas(cfg, steps=steps, mu=mu_for_tokens(cfg, tokens))
    expected = reference_sigmas(config, steps, tokens)
    if np.isnan(expected).any():  # the reference divides 0 by 0 for a single step with shift_terminal
        assert steps == 1 and ours.tolist() == [1.0, 0.0]
        return
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-7


def test_user_sigmas_match_reference():
    custom = [1.0, 0.75, 0.5, 0.25]
    cfg = SchedulerConfig.from_dict(QWEN)
    ours = get_sigmas(cfg, sigmas=custom, mu=mu_for_tokens(cfg, 1024))
    assert np.abs(ours - reference_sigmas(QWEN, 4, 1024, custom)).max() <= 1e-7
    assert ours[-2] == pytest.approx(0.02, abs=1e-6)  # shift_terminal stretch


@pytest.mark.parametrize("bad", [[], [1.2, 0.5], [0.5, -0.1]])
def test_bad_user_sigmas(bad):
    with pytest.raises(ValueError, match="sigmas"):
        get_sigmas(SchedulerConfig.from_dict(QWEN), sigmas=bad, mu=0.5)


def test_unknown_scheduler_key_is_named():
    from qimg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="frobnicate"):
        SchedulerConfig.from_dict({**QWEN, "frobnicate": 1})


def test_euler_integrates_a_straight_flow():
    # For x_t = (1 - t) x0 + t eps the exact velocity is eps - x0; Euler is exact for a straight line.
    x0, eps = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    x0_true = x0
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    seen = []
    out = euler(lambda x, s: eps - x0, eps.clone(), sigmas, progress=lambda i, n, x, x0: seen.append((i, n, torch.allclose(x0, x0_true, atol=1e-6))))
    assert torch.allclose(out, x0, atol=1e-6)
    assert seen == [(1, 3, True), (2, 3, True), (3, 3, True)]  # the estimate is exact for a straight flow


def test_cfg_combine_and_renorm():
    cond, uncond = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    assert torch.allclose(cfg_combine(cond, uncond, 1.0), cond)
    out = cfg_combine(cond, uncond, 4.0, renorm=True)
    assert torch.allclose(out.norm(dim=-1), cond.norm(dim=-1), atol=1e-5)


def test_cancel_between_steps():
    with pytest.raises(InterruptedError, match="after 0 of 2"):
        euler(lambda x, s: x, torch.zeros(1, 1, 1), torch.tensor([1.0, 0.5, 0.0]), should_stop=lambda: True)
