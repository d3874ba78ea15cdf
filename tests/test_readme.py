"""The README's plug-in example works exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

from wmbench.runner import Runner
from wmbench.scenario import load_scenario

README = Path(__file__).parents[1] / "README.md"


def readme_examples() -> dict[str, str]:
    """File name -> code of each block marked ``<!-- readme-example: NAME -->``."""
    pattern = re.compile(r"<!-- readme-example: (\S+) -->\s*```\w*\n(.*?)```", re.S)
    return dict(pattern.findall(README.read_text()))


def test_readme_plugin_example_runs(tmp_path):
    examples = readme_examples()
    assert set(examples) == {"my_method.py", "my_study.yaml", "my_model.py", "my_attack.py"}
    for name, code in examples.items():
        (tmp_path / name).write_text(code)
    scenario = load_scenario(tmp_path / "my_study.yaml")
    frame = Runner(scenario, tmp_path / "cache", "cpu", progress=False).run()
    clean = frame[(frame.strength == 0)].set_index("method")
    assert set(clean["seed"]) == {0, 1, 2}  # the example publishes intervals
    assert (clean.loc["frozen_image", "detect_stat"] > 0.999).all()  # carriers untouched by training
    assert clean.loc["frozen_image", "detected"].all() and not clean.loc["none", "detected"].any()
    assert (clean.loc["frozen_image", "error_clean"] < 20).all()


def test_readme_model_example_builds_and_runs(tmp_path, digits):
    from wmbench.registry import MODELS

    (tmp_path / "my_model.py").write_text(readme_examples()["my_model.py"])
    (tmp_path / "s.yaml").write_text(
        "name: mlp\nplugins: [my_model.py]\ndatasets: [digits]\nmodels: [{name: my_mlp, args: {hidden: 32}}]\nmethods: [none]\n"
    )
    scenario = load_scenario(tmp_path / "s.yaml")
    model = MODELS.build("my_mlp", {"hidden": 32}).build(digits)
    assert model(digits.test_x[:2]).shape == (2, 10) and scenario.models[0].obj.hidden == 32


def test_readme_attack_example_runs_as_documented(tmp_path):
    """The attack example: its effect is the row's attack_effect (the relative distance it was asked
    for), its note the row's detect_note, strength 0 the untouched model, and check_strength refuses
    a strength at load."""
    import pytest

    from wmbench.errors import ConfigError

    (tmp_path / "my_attack.py").write_text(readme_examples()["my_attack.py"])
    scenario_text = (
        "name: lowrank\nplugins: [my_attack.py]\nseeds: [0]\ndatasets: [digits]\n"
        "models: [{name: small_cnn, args: {width: 8, hidden: 16}}]\nmethods: [none]\ntraining: {epochs: 1}\n"
        "attacks:\n  - {name: lowrank_noise, strengths: [0.3]}\n"
        "  - {name: lowrank_noise, label: lowrank-wide, args: {rank: 100}, strengths: [0.3]}\n"
    )
    (tmp_path / "s.yaml").write_text(scenario_text)
    frame = Runner(load_scenario(tmp_path / "s.yaml"), tmp_path / "cache", "cpu", progress=False).run().set_index(["attack", "strength"])
    assert frame.loc[("lowrank_noise", 0.3), "attack_effect"] == pytest.approx(0.3, rel=1e-4)
    assert frame.loc[("lowrank_noise", 0.0), "attack_effect"] == 0.0
    assert frame.loc[("lowrank_noise", 0.3), "error_delta"] != 0
    assert "rank capped" in frame.loc[("lowrank-wide", 0.3), "detect_note"]
    assert "rank capped" not in str(frame.loc[("lowrank_noise", 0.3), "detect_note"])  # rank 1 fits every tensor
    (tmp_path / "bad.yaml").write_text(scenario_text.replace("name: lowrank\n", "name: bad\n").replace("[0.3]}\n  -", "[20]}\n  -"))
    with pytest.raises(ConfigError, match="relative norm"):
        load_scenario(tmp_path / "bad.yaml")
