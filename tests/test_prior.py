import json
import math

import pytest

from fixres_deploy.cli.app import main
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.fixres.prior import (
    analytic_ratio,
    expected_sqrt_area,
    monte_carlo_ratio,
    resolution_prior,
)


def test_expected_sqrt_area_matches_closed_form_and_numeric_integral():
    lo, hi = 0.08, 1.0
    closed = (2 / 3) * (1 - 0.08**1.5) / 0.92
    assert expected_sqrt_area((lo, hi)) == pytest.approx(closed, rel=1e-12)
    assert expected_sqrt_area((lo, hi)) == pytest.approx(0.708, abs=5e-4)
    # midpoint-rule integral of sqrt(s) / (hi - lo)
    n = 100_000
    numeric = sum(math.sqrt(lo + (i + 0.5) * (hi - lo) / n) for i in range(n)) / n
    assert expected_sqrt_area((lo, hi)) == pytest.approx(numeric, rel=1e-6)
    assert expected_sqrt_area((0.25, 0.25)) == pytest.approx(0.5)


def test_analytic_ratio_is_the_papers_formula():
    # 0.708 x 256/224 = 0.81 for torchvision's defaults at K_test = K_train = 224
    r = analytic_ratio(224, 224, 0.875, (0.08, 1.0))
    assert r == pytest.approx(expected_sqrt_area((0.08, 1.0)) * 256 / 224, rel=1e-9)
    assert r == pytest.approx(0.809, abs=1e-3)
    # linear in the test resolution
    assert analytic_ratio(224, 448, 0.875, (0.08, 1.0)) == pytest.approx(2 * r)


def test_monte_carlo_matches_analytic_without_aspect_jitter():
    # ratio=(1,1) on square images: crops never get rejected, so MC must equal the formula
    # up to sampling error (and pixel rounding of the crop, which is tiny at 512 px).
    mean, se = monte_carlo_ratio(224, 224, 0.875, (0.08, 1.0), (1.0, 1.0), [(512, 512)], samples=100_000, seed=1)
    exact = analytic_ratio(224, 224, 0.875, (0.08, 1.0))
    assert abs(mean - exact) < 4 * se + 1e-3, (mean, exact, se)
    assert 0 < se < 0.002


def test_monte_carlo_reproduces_rejection_sampling_effects():
    square, _ = monte_carlo_ratio(224, 224, 0.875, (0.08, 1.0), (3 / 4, 4 / 3), [(500, 500)], samples=100_000)
    landscape, _ = monte_carlo_ratio(224, 224, 0.875, (0.08, 1.0), (3 / 4, 4 / 3), [(400, 300)], samples=100_000)
    assert square == pytest.approx(0.76, abs=0.01)
    assert landscape == pytest.approx(0.84, abs=0.01)


def test_candidates_are_on_the_stride_grid_and_clipped():
    r = resolution_prior(224, samples=20_000)
    assert r.recommended_test_res % 32 == 0
    assert all(c % 32 == 0 for c in r.candidates)
    assert 224 in r.candidates
    assert r.candidates == sorted(r.candidates)
    assert r.recommended_test_res > 224  # objects look smaller at test: grow the resolution
    clipped = resolution_prior(224, samples=20_000, min_res=200, max_res=300)
    assert all(200 <= c <= 300 for c in clipped.candidates)
    fine = resolution_prior(224, stride=8, samples=20_000, basis="analytic")
    # analytic: K_test = 224 * 0.875 / 0.708 = 276.8 -> 280 on an 8 px grid
    assert fine.recommended_test_res == 280


def test_prior_bad_input_is_a_clear_error():
    with pytest.raises(UserInputError, match="scale range"):
        resolution_prior(224, scale=(0.5, 0.1))
    with pytest.raises(UserInputError, match="crop_pct"):
        resolution_prior(224, crop_pct=1.5)
    with pytest.raises(UserInputError, match="train-res"):
        resolution_prior(3)


def test_prior_cli_json(capsys):
    assert main(["prior", "--train-res", "224", "--json", "--samples", "20000"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ratio_analytic", "ratio_monte_carlo", "recommended_test_res", "candidates"):
        assert key in out
    assert out["ratio_analytic"] == pytest.approx(0.809, abs=1e-3)
    assert isinstance(out["candidates"], list) and out["recommended_test_res"] in out["candidates"]


def test_prior_cli_bad_option_exits_2(capsys):
    assert main(["prior", "--train-res", "224", "--scale", "0.9,0.1"]) == 2
    assert "scale range" in capsys.readouterr().err
