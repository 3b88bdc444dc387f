"""Distillation's settings: a teacher of another architecture or tokenizer, and bad loss settings, refused."""

import dataclasses
import re

import pytest

from nemo_plrd.config import TrainConfig
from nemo_plrd.distill import check_teacher, check_teacher_source
from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.model import SMOLLM2_135M
from tiny_llama import save_tiny_llama


def test_a_teacher_of_another_architecture_is_refused_naming_the_difference():
    other = dataclasses.replace(SMOLLM2_135M, num_layers=12, hidden_size=640)
    with pytest.raises(InputError, match=r"train.teacher='x': the teacher's architecture differs from the student's "
                                         r"\(num_layers 12 vs 30, hidden_size 640 vs 576\)"):
        check_teacher(SMOLLM2_135M, other, {"a": 0}, {"a": 0}, "train.teacher='x'")


def test_a_teacher_that_is_no_model_is_refused_naming_the_teacher(tmp_path):
    """Refused as a parent would be, but as the teacher (before: the same words, no key)."""
    student, teacher = save_tiny_llama(tmp_path / "student"), tmp_path / "empty"
    teacher.mkdir()
    with pytest.raises(MissingInputError, match=re.escape(f"train.teacher='x': {teacher} is neither a PLRD checkpoint "
                                                          "nor an HF model directory")):
        check_teacher_source(student, teacher, "train.teacher='x'")


def test_a_teacher_with_another_tokenizer_is_refused():
    with pytest.raises(InputError, match="the teacher's tokenizer differs from the student's"):
        check_teacher(SMOLLM2_135M, SMOLLM2_135M, {"a": 0, "b": 1}, {"a": 0, "c": 1}, "train.teacher='x'")
    check_teacher(SMOLLM2_135M, SMOLLM2_135M, {"a": 0}, {"a": 0}, "train.teacher='x'")  # the same: accepted


@pytest.mark.parametrize("values,message", [
    ({"loss": "kl"}, "train.loss='kl' is not one of ['lm', 'kd', 'lm+kd']"),
    ({"loss": "lm+kd", "kd_weight": 0.0}, "train.kd_weight=0.0 must be > 0"),
    ({"loss": "kd", "kd_weight": 0.5}, "train.kd_weight=0.5 weighs the KL against the LM loss in train.loss=lm+kd only"),
    ({"loss": "kd", "teacher": "/nowhere"}, "train.teacher='/nowhere' is not a directory"),
])
def test_bad_distillation_settings_are_refused(values, message):
    with pytest.raises(InputError, match=re.escape(message)):
        TrainConfig(**values)
