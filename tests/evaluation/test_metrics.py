"""The metrics on hand-made features and predictions: each number moves the way its docstring says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.evaluation import metrics


def identity(features):
    # An "encoder" whose images already are features: the metrics see exactly the numbers we chose.
    return torch.as_tensor(features, dtype=torch.float32)


def test_identical_images_have_fidelity_one_and_no_diversity():
    same = [[1.0, 2.0, 3.0]] * 4
    assert metrics.subject_fidelity(identity, same, same) == pytest.approx(1.0)
    assert metrics.diversity(identity, same) == pytest.approx(0.0, abs=1e-6)


def test_orthogonal_images_have_fidelity_zero_and_diversity_one():
    eye = torch.eye(3)
    assert metrics.subject_fidelity(identity, eye[:1], eye[1:]) == pytest.approx(0.0)
    assert metrics.diversity(identity, eye) == pytest.approx(1.0)


def test_scale_does_not_matter_only_direction():
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert metrics.mean_cosine(a * 7, a) == pytest.approx(metrics.mean_cosine(a, a))
    assert metrics.diversity(identity, a * 0.01) == pytest.approx(metrics.diversity(identity, a))


def test_fidelity_is_the_mean_over_every_generated_reference_pair():
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    references = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # cosines: row 1 -> 1, 1, 1; row 2 -> 0, 0, 0
    assert metrics.subject_fidelity(identity, generated, references) == pytest.approx(0.5)


def test_diversity_counts_distinct_pairs_only():
    # Two identical rows and one orthogonal: pairs (0,1)=0, (0,2)=1, (1,2)=1 -> 2/3. Counting the
    # diagonal (self-pairs, distance 0) would give 4/9 instead.
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert metrics.diversity(identity, f) == pytest.approx(2 / 3)


def test_pres_rises_as_class_samples_drift_toward_the_subject():
    subject = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    kept = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 1.0, 0.0]])  # other balls
    drifted = torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.0, 0.2], [1.0, 0.0, 0.0]])  # subject-like
    assert metrics.pres(identity, drifted, subject) > metrics.pres(identity, kept, subject) + 0.5
    assert metrics.prior_drift is metrics.pres


def test_diversity_needs_two_images():
    with pytest.raises(InvalidInput, match="at least 2"):
        metrics.diversity(identity, [[1.0, 0.0]])


def test_feature_sizes_must_agree():
    with pytest.raises(InvalidInput, match="feature sizes differ"):
        metrics.mean_cosine(torch.ones(2, 3), torch.ones(2, 4))


class FakeJudge:
    def __init__(self, **predictions):
        self.predictions = {k: np.asarray(v) for k, v in predictions.items()}

    def predict(self, images):
        assert len(images) == len(next(iter(self.predictions.values())))
        return self.predictions


def test_subject_rate_counts_probabilities_above_half():
    judge = FakeJudge(subject_prob=[0.9, 0.2, 0.51, 0.5])
    assert metrics.subject_rate(judge, [None] * 4) == pytest.approx(0.5)
    assert metrics.subject_rate(judge, [None] * 4, threshold=0.1) == pytest.approx(1.0)


def test_attribute_accuracy_scores_only_what_each_prompt_asked():
    judge = FakeJudge(
        **{
            "class": ["ball", "ball", "box", "ring"],
            "colour": ["red", "blue", "red", "red"],
            "background": ["green", "green", "sand", "blue"],
        }
    )
    expected = [
        {"class": "ball", "background": "green"},  # right, right ("a zwx ball on a green background")
        {"class": "ball", "colour": "red"},  # right, wrong
        {"class": "ball"},  # wrong
        {"class": "ring", "colour": "red", "background": "blue"},  # all right
    ]
    acc = metrics.attribute_accuracy(judge, [None] * 4, expected)
    assert acc == {"class": 0.75, "colour": 0.5, "background": 1.0, "all": 0.5}


def test_attribute_accuracy_rejects_unknown_attributes_and_mismatched_lengths():
    judge = FakeJudge(**{"class": ["ball"], "colour": ["red"], "background": ["blue"]})
    with pytest.raises(InvalidInput, match="'shape'"):
        metrics.attribute_accuracy(judge, [None], [{"shape": "round"}])
    with pytest.raises(InvalidInput, match="1 images but 2"):
        metrics.attribute_accuracy(judge, [None], [{"class": "ball"}] * 2)
