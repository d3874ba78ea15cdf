"""What a researcher meets on day one: plug-ins that cannot go stale, `--plugin` where a plug-in is
needed, whole descriptions, results/ as the default output, one way to write a field's path,
quiet runs, and a dry run that checks dataset paths."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from conftest import TINY_SCENARIO
from tqdm.auto import tqdm

from wmbench.api import Key
from wmbench.cli import main, parser, quiet_bars
from wmbench.grid import expand, identity
from wmbench.scenario import load_scenario

ROOT = Path(__file__).parents[1]
PLUGIN = '''
from dataclasses import dataclass

from wmbench.methods.none import NoWatermark
from wmbench.registry import METHODS


@METHODS.register("{name}")
@dataclass(frozen=True)
class Edited(NoWatermark):
    """A plug-in method whose code its author edits.

    Second paragraph: wmbench list prints this too."""

    def finalize_key(self, model, key):
        return key  # {comment}
'''


def test_editing_a_plugin_invalidates_its_cells_only(tmp_path):
    plugin = tmp_path / "edited.py"
    plugin.write_text(PLUGIN.format(name="edited_plugin", comment="v1"))
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""
        name: stale
        plugins: [edited.py]
        datasets: [digits]
        models: [small_cnn]
        methods: [watermas, edited_plugin]
        attacks: [{name: noise, strengths: [1.0]}]
    """))
    before = {c.method.label: c for c in expand(load_scenario(tmp_path / "s.yaml"))}
    plugin.write_text(PLUGIN.format(name="edited_plugin", comment="v2, a bug fixed"))  # same version, new code
    os.utime(plugin, ns=(1, 1))
    after = {c.method.label: c for c in expand(load_scenario(tmp_path / "s.yaml"))}
    assert after["edited_plugin"].train_id != before["edited_plugin"].train_id
    assert after["watermas"].train_id == before["watermas"].train_id  # built-ins keep their version
    assert "code" in identity(after["edited_plugin"].method.obj) and "code" not in identity(after["watermas"].method.obj)


def test_list_loads_plugins_and_prints_whole_descriptions(tmp_path, capsys):
    (tmp_path / "listed.py").write_text(PLUGIN.format(name="listed_plugin", comment=""))
    assert main(["list", "methods", "--plugin", str(tmp_path / "listed.py")]) == 0
    out = capsys.readouterr().out
    assert "listed_plugin" in out and "Second paragraph: wmbench list prints this too." in out
    # a built-in's description is whole too, not its first line
    assert main(["list", "attacks"]) == 0
    assert "physically removes the channels" in capsys.readouterr().out


def test_detect_of_a_plugin_key_says_to_pass_plugin(tmp_path, capsys):
    key = Key("gone", meta={"method": {"name": "a_plugin_method", "args": {}}, "model": {"name": "small_cnn"}, "data": {}})
    key.save(tmp_path / "k.key")
    assert main(["detect", "--model", str(tmp_path / "m.safetensors"), "--key", str(tmp_path / "k.key")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'a_plugin_method'" in err and "pass --plugin" in err


def test_run_writes_to_results_by_default_and_results_is_ignored():
    assert parser().parse_args(["run", "x.yaml"]).out == "results"
    assert "results/" in (ROOT / ".gitignore").read_text().splitlines()


def test_field_paths_are_written_one_way(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="paths"))
    run = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "--dry-run"]
    assert main([*run, "--set", "methods.9.args.rho=1"]) == 2
    err = capsys.readouterr().err
    assert "methods[9]" in err and "methods.9" not in err
    # a missing dataset root, found by --dry-run (before any work), named as the scenario writes it
    missing = ["--set", "datasets[0]={name: cifar10, args: {layout: imagefolder, root: /nonexistent/cifar}}"]
    assert main([*run, *missing]) == 2
    err = capsys.readouterr().err
    assert "datasets[0].args.root: no such directory: /nonexistent/cifar/train" in err
    assert not (tmp_path / "c" / "models").exists()


def test_quiet_silences_bars_wmbench_does_not_create():
    with quiet_bars(True):
        assert tqdm(range(2)).disable  # e.g. a library's bar inside an attack
    assert not tqdm(range(2), file=open(os.devnull, "w")).disable  # and only within the block


def test_quiet_run_prints_no_bar(tmp_path, capsys):
    (tmp_path / "barred.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from tqdm import tqdm
        from wmbench.api import Attack
        from wmbench.registry import ATTACKS

        @ATTACKS.register("barred")
        @dataclass(frozen=True)
        class Barred(Attack):
            """An attack whose library shows a progress bar."""

            def attack(self, model, strength, ctx):
                for _ in tqdm(range(3), desc="library bar"):
                    pass
    '''))
    text = TINY_SCENARIO.format(name="quiet").replace("methods: [none, {name: watermas, args: {n_carriers: 128}}]", "methods: [none]")
    text = text.replace("attacks: [{name: noise, strengths: [1.0]}]", "plugins: [barred.py]\nattacks: [{name: barred, strengths: [1.0]}]")
    (tmp_path / "s.yaml").write_text(text)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 0
    assert "library bar" not in capsys.readouterr().err

