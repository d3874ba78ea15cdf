"""`wmbench embed` with a method plug-in that raises while training (its own bug): the grid records
such an error in the cell's `failure` column and exits 3; embed printed a full traceback. It now
prints one line naming the cell and the error, writes nothing, and exits 3 as the grid does."""

from __future__ import annotations

from conftest import plugin_scenario

from wmbench.cli import main

BUGGY = '''
from dataclasses import dataclass

from wmbench.methods.uchida import Uchida
from wmbench.registry import METHODS


@METHODS.register("buggy_finalize")
@dataclass(frozen=True)
class BuggyFinalize(Uchida):
    """A plug-in whose finalize_key looks up a key entry that is not there."""

    def finalize_key(self, model, key):
        return key.meta["no_such_entry"]
'''


def test_embed_with_a_plugin_raising_in_training_is_one_line_and_exit_3(tmp_path, capsys):
    plugin = tmp_path / "buggy.py"
    plugin.write_text(BUGGY)
    path = plugin_scenario(tmp_path, plugin, "buggy_finalize", epochs=1)
    files = ["--out-model", str(tmp_path / "m.safetensors"), "--out-key", str(tmp_path / "m.key")]
    capsys.readouterr()
    code = main(["embed", str(path), "--cache", str(tmp_path / "c"), "-q", "--reproducible-seed", "0", *files])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "small_cnn/digits/buggy_finalize/seed 0" in err and "training: KeyError: 'no_such_entry'" in err, err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.key").exists()
