"""``wmbench embed`` picks a training the grid has: with a model entry restricted to some datasets,
the defaults pair with what is given, and an explicit pair the grid lacks is one line (exit 2)
where it was an AssertionError's traceback."""

from __future__ import annotations

import pytest

from wmbench.errors import ConfigError
from wmbench.ownership import select_cell
from wmbench.scenario import load_scenario

SCENARIO = """
name: pairs
seeds: [0]
datasets: [digits, {name: synthetic, label: syn, args: {size: 8, channels: 1}}]
models:
  - {name: small_cnn, label: a, datasets: [digits]}
  - {name: small_cnn, label: b, args: {width: 8}, datasets: [syn]}
methods: [none, uchida]
training: {epochs: 1}
"""


@pytest.fixture
def scenario(tmp_path):
    (tmp_path / "s.yaml").write_text(SCENARIO)
    return load_scenario(tmp_path / "s.yaml")


@pytest.mark.parametrize("given, pair", [
    ({}, ("a", "digits")), ({"model": "b"}, ("b", "syn")), ({"dataset": "syn"}, ("b", "syn")), ({"model": "a", "dataset": "digits"}, ("a", "digits")),
])
def test_the_defaults_pair_with_what_is_given(scenario, given, pair):
    cell = select_cell(scenario, **given)
    assert (cell.model.label, cell.dataset.label, cell.method.label) == (*pair, "uchida")


def test_a_pair_the_grid_lacks_is_refused_naming_its_pairs(scenario):
    with pytest.raises(ConfigError, match=r"no 'uchida' training of model 'b' on dataset 'digits'.*a / digits, b / syn") as info:
        select_cell(scenario, model="b", dataset="digits")
    assert info.value.field == "--dataset"
