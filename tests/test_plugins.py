"""Users register methods without touching wmbench: scenario plug-ins and package entry points."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from wmbench.errors import ConfigError
from wmbench.registry import METHODS, Registry
from wmbench.scenario import load_scenario

PLUGIN = '''
from dataclasses import dataclass

import torch

from wmbench.api import Detection, Key, Method
from wmbench.registry import METHODS


@METHODS.register("{name}")
@dataclass(frozen=True)
class SignOfFirstWeight(Method):
    """A toy method: its mark is the sign of the first weight."""

    sign: float = 1.0

    def keygen(self, model, data, rng):
        first = next(model.parameters())
        with torch.no_grad():
            first.view(-1)[0] = self.sign * first.view(-1)[0].abs()
        return Key(self.name, {{}}, {{"param": next(n for n, _ in model.named_parameters())}})

    def extract(self, model, key):
        return next(model.parameters()).view(-1)[:1]

    def detect(self, model, key):
        ok = float(torch.sign(self.extract(model, key))) == self.sign
        return Detection(stat=float(ok), pvalue=0.5 if ok else 1.0)

    def carriers(self, key):
        return {{key.meta["param"]: torch.tensor([0])}}
'''


def test_scenario_plugin_file_registers_a_method(tmp_path):
    (tmp_path / "my_method.py").write_text(PLUGIN.format(name="toy_sign"))
    (tmp_path / "s.yaml").write_text(
        textwrap.dedent(
            """
            name: plug
            plugins: [my_method.py]
            datasets: [synthetic]
            models: [small_cnn]
            methods: [{name: toy_sign, args: {sign: -1.0}}]
            """
        )
    )
    scenario = load_scenario(tmp_path / "s.yaml")
    assert scenario.methods[0].obj.sign == -1.0
    assert "toy_sign" in METHODS.names()


def test_plugin_module_by_name(tmp_path, monkeypatch):
    (tmp_path / "mod_plugin.py").write_text(PLUGIN.format(name="toy_by_module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "s.yaml").write_text("name: p\nplugins: [mod_plugin]\ndatasets: [synthetic]\nmodels: [small_cnn]\nmethods: [toy_by_module]\n")
    assert load_scenario(tmp_path / "s.yaml").methods[0].label == "toy_by_module"


def test_missing_plugin_is_a_clear_error(tmp_path):
    (tmp_path / "s.yaml").write_text("name: p\nplugins: [nowhere.py]\ndatasets: [synthetic]\nmodels: [small_cnn]\nmethods: [none]\n")
    with pytest.raises(ConfigError, match=r"s.yaml: plugins\[0\]: plug-in file not found"):
        load_scenario(tmp_path / "s.yaml")


def test_a_module_name_of_a_file_beside_the_scenario_says_to_name_the_file(tmp_path):
    """``plugins: [my_method]`` imports a module; the file my_method.py beside the scenario is not
    one (unless the working directory happens to be its folder): the error says to write my_method.py."""
    (tmp_path / "beside_file.py").write_text(PLUGIN.format(name="toy_beside_file"))
    (tmp_path / "s.yaml").write_text("name: p\nplugins: [beside_file]\ndatasets: [synthetic]\nmodels: [small_cnn]\nmethods: [toy_beside_file]\n")
    with pytest.raises(ConfigError) as err:
        load_scenario(tmp_path / "s.yaml")
    assert str(err.value).endswith(f"No module named 'beside_file' ({tmp_path / 'beside_file.py'} is a file: name it with its .py, 'beside_file.py', to load it)")
    (tmp_path / "s.yaml").write_text("name: p\nplugins: [elsewhere_module]\ndatasets: [synthetic]\nmodels: [small_cnn]\nmethods: [none]\n")
    with pytest.raises(ConfigError, match=r"No module named 'elsewhere_module'$"):  # no such file: no hint
        load_scenario(tmp_path / "s.yaml")


def test_entry_point_group_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "ep_plugin.py").write_text(PLUGIN.format(name="toy_entry_point"))
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[wmbench.methods]\ntoy = ep_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    fresh = Registry("method", "wmbench.methods", "wmbench.methods")  # METHODS has loaded its entry points already
    fresh.names()  # imports ep_plugin through the entry point; it registers into METHODS
    assert "ep_plugin" in sys.modules and "toy_entry_point" in METHODS.names()


def test_builtin_components_missing_from_a_source_tree_is_a_clear_error(tmp_path, monkeypatch):
    """Run from an uninstalled checkout, wmbench.methods does not exist (methods/ is installed
    under that name): a WmbenchError saying so, and the next call tries again. A built-in module
    that fails on a missing dependency of its own keeps that error."""
    from wmbench.errors import WmbenchError

    with pytest.raises(WmbenchError, match="pip install -e"):
        Registry("method", "wmbench.no_such_builtin_module", "wmbench.none").names()
    (tmp_path / "wm_broken_builtin.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = Registry("method", "wm_broken_builtin", "wmbench.none")
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
            broken.names()
