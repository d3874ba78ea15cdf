"""Crafted keys are validated against the suspect model before anything is allocated or read, and
`wmbench embed` refuses one path for both outputs before writing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from wmbench.api import Key
from wmbench.cli import main

# Bad input is plumbing: these tests check errors, not marks; `embed` draws a fresh seed, so a
# one-epoch model may end at chance in some runs (tests/conftest.py _learned).
pytestmark = pytest.mark.at_chance("plumbing: crafted keys and files are errors, not verdicts")

SCENARIO = """
name: keys
seeds: [0]
device: cpu
datasets: [{name: digits, args: {subset_train: 200}}]
models: [{name: small_cnn, args: {width: 4, hidden: 8}}]
methods: [{name: watermas, args: {n_carriers: 64}}]
training: {epochs: 1}
"""


@pytest.fixture(scope="module")
def owned(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    (root / "s.yaml").write_text(SCENARIO)
    assert main(["embed", str(root / "s.yaml"), "--out-model", str(root / "m.safetensors"), "--out-key", str(root / "k.key"),
                 "--cache", str(root / "c"), "-q"]) == 0
    return root


def crafted(owned, tmp_path, change) -> str:
    key = Key.load(owned / "k.key")
    change(key)
    key.save(tmp_path / "evil.key")
    return str(tmp_path / "evil.key")


def set_tensor(name, index, value):
    def change(key):
        key.tensors[name][index] = value
    return change


def set_meta(path, value):
    def change(key):
        node = key.meta
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return change


@pytest.mark.parametrize("change", [
    set_tensor("param_id", 0, -99),
    set_tensor("param_id", 3, 10_000),
    set_tensor("flat_idx", 0, -1),
    set_tensor("flat_idx", 5, 10**9),
    set_meta(["params", 0], "no.such.weight"),
    lambda key: (key.meta["params"].append("no.such.weight"), key.meta["shapes"].append([1])),
    set_meta(["shapes"], []),  # zipped with params: carriers read from uninitialised memory, a random verdict
    lambda key: key.meta["shapes"].pop(),
    set_meta(["shapes"], {}),
    lambda key: key.tensors.update(param_id=key.tensors["param_id"].bool()),  # read as ids 0 and 1: a verdict
    lambda key: key.tensors.update(param_id=key.tensors["param_id"][0]),  # 0-d: len() raised TypeError (a traceback)
    lambda key: key.tensors.update(flat_idx=key.tensors["flat_idx"][0]),
], ids=["param_id -99", "param_id too large", "flat_idx -1", "flat_idx too large", "unknown tensor",
        "unknown tensor without carriers", "no shapes", "a shape short", "shapes not a list", "param_id boolean",
        "param_id 0-d", "flat_idx 0-d"])
@pytest.mark.at_chance("plumbing: a crafted key is an error, not a verdict")
def test_crafted_key_positions_are_an_error_not_a_verdict(owned, tmp_path, capsys, change):
    key = crafted(owned, tmp_path, change)
    assert main(["detect", "--model", str(owned / "m.safetensors"), "--key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed key" in err, err


def test_a_key_declaring_a_huge_architecture_allocates_nothing(owned, tmp_path):
    """width 4096, hidden 65536: an 8.6 GB layer; refused from the suspect's shapes, in a process
    limited to +1 GiB of address space."""
    key = crafted(owned, tmp_path, set_meta(["model", "args"], {"width": 4096, "hidden": 65536}))
    code = textwrap.dedent(f"""
        import resource, sys
        from wmbench.cli import main
        import wmbench.ownership, wmbench.models, torchvision  # loaded before the limit
        used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))
        sys.exit(main(['detect', '--model', {str(owned / 'm.safetensors')!r}, '--key', {key!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-800:]
    assert "does not match the model" in done.stderr


def test_embed_refuses_one_path_for_model_and_key(owned, tmp_path, capsys):
    target = tmp_path / "both.safetensors"
    target.write_bytes(b"precious")
    for other in (str(target), str(tmp_path / "." / "both.safetensors")):
        assert main(["embed", str(owned / "s.yaml"), "--out-model", str(target), "--out-key", other,
                     "--cache", str(tmp_path / "c"), "--force", "-q"]) == 2
        assert "same file" in capsys.readouterr().err
    assert target.read_bytes() == b"precious" and not (tmp_path / "c").exists()


@pytest.mark.at_chance("plumbing: a crafted key is an error, not a verdict")
def test_a_key_cut_to_one_bit_is_malformed_not_a_detection(owned, tmp_path, capsys):
    """An Uchida key whose bits are cut to the first one broadcast it against every decoded bit
    (bit accuracy 78 of 1, p = 0, "detected" in any model); a NaN in a key read "not detected"."""
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("{name: watermas, args: {n_carriers: 64}}", "uchida"))
    assert main(["embed", str(tmp_path / "s.yaml"), "--out-model", str(tmp_path / "uchida.safetensors"),
                 "--out-key", str(tmp_path / "uchida.key"), "--cache", str(tmp_path / "c"), "-q"]) == 0
    key = Key.load(tmp_path / "uchida.key")
    key.tensors["bits"] = key.tensors["bits"][:1]
    key.save(tmp_path / "cut.key")
    capsys.readouterr()
    assert main(["detect", "--model", str(owned / "m.safetensors"), "--key", str(tmp_path / "cut.key")]) == 2  # a WaterMAS model
    assert "the key holds 1 bits, the model yields" in capsys.readouterr().err
    key = Key.load(tmp_path / "uchida.key")
    name = next(k for k, t in key.tensors.items() if t.is_floating_point())
    key.tensors[name][0] = float("nan")
    key.save(tmp_path / "nan.key")
    assert main(["detect", "--model", str(tmp_path / "uchida.safetensors"), "--key", str(tmp_path / "nan.key")]) == 2
    assert f"non-finite values in '{name}'" in capsys.readouterr().err


def test_embed_writes_only_regular_files_and_never_a_model_without_its_key(owned, tmp_path, capsys):
    base = ["embed", str(owned / "s.yaml"), "--cache", str(owned / "c"), "--force", "-q"]
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for model, key in ((tmp_path / "link", tmp_path / "k.key"), (tmp_path / "m.st", tmp_path / "missing" / "k.key"), (tmp_path / "m.st", tmp_path)):
        assert main([*base, "--out-model", str(model), "--out-key", str(key)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "m.st").exists()


@pytest.mark.parametrize("field, value", [
    ("num_classes", 10.7), ("num_classes", True), ("num_classes", "10"), ("num_classes", 0), ("in_channels", 1.0),
    ("image_size", [8, 8.5]), ("image_size", [8, False]),
])
def test_an_integer_of_the_data_record_that_is_no_integer_is_one_line(owned, tmp_path, capsys, field, value):
    """A key edited by hand whose data record says ``num_classes: 10.7`` was read as 10 (and "10"
    as 10, true as 1): the architecture rebuilt from a record no embed writes. Now exit 2, one line
    naming the field."""
    key = crafted(owned, tmp_path, set_meta(["data", field], value))
    assert main(["detect", "--model", str(owned / "m.safetensors"), "--key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed data record" in err and field in err, err


@pytest.mark.parametrize("out", ["afile/k.key", "afile/sub/k.key"])
def test_embed_into_a_path_below_a_file_says_the_file_is_not_a_directory(owned, tmp_path, capsys, out):
    """``--out-key afile/k`` said "afile: no such directory" where afile exists (a file): the message
    now names the file in the way, before any training."""
    (tmp_path / "afile").write_text("x")
    assert main(["embed", str(owned / "s.yaml"), "--out-model", str(tmp_path / "m.st"), "--out-key", str(tmp_path / out),
                 "--cache", str(tmp_path / "c"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'afile'} is not a directory" in err and "no such directory" not in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.st").exists()
    assert main(["embed", str(owned / "s.yaml"), "--out-model", str(tmp_path / "m.st"), "--out-key", str(tmp_path / "none" / "k.key"),
                 "--cache", str(tmp_path / "c"), "-q"]) == 2
    assert f"{tmp_path / 'none'}: no such directory" in capsys.readouterr().err  # a missing folder still says so


@pytest.mark.parametrize("field, value", [("args", [1]), ("args", "abc"), ("detect", [1]), ("detect", "align")])
def test_a_method_record_that_is_not_a_mapping_is_one_line(owned, tmp_path, capsys, field, value):
    """A key edited by hand whose method ``args`` or ``detect`` is a list or text: exit 2, one line
    naming the key (it was a TypeError traceback)."""
    key = crafted(owned, tmp_path, set_meta(["method", field], value))
    assert main(["detect", "--model", str(owned / "m.safetensors"), "--key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed key" in err and f"{field} is" in err, err


@pytest.mark.parametrize("which", ["/dev/zero", "/dev/urandom", "fifo"])
def test_a_key_or_model_path_that_is_no_regular_file_is_refused_unread(owned, tmp_path, which):
    """--key /dev/zero was read whole (memory exhausted), a FIFO or /dev/urandom waited forever;
    now one line and exit 2 (run with a memory limit and a timeout, so the old behaviour fails)."""
    import os

    path = str(tmp_path / "fifo") if which == "fifo" else which
    if which == "fifo":
        os.mkfifo(path)
    model = str(owned / "m.safetensors")
    for args, what in ((["--model", model, "--key", path], "--key"), (["--model", path, "--key", str(owned / "k.key")], "--model")):
        code = textwrap.dedent(f"""
            import resource, sys
            from wmbench.cli import main
            import wmbench.ownership  # torch and friends loaded before the limit
            used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))
            sys.exit(main(['detect', *{args!r}]))
        """)
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what} {which}: no answer in 60 s")
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (what, done.stderr[-500:])
        assert "not a regular file" in done.stderr, done.stderr
