"""Plug-in methods unlike the built-ins, second probe (an ML-security researcher's, 2026-12-07): a
detector that hands back a verdict where the p-value goes, keys holding what safetensors cannot
store, an embed that trains in another precision or trains a copy. Each row says what was measured,
or the method is refused in one line; no inverted figure is published."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import plugin_scenario, run_scenario

from wmbench.api import Detection

FOREIGN = '''
import copy
from dataclasses import dataclass

import torch

from wmbench.api import Detection
from wmbench.methods.uchida import Uchida
from wmbench.registry import METHODS


@METHODS.register("verdict_as_p")
@dataclass(frozen=True)
class VerdictAsP(Uchida):
    """Hands back its verdict (a bool) where the p-value goes."""

    def detect(self, model, key):
        d = super().detect(model, key)
        return Detection(d.stat, d.pvalue < 0.01)
'''


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    plugin = tmp_path_factory.mktemp("foreign") / "foreign.py"
    plugin.write_text(FOREIGN)
    return plugin


@pytest.mark.parametrize("stat, pvalue", [(0.9, True), (0.9, False), (0.9, np.bool_(False)), (0.9, torch.tensor(False)),
                                          (True, 0.01), (np.bool_(True), 0.01), (torch.tensor(True), 0.01)])
def test_a_detection_refuses_a_bool_for_a_number(stat, pvalue):
    """``Detection(stat, pvalue < 0.01)``: the verdict True read p = 1 (not detected) and False p = 0
    (detected): every row and the null's FPR (32/33) inverted, nothing said."""
    with pytest.raises(TypeError, match="a bool, not a number"):
        Detection(stat, pvalue)


def test_a_detection_takes_a_tensor_that_requires_grad_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = Detection(torch.tensor(0.8, requires_grad=True), torch.tensor([0.01], dtype=torch.float64))
    assert d.stat == pytest.approx(0.8) and d.pvalue == 0.01


def test_a_verdict_handed_back_as_the_p_value_fails_every_cell(tmp_path, foreign):
    path = plugin_scenario(tmp_path, foreign, "verdict_as_p", epochs=2, name="verdict")
    code, frame = run_scenario(path, tmp_path / "c")
    assert frame["detected"].isna().all() and frame["detect_pvalue"].isna().all(), frame[["detect_pvalue", "detected"]]
    assert frame["failure"].str.contains("detect: TypeError: Detection p-value is a bool, not a number").all(), frame["failure"].tolist()
