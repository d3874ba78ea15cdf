""".py plug-ins import the modules beside them (as ``python my_method.py`` would), editing such a
helper re-runs the cells of the components that use it and editing another file re-runs nothing,
and a helper named like a module Python would load instead (``random.py``) is refused, naming both."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import plugin_scenario, run_scenario
from wmbench.cli import main
from wmbench.errors import ConfigError
from wmbench.grid import expand, identity
from wmbench.registry import ATTACKS, METHODS
from wmbench.scenario import load_scenario

ATTACK = '''
from dataclasses import dataclass

import torch

from wmbench.api import Attack
from wmbench.registry import ATTACKS
from {helper} import FACTOR


@ATTACKS.register("{name}")
@dataclass(frozen=True)
class Counted(Attack):
    """Scales the first tensor by its helper's factor and logs each call."""

    def attack(self, model, strength, ctx):
        from {lazy} import log_call  # imported where it is used: still one of its helpers

        log_call()
        with torch.no_grad():
            next(model.parameters()).mul_(FACTOR)
        ctx.effect = 0.0
        return model
'''

PLAIN = '''
from dataclasses import dataclass

from wmbench.api import Attack
from wmbench.registry import ATTACKS


@ATTACKS.register("{name}")
@dataclass(frozen=True)
class Plain(Attack):
    """Imports nothing beside it."""

    def attack(self, model, strength, ctx):
        ctx.effect = 0.0
        return model
'''


@pytest.fixture(autouse=True)
def own_imports(monkeypatch, tmp_path):
    """The plug-in folders a test puts on the module search path, and the modules it imports from
    them, are gone after it (another test's helper of the same name is its own)."""
    monkeypatch.setattr(sys, "path", [*sys.path])
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def write_plugin(folder: Path, tag: str, log: Path) -> Path:
    """``folder/counted_<tag>.py`` (attack ``counted_<tag>``), its helpers ``factor_<tag>.py`` and
    package ``logs_<tag>/`` (imported in a function), and an unrelated ``notes_<tag>.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"factor_{tag}.py").write_text("FACTOR = 1.0\n")
    (folder / f"logs_{tag}").mkdir()
    (folder / f"logs_{tag}" / "__init__.py").write_text("from .writer import log_call\n")
    (folder / f"logs_{tag}" / "writer.py").write_text(f"def log_call():\n    with open({str(log)!r}, 'a') as fh:\n        fh.write('call\\n')\n")
    (folder / f"notes_{tag}.py").write_text("NOTE = 1\n")
    plugin = folder / f"counted_{tag}.py"
    plugin.write_text(ATTACK.format(name=f"counted_{tag}", helper=f"factor_{tag}", lazy=f"logs_{tag}"))
    return plugin


def edit(path: Path, text: str, stamp: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))  # a new mtime even within the file system's timestamp granularity


def test_a_plugin_imports_the_modules_beside_it_from_every_command(tmp_path, capsys):
    plugin = write_plugin(tmp_path / "plugins", "a", tmp_path / "calls.txt")
    scenario = load_scenario(plugin_scenario(tmp_path, plugin, "none", "{name: counted_a, strengths: [1.0]}"))
    assert scenario.attacks[0].attack.name == "counted_a"
    assert "counted_a" in ATTACKS.names()
    # the folder is the plug-in's, not the scenario's, nor the working directory
    assert main(["list", "attacks", "--plugin", str(plugin)]) == 0
    assert "counted_a" in capsys.readouterr().out


def test_list_loads_a_plugin_with_a_helper_from_another_working_directory(tmp_path, monkeypatch, capsys):
    write_plugin(tmp_path / "plugins", "b", tmp_path / "calls.txt")
    monkeypatch.chdir(tmp_path)
    assert main(["list", "attacks", "--plugin", "plugins/counted_b.py"]) == 0
    assert "counted_b" in capsys.readouterr().out


@pytest.mark.parametrize("on_path", [False, True], ids=["plugin-folder", "folder-already-on-path"])
def test_editing_a_helper_reruns_the_cells_that_use_it_and_nothing_else(tmp_path, monkeypatch, on_path):
    """Also where the folder was on the module search path already (``python -m wmbench`` run in
    it), where the import worked before helpers entered the ids and edits of them re-ran nothing."""
    folder = tmp_path / "plugins"
    tag = "c" if not on_path else "cp"
    plugin = write_plugin(folder, tag, tmp_path / "calls.txt")
    if on_path:
        monkeypatch.syspath_prepend(str(folder))
    (folder / f"plain_{tag}.py").write_text(PLAIN.format(name=f"plain_{tag}"))
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""
        name: helpers
        seeds: [0]
        plugins: [{plugin}, {folder / f"plain_{tag}.py"}]
        datasets: [digits]
        models: [small_cnn]
        methods: [none]
        attacks:
          - {{name: counted_{tag}, label: counted, strengths: [1.0]}}
          - {{name: plain_{tag}, label: plain, strengths: [1.0]}}
          - {{name: chain, label: chained, strengths: [1.0], args: {{attacks: [noise, counted_{tag}]}}}}
          - {{name: noise, strengths: [1.0]}}
    """))

    def ids() -> dict[str, str]:
        (cell,) = expand(load_scenario(path))
        return {a.label: a.cell_id for a in cell.attacks if a.strength == 1.0} | {"train": cell.train_id}

    first = ids()
    edit(folder / f"notes_{tag}.py", "NOTE = 2\n", 1)  # imported by nothing
    assert ids() == first
    edit(folder / f"factor_{tag}.py", "FACTOR = 0.5\n", 2)  # imported at the top of the plug-in
    second = ids()
    for label in ("counted", "chained"):
        assert second[label] != first[label], label
    for label in ("plain", "noise", "train"):
        assert second[label] == first[label], label
    edit(folder / f"logs_{tag}" / "writer.py", "def log_call():\n    pass\n", 3)  # inside a function, then through the package
    third = ids()
    assert third["counted"] != second["counted"] and third["plain"] == first["plain"]

    (cell,) = expand(load_scenario(path))
    counted = next(a.attack for a in cell.attacks if a.label == "counted")
    assert set(identity(counted)["imports"]) == {f"factor_{tag}", f"logs_{tag}", f"logs_{tag}.writer"}
    plain = next(a.attack for a in cell.attacks if a.label == "plain")
    assert "imports" not in identity(plain)  # a plug-in without helpers keeps the id it had


@pytest.mark.parametrize("on_path", [False, True], ids=["plugin-folder", "folder-already-on-path"])
def test_the_store_reruns_a_cell_whose_helper_was_edited(tmp_path, monkeypatch, on_path):
    log = tmp_path / "calls.txt"
    folder = tmp_path / "plugins"
    tag = "d" if not on_path else "dp"
    plugin = write_plugin(folder, tag, log)
    if on_path:
        monkeypatch.syspath_prepend(str(folder))
    path = plugin_scenario(tmp_path, plugin, "none", f"{{name: counted_{tag}, strengths: [1.0]}}", name="stale_helper")
    cache = tmp_path / "cache"
    assert run_scenario(path, cache)[0] == 0
    calls = len(log.read_text().splitlines())
    assert calls >= 1
    edit(folder / f"notes_{tag}.py", "NOTE = 2\n", 1)
    assert run_scenario(path, cache)[0] == 0
    assert len(log.read_text().splitlines()) == calls  # an unrelated file: every row served from the store
    edit(folder / f"factor_{tag}.py", "FACTOR = 0.5\n", 2)
    assert run_scenario(path, cache)[0] == 0
    assert len(log.read_text().splitlines()) == 2 * calls  # its helper: the cell ran again


def test_plugins_of_one_folder_import_each_other_in_either_order(tmp_path, monkeypatch):
    for order, tag in (("a, b", "e"), ("b, a", "f")):
        monkeypatch.setattr(sys, "path", [*sys.path])  # each folder is another run's
        folder = tmp_path / tag
        folder.mkdir()
        (folder / "base_helper.py").write_text("SIGN = -1.0\n")
        (folder / "a.py").write_text(textwrap.dedent(f"""
            from dataclasses import dataclass

            from base_helper import SIGN
            from wmbench.api import Attack
            from wmbench.registry import ATTACKS


            @ATTACKS.register("first_{tag}")
            @dataclass(frozen=True)
            class First(Attack):
                def attack(self, model, strength, ctx):
                    ctx.effect = SIGN
                    return model
        """))
        (folder / "b.py").write_text(textwrap.dedent(f"""
            from dataclasses import dataclass

            from a import First
            from wmbench.registry import ATTACKS


            @ATTACKS.register("second_{tag}")
            @dataclass(frozen=True)
            class Second(First):
                pass
        """))
        plugins = ", ".join(str(folder / f"{n.strip()}.py") for n in order.split(","))
        (folder / "s.yaml").write_text(
            f"name: both\nplugins: [{plugins}]\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [none]\n"
            f"attacks: [{{name: first_{tag}, strengths: [1.0]}}, {{name: second_{tag}, strengths: [1.0]}}]\n"
        )
        (cell,) = expand(load_scenario(folder / "s.yaml"))  # no "already registered": a.py ran once
        first, second = (next(a.attack for a in cell.attacks if a.label == n) for n in (f"first_{tag}", f"second_{tag}"))
        assert identity(first)["imports"] == {"base_helper": identity(second)["imports"]["base_helper"]}
        assert set(identity(second)["imports"]) == {"a", "base_helper"}  # editing a.py re-runs b's cells too
        for name in ("a", "base_helper"):
            del sys.modules[name]  # the other folder's modules of these names are another run's
        monkeypatch.undo()


@pytest.mark.parametrize("name", ["random", "yaml", "json"])
def test_a_helper_named_like_a_module_python_loads_instead_is_refused(tmp_path, name):
    folder = tmp_path / "plugins"
    plugin = write_plugin(folder, f"g{name}", tmp_path / "calls.txt")
    (folder / f"{name}.py").write_text("def helper():\n    return 1\n")
    path = plugin_scenario(tmp_path, plugin, "none", f"{{name: counted_g{name}, strengths: [1.0]}}")
    # beside the plug-in but imported by nothing: no harm
    assert load_scenario(path).attacks[0].attack.name == f"counted_g{name}"
    (folder / f"factor_g{name}.py").write_text(f"from {name} import helper\nFACTOR = 1.0\n")
    del sys.modules[next(n for n, m in sys.modules.items() if getattr(m, "__file__", "") == str(plugin))]
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    message = str(err.value)
    assert f"imports {name} (through {folder / f'factor_g{name}.py'})" in message
    assert str(folder / f"{name}.py") in message and f"rename {name}.py" in message
    assert ("standard-library" if name != "yaml" else "installed") in message


def test_two_folders_with_a_helper_of_one_name(tmp_path):
    """The second plug-in's helper.py would silently be the first's (one module per name): refused."""
    plugins = []
    for tag in ("h", "i"):
        folder = tmp_path / tag
        folder.mkdir()
        (folder / "shared_name.py").write_text(f"FACTOR = {1.0 if tag == 'h' else 2.0}\n")
        (folder / f"m_{tag}.py").write_text(ATTACK.format(name=f"twin_{tag}", helper="shared_name", lazy="shared_name").replace(
            "from shared_name import log_call", "log_call = print"))
        plugins.append(folder / f"m_{tag}.py")
    load_scenario(plugin_scenario(tmp_path, plugins[0], "none", "{name: twin_h, strengths: [1.0]}", name="one"))
    with pytest.raises(ConfigError, match=r"imports shared_name: .*/i/shared_name.py is named so, but the name is taken by a module beside another plug-in, .*/h/shared_name.py"):
        load_scenario(plugin_scenario(tmp_path, plugins[1], "none", "{name: twin_i, strengths: [1.0]}", name="two"))


def test_methods_registry_sees_a_helper_defined_component(tmp_path):
    """A component defined in the helper (the plug-in only imports it) has the helper's code and
    the helper's own imports in its id."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "deep_j.py").write_text("CONSTANT = 1\n")
    (folder / "impl_j.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass

        from deep_j import CONSTANT
        from wmbench.methods.none import NoWatermark
        from wmbench.registry import METHODS


        @METHODS.register("helper_defined_j")
        @dataclass(frozen=True)
        class HelperDefined(NoWatermark):
            pass
    """))
    (folder / "entry_j.py").write_text("import impl_j\n")
    path = plugin_scenario(tmp_path, folder / "entry_j.py", "helper_defined_j")
    scenario = load_scenario(path)
    assert "helper_defined_j" in METHODS.names()
    assert identity(scenario.methods[0].obj)["imports"] == {"deep_j": identity(scenario.methods[0].obj)["imports"]["deep_j"]}
    before = expand(scenario)[0].train_id
    edit(folder / "deep_j.py", "CONSTANT = 2\n", 5)
    assert expand(load_scenario(path))[0].train_id != before
