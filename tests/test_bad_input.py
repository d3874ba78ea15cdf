"""Bad input: one clear line on stderr, exit code 2, no traceback, and nothing already written
(results, leaderboard, cache, model and key files) is damaged."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from conftest import TINY_SCENARIO

from wmbench.api import Key
from wmbench.cli import main

# Bad input is plumbing: these tests check errors, not marks; `embed` draws a fresh seed, so a
# one-epoch model may end at chance in some runs (tests/conftest.py _learned).
pytestmark = pytest.mark.at_chance("plumbing: bad input is one line and touches nothing")

GOOD = TINY_SCENARIO.format(name="good")


class Evil:
    """Unpickling this would create a file: proof that a pickle was (never) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A finished run of GOOD (cache + leaderboard) and an embedded model + key, once."""
    root = tmp_path_factory.mktemp("written")
    (root / "good.yaml").write_text(GOOD)
    assert main(["run", str(root / "good.yaml"), "--cache", str(root / "cache"), "--out", str(root / "lb"), "-q"]) == 0
    embed = ["embed", str(root / "good.yaml"), "--cache", str(root / "cache"), "-q"]
    assert main([*embed, "--out-model", str(root / "model.safetensors"), "--out-key", str(root / "key.safetensors")]) == 0
    wide = GOOD.replace("width: 8", "width: 12")
    (root / "wide.yaml").write_text(wide)
    assert main(["embed", str(root / "wide.yaml"), "--cache", str(root / "cache"), "-q",
                 "--out-model", str(root / "wide.safetensors"), "--out-key", str(root / "wide.key")]) == 0
    return root


def scenario(text: str):
    return lambda d: (d / "s.yaml").write_text(text) and None


def bad_file(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data) and None


def key_with(change):
    def make(d: Path) -> None:
        key = Key.load(d / "key.safetensors")
        change(key.meta)
        key.save(d / "bad.key")
    return make


RUN = ["run", "{d}/s.yaml", "--cache", "{d}/cache", "--out", "{d}/lb", "-q"]
DETECT = ["detect", "--model", "{d}/model.safetensors", "--key", "{d}/key.safetensors"]

CASES = {
    "malformed yaml": (scenario("name: good\nmethods: [none\n"), RUN, "malformed YAML"),
    "not a text file": (bad_file("s.yaml", b"\xff\xfe\x00bad"), RUN, "not a text file"),
    "no scenario file": (None, RUN, "cannot read scenario"),
    "unknown method": (scenario(GOOD.replace("watermas", "watremas")), RUN, "unknown method 'watremas' (did you mean: watermas)"),
    "unknown attack": (scenario(GOOD.replace("noise", "nosie")), RUN, "did you mean: noise"),
    # a name in another case is unknown (names are case-sensitive), never blamed on a label not written
    "method in other case": (scenario(GOOD.replace("name: watermas", "name: WaterMAS")), RUN, "methods[1]: unknown method 'WaterMAS' (did you mean: watermas)"),
    "attack in other case": (scenario(GOOD.replace("name: noise", "name: Noise")), RUN, "attacks[0]: unknown attack 'Noise' (did you mean: noise"),
    "unknown field": (scenario(GOOD.replace("epochs: 3", "epoch: 3")), RUN, "training.epoch: unknown field (did you mean: epochs, warmup_epochs)"),
    "misspelt name field": (scenario(GOOD.replace("{name: noise,", "{nmae: noise,")), RUN, "attacks[0].nmae: unknown field (did you mean: name"),
    "field in other case": (scenario(GOOD.replace("seeds:", "SEEDS:")), RUN, "SEEDS: unknown field (did you mean: seeds"),
    "wrong type": (scenario(GOOD.replace("epochs: 3", "epochs: one")), RUN, "training.epochs: expected int"),
    "negative epochs": (scenario(GOOD.replace("epochs: 3", "epochs: -3")), RUN, "training.epochs: expected at least 1 epoch, got -3"),
    "negative strength": (scenario(GOOD.replace("[1.0]", "[-1.0]")), RUN, "attacks[0].strengths[0]: expected a number >= 0"),
    "prune strength > 1": (scenario(GOOD.replace("noise", "prune").replace("[1.0]", "[1.5]")), RUN, "prune strength is a fraction in [0, 1]"),
    "quantize bits < 1": (scenario(GOOD.replace("noise", "quantize").replace("[1.0]", "[0.5]")), RUN, "an integer in [1, 32], got 0.5"),
    "uchida bits < 1": (scenario(GOOD.replace("{name: watermas, args: {n_carriers: 128}}", "{name: uchida, args: {bits: 0}}")), RUN, "bits: expected a number >= 1"),
    "seed out of range": (scenario(GOOD.replace("seeds: [0]", "seeds: [-1]")), RUN, "seeds[0]: expected an integer in [0, 2^53]"),
    "resources out of range": (scenario(GOOD + "resources: {num_gpus: -1}\n"), RUN, "num_gpus: expected a number >= 0"),
    "missing dataset path": (
        scenario(GOOD.replace("{name: digits, args: {subset_train: 400}}", "{name: cifar10, args: {root: /no/such/dir, layout: imagefolder}}")),
        RUN, "no such directory: /no/such/dir/train",
    ),
    "image that is not an image": (
        lambda d: ((d / "mark.png").write_text("not an image"), scenario(GOOD.replace("n_carriers: 128", f"n_carriers: 128, image: {d}/mark.png"))(d)) and None,
        RUN, "methods[1].args.image: not an image",
    ),
    "more carriers than weights": (scenario(GOOD.replace("n_carriers: 128", "n_carriers: 10000000")), RUN, "10000000 carriers requested but the model has only"),
    "address without ray": (scenario(GOOD), [*RUN, "--address", "x:1"], "--address applies to --executor ray only"),
    "truncated model file": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]), DETECT, "a truncated safetensors file"),
    "pickled model file": (lambda d: (d / "model.safetensors").write_bytes(pickle.dumps(Evil(d / "PWNED"))), DETECT, "never loads pickled checkpoints"),
    "corrupted key file": (lambda d: (d / "key.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"), DETECT, "not a wmbench key file"),
    "pickled key file": (lambda d: (d / "key.safetensors").write_bytes(pickle.dumps(Evil(d / "PWNED"))), DETECT, "not a wmbench key file"),
    "no such model file": (lambda d: (d / "model.safetensors").unlink(), DETECT, "no such model file"),
    "key of another architecture": (None, ["detect", "--model", "{d}/model.safetensors", "--key", "{d}/wide.key"], "key does not match the model: shape"),
    "key naming a module": (
        key_with(lambda m: m["model"].update(name="os.system")), ["detect", "--model", "{d}/model.safetensors", "--key", "{d}/bad.key"],
        "key.model: unknown model 'os.system'",
    ),
    "key without its model": (key_with(lambda m: m.pop("model")), ["detect", "--model", "{d}/model.safetensors", "--key", "{d}/bad.key"], "does not record its model"),
    "align unsupported": (
        key_with(lambda m: m["method"].update(name="uchida", args={}, detect={})),
        ["detect", "--model", "{d}/model.safetensors", "--key", "{d}/bad.key", "--align"], "--align: method uchida has no aligned detection",
    ),
    "threshold out of range": (None, [*DETECT, "--threshold", "2"], "--threshold must be in (0, 1)"),
    "embed over an existing key": (
        None, ["embed", "{d}/good.yaml", "--cache", "{d}/cache", "--out-model", "{d}/new.safetensors", "--out-key", "{d}/key.safetensors"],
        "key.safetensors exists",
    ),
    "embed unknown label": (
        None, ["embed", "{d}/good.yaml", "--cache", "{d}/cache", "--method", "watremas", "--out-model", "{d}/m2", "--out-key", "{d}/k2"],
        "--method: no entry labelled 'watremas' in the scenario (did you mean: watermas)",
    ),
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_damages_nothing(case, written, tmp_path, capsys):
    setup, argv, message = CASES[case]
    d = tmp_path / "w"
    shutil.copytree(written, d)
    if setup:
        setup(d)
    prepared = snapshot(d)
    capsys.readouterr()
    assert main([a.format(d=d) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wmbench: error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not (d / "PWNED").exists()
    after = snapshot(d)
    for name, content in prepared.items():
        if name.startswith("cache/results/"):
            assert after[name].startswith(content), name  # appended to at most
        else:
            assert after.get(name) == content, f"{name} changed"
