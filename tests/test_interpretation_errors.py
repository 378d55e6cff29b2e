"""Clear errors instead of silent or obscure failures, and corrected claims, in interpretation (issue 18 items 15,
16): dissection masks of another aspect, TCAV without inputs, relevant units on one class; the quantile sketch's
value bound; PCA's exact solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import GapCNN
from torch import nn

from lightning_xai.interpretation.dissection import NetworkDissection
from lightning_xai.interpretation.embedding import project_features
from lightning_xai.interpretation.quantiles import QuantileSketch
from lightning_xai.interpretation.relevant_units import RelevantUnitAnalysis
from lightning_xai.interpretation.tcav import TCAV


class Units(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


def test_dissection_refuses_concept_masks_of_another_aspect_ratio():
    images = torch.rand(4, 3, 16, 16)
    same_aspect = torch.rand(4, 2, 32, 32) > 0.5  # another resolution, same aspect: fine
    result = NetworkDissection("units")(Units(), [(images, same_aspect)], ["a", "b"])
    assert result.iou.shape == (4, 2)
    stretched = torch.rand(4, 2, 16, 24) > 0.5
    with pytest.raises(ValueError, match=r"16x24.*aspect ratio.*16x16"):
        NetworkDissection("units")(Units(), [(images, stretched)], ["a", "b"])


def _tcav_args():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.rand(6, 3, 8, 8, generator=g)}, torch.rand(12, 3, 8, 8, generator=g)


def test_tcav_without_inputs_or_examples_is_a_clear_error():
    model, tcav = GapCNN().eval(), TCAV("features", num_random=2)
    concepts, random = _tcav_args()
    with pytest.raises(ValueError, match="TCAV: inputs is an empty batch"):
        tcav(model, torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), concepts, random)
    with pytest.raises(ValueError, match="concept 'a' has no examples"):
        tcav(model, torch.rand(2, 3, 8, 8), 1, {"a": torch.zeros(0, 3, 8, 8)}, random)
    with pytest.raises(ValueError, match="random_examples is empty"):
        tcav(model, torch.rand(2, 3, 8, 8), 1, concepts, torch.zeros(0, 3, 8, 8))


def test_relevant_units_on_a_single_class_is_a_clear_error():
    feats = torch.rand(10, 4)
    units = [("features", i) for i in range(4)]
    with pytest.raises(ValueError, match=r"only class \[2\].*at least two classes"):
        RelevantUnitAnalysis("features").fit_features(feats, torch.full((10,), 2), units, num_classes=3)
    model = GapCNN().eval()
    with pytest.raises(ValueError, match="at least two classes"):
        RelevantUnitAnalysis("features.3").fit(model, (torch.rand(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)))
    bad = feats.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf.*samples \[3\]"):
        RelevantUnitAnalysis("features").fit_features(bad, torch.arange(10) % 2, units)


def test_quantile_estimates_lie_within_a_cell_of_the_order_statistic_not_of_the_interpolated_quantile():
    # two clusters far apart: the median of 4 values interpolates across the gap
    values = torch.tensor([[1.0, 1.001, 100.0, 100.1]])
    sketch = QuantileSketch(1, resolution_bits=6)
    sketch.update(values.T)  # [n, units]
    p = 0.5
    j = int(np.floor((values.shape[1] - 1) * p))
    order = values.sort(dim=1).values[0]
    estimate, width = sketch.quantile(p)[0].item(), sketch.cell_width(p)[0].item()
    assert abs(estimate - order[j].item()) <= width  # the documented bound
    interpolated = torch.quantile(values[0], p).item()
    assert abs(estimate - interpolated) > 10 * width  # ... which is not a bound on the interpolated quantile
    rank_bound = sketch.rank_error(p)[0].item() * values.shape[1]
    below = int((values[0] < estimate).sum())
    assert abs(below - (j + 1)) <= rank_bound


def test_pca_exact_solver_is_the_default_and_offers_the_randomised_one():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(200, 40, generator=gen, dtype=torch.float64)  # a flat spectrum
    coords, ratio = project_features(features, "pca", dim=2)
    centred = (features - features.mean(0)).numpy()
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(ratio.numpy(), (s[:2] ** 2 / (s**2).sum()), rtol=1e-5)
    np.testing.assert_allclose(np.abs(coords.numpy()), np.abs(centred @ vt[:2].T), atol=1e-4)
    _, approx = project_features(features, "pca", dim=2, pca_solver="randomized")
    assert approx.shape == ratio.shape
    with pytest.raises(ValueError, match="pca_solver"):
        project_features(features, "pca", pca_solver="svd")
