"""The sampler table: Euler and DPM-Solver++(2M) on flows with known answers, guidance as a wrapper."""

import math

import pytest
import torch

from qimg.sampling.guidance import cfg_combine, guided
from qimg.sampling.samplers import SAMPLERS, dpmpp_2m, euler


def straight(x0, eps):
    """x_t = (1 - t) x0 + t eps has the constant velocity eps - x0."""
    return lambda x, sigma: eps - x0


def gaussian_flow(mean: float, std: float):
    """Data ~ N(mean, std^2): the exact velocity of the flow-matching ODE, and the exact point at sigma t of the
    trajectory that starts from noise z at sigma 1 (x_t = (1-t) mean + sqrt((1-t)^2 std^2 + t^2) z)."""

    def velocity(x, sigma):
        t = float(sigma)
        a = 1 - t
        denoised = mean + a * std**2 / (a * a * std**2 + t * t) * (x - a * mean)
        return (x - denoised) / t

    return velocity, lambda z, t: (1 - t) * mean + math.sqrt((1 - t) ** 2 * std**2 + t * t) * z


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_is_exact_on_a_straight_flow(name):
    x0, eps = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    seen = []
    out = SAMPLERS[name](straight(x0, eps), eps.clone(), torch.tensor([1.0, 0.7, 0.3, 0.0]),
                         lambda i, n, x, d: seen.append((i, n, torch.allclose(d, x0, atol=1e-5))))
    assert torch.allclose(out, x0, atol=1e-5)
    assert seen == [(1, 3, True), (2, 3, True), (3, 3, True)]  # the step's estimate is exact for a straight flow


def test_dpmpp_2m_is_more_accurate_than_euler_on_a_curved_flow():
    velocity, exact = gaussian_flow(mean=0.7, std=0.3)
    z = torch.randn(4096, dtype=torch.float64)
    errors = {}
    for steps in (16, 32, 64):
        sigmas = torch.linspace(1, 0.1, steps + 1, dtype=torch.float64)  # the last step to 0 is x0 for all
        for name, sampler in (("euler", euler), ("dpmpp-2m", dpmpp_2m)):
            errors[name, steps] = (sampler(velocity, z.clone(), sigmas) - exact(z, 0.1)).abs().max().item()
    for steps in (16, 32, 64):
        assert errors["dpmpp-2m", steps] < errors["euler", steps] / 5
    # second order: doubling the steps cuts the error by about 4x (Euler: about 2x)
    assert errors["dpmpp-2m", 32] / errors["dpmpp-2m", 64] > 3
    assert errors["euler", 32] / errors["euler", 64] < 2.5


def test_dpmpp_2m_first_step_is_euler():
    velocity, _ = gaussian_flow(0.2, 0.5)
    z = torch.randn(64, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.6], dtype=torch.float64)
    assert torch.allclose(dpmpp_2m(velocity, z.clone(), sigmas), euler(velocity, z.clone(), sigmas))


def test_a_callback_can_stop_a_sampler():
    class Stop(Exception):
        pass

    def callback(i, n, x, d):
        if i == 2:
            raise Stop

    calls = []
    with pytest.raises(Stop):
        euler(lambda x, s: calls.append(1) or x, torch.zeros(1), torch.tensor([1.0, 0.6, 0.3, 0.0]), callback)
    assert len(calls) == 2


def test_guidance_wraps_the_velocity():
    cond, uncond = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    assert torch.allclose(cfg_combine(cond, uncond, 1.0), cond)
    out = cfg_combine(cond, uncond, 4.0, renorm=True)
    assert torch.allclose(out.norm(dim=-1), cond.norm(dim=-1), atol=1e-5)
    order = []
    model = guided(lambda x, s: order.append("cond") or cond, lambda x, s: order.append("uncond") or uncond, 3.0)
    assert torch.allclose(model(None, None), uncond + 3 * (cond - uncond)) and order == ["cond", "uncond"]
    alone = lambda x, s: cond  # noqa: E731
    assert guided(alone, None, 3.0) is alone
    assert math.isclose(float(cfg_combine(torch.ones(1), torch.zeros(1), 2.5)), 2.5)
