"""Sigma schedules against the reference scheduler, and scheduler overrides."""

import numpy as np
import pytest

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


def test_overrides_and_shift():
    from qimg.errors import InputError

    base = SchedulerConfig.from_dict(QWEN)
    assert base.with_overrides(None) is base
    lightning = base.with_overrides({"base_shift": float(np.log(3)), "max_shift": float(np.log(3)),
                                     "shift_terminal": None})
    assert lightning.base_shift == lightning.max_shift and lightning.shift_terminal is None
    assert lightning.use_dynamic_shifting and base.shift_terminal == 0.02  # the original is unchanged
    shifted = base.with_shift(3.0)
    assert shifted.shift == 3.0 and not shifted.use_dynamic_shifting and shifted.shift_terminal == 0.02
    # a constant shift of 3 is what Lightning's ln 3 dynamic shift gives at every resolution
    for tokens in (64, 4096):
        a = get_sigmas(lightning, steps=4, mu=mu_for_tokens(lightning, tokens))
        b = get_sigmas(SchedulerConfig.from_dict({**QWEN, "shift_terminal": None}).with_shift(3.0), steps=4)
        assert np.allclose(a, b, atol=1e-6)
    with pytest.raises(InputError, match="frobnicate"):
        base.with_overrides({"frobnicate": 1})
    with pytest.raises(InputError, match="time_shift_type"):
        base.with_overrides({"time_shift_type": "cubic"})
