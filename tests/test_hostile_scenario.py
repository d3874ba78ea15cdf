"""Hostile scenario files: alias bombs (in the file or a --set value), huge values in messages,
names that break file systems or collide, control characters, YAML the parser cannot read; each
refused at load with one short ConfigError."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from wmbench.cli import main
from wmbench.errors import ConfigError
from wmbench.scenario import load_scenario

BASE = "datasets: [digits]\nmodels: [small_cnn]\nmethods: [none]\n"




def alias_bomb(levels: int, under: str) -> str:
    """A "billion laughs" document: 10**levels strings, under ``under``, in a few hundred bytes."""
    anchors = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        anchors.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    body = "[" + ", ".join(anchors) + "]"
    return f"name: bomb\n{BASE}{under}: {body}\n"


@pytest.mark.parametrize("under", ["description", "seeds", "plugins", "training"])
def test_alias_bomb_is_refused_with_a_short_line(tmp_path, capsys, under):
    (tmp_path / "s.yaml").write_text(alias_bomb(6, under))  # a million strings
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 300, err[:300]


def test_billion_laughs_under_a_memory_limit(tmp_path):
    """10**9 strings: refused before anything expands them, in a process limited to +1 GiB."""
    (tmp_path / "s.yaml").write_text(alias_bomb(9, "description"))
    code = textwrap.dedent(f"""
        import resource, sys
        from wmbench.cli import main
        from wmbench import scenario  # torch and friends loaded before the limit
        used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))
        sys.exit(main(['run', {str(tmp_path / 's.yaml')!r}, '--cache', {str(tmp_path / 'c')!r}, '--dry-run']))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-500:]
    assert done.stderr.count("\n") == 1 and "aliases" in done.stderr


@pytest.mark.parametrize("field, value", [("seeds", "[" + ", ".join(["x" * 5000] * 50) + "]"),
                                          ("models", "[{name: small_cnn, args: {width: [" + ", ".join(["9" * 4000] * 50) + "]}}]"),
                                          ("device", "[" + ", ".join(["y" * 5000] * 50) + "]")])
def test_messages_never_render_a_long_value(tmp_path, capsys, field, value):
    text = f"name: s\n{BASE}{field}: {value}\n".replace(f"{field}: [small_cnn]\n", "") if field == "models" else f"name: s\n{BASE}{field}: {value}\n"
    if field == "models":
        text = f"name: s\ndatasets: [digits]\nmethods: [none]\nmodels: {value}\n"
    (tmp_path / "s.yaml").write_text(text)
    assert main(["run", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400, err[:400]


def refused(tmp_path, where: str, text: str) -> ConfigError:
    """The ConfigError of a minimal scenario whose section named by ``where`` is ``text``."""
    doc = {"name": "name: ok", "datasets": "datasets: [digits]", "models": "models: [small_cnn]", "methods": "methods: [none]"}
    doc[where.split("[")[0].split(".")[0]] = text
    (tmp_path / "s.yaml").write_text("\n".join(doc.values()) + "\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(tmp_path / "s.yaml")
    return info.value


@pytest.mark.parametrize("where, text", [
    ("name", "name: " + "é" * 200),
    ("methods[0].label", "methods: [{name: none, label: " + "é" * 200 + "}]"),
    ("models[0].label", "models: [{name: small_cnn, label: " + "ü" * 100 + "}]"),
    ("name", 'name: "bad\\nname"'),
    ("name", 'name: "tab\\tname"'),
    ("methods[0].label", 'methods: [{name: none, label: "a\\rb"}]'),
    ("datasets[0].label", 'datasets: [{name: digits, label: "x\\u001b[31m"}]'),
    ("name", 'name: "right\\u202eto-left"'),  # a bidi override: a label reads other than it is
    ("attacks[0].label", 'attacks: [{name: noise, label: "a\\u202eb", strengths: [0.1]}]'),
    ("models[0].label", 'models: [{name: small_cnn, label: "a\\0b"}]'),
    ("methods[0].label", 'methods: [{name: none, label: "a\\nb"}]'),
    ("methods[0]", 'methods: ["none\\x1b"]'),
    ("name", "name: tiny.csv"),
    ("name", "name: tiny.MD"),
    ("name", "name: tiny.jsonl"),
    ("name", "name: .hidden"),
])
def test_names_and_labels_checked_at_load(tmp_path, where, text):
    error = refused(tmp_path, where, text)
    assert error.field == where and "\n" not in str(error) and len(str(error)) < 300


def test_a_long_ascii_label_within_the_byte_limit_loads(tmp_path):
    (tmp_path / "s.yaml").write_text("name: " + "n" * 100 + "\n" + BASE.replace("[none]", "[{name: none, label: " + "l" * 100 + "}]"))
    assert load_scenario(tmp_path / "s.yaml").methods[0].label == "l" * 100


@pytest.mark.parametrize("where, text", [
    ("methods[1].label", "methods: [none, {name: uchida, label: 'none '}]"),  # shows as a second 'none'
    ("methods[1].label", "methods: [none, {name: uchida, label: NONE}]"),
    ("methods[1].label", "methods: [uchida, {name: uchida, label: Uchida, args: {bits: 8}}]"),
    ("attacks[0].label", "attacks: [{name: noise, label: ' noise', strengths: [0.1]}]"),
    ("training", "training: []"),  # falsy but not a mapping: not the defaults
    ("training", "training: false"),
    ("detection", "detection: 0"),
    ("attacks", "attacks: false"),
    ("methods[0].args", "methods: [{name: uchida, args: false}]"),
    ("attacks[0].strengths", "attacks: [{name: noise, strengths: [0]}]"),  # the attack would never run
    ("attacks[0].strengths", "attacks: [{name: noise, strengths: [null, 0.0]}]"),
    ("attacks[0].strengths", "attacks: [{name: none, strengths: [1]}]"),  # rows repeating the clean ones
])
def test_entries_that_would_mislead_are_refused(tmp_path, where, text):
    error = refused(tmp_path, where, text)
    assert error.field.startswith(where), (error.field, str(error))


@pytest.mark.parametrize("where, text", [  # YAML "\uXXXX" escapes: the scenario file is ASCII
    ("methods[1].label", r'methods: [none, {name: uchida, label: "\uff4e\uff4f\uff4e\uff45"}]'),  # fullwidth none
    ("methods[1].label", r'methods: [none, {name: uchida, label: "\U0001d427\U0001d428\U0001d427\U0001d41e"}]'),  # bold
    ("methods[1].label", r'methods: [none, {name: uchida, label: "n\u043en\u0435"}]'),  # Cyrillic o and e
    ("methods[1].label", r'methods: [none, {name: uchida, label: "\u039d\u039f\u039d\u0395"}]'),  # Greek NONE
    ("methods[1].label", r'methods: [none, {name: uchida, label: "w\u0430termas"}]'),  # another method, Cyrillic a
    ("methods[1].label", r'methods: [none, {name: watermas, label: "\u04bAufunet"}]'),  # another method, Cyrillic capital shha
    ("attacks[0].label", r'attacks: [{name: noise, label: "\uff50rune", strengths: [0.1]}]'),  # fullwidth p
    ("methods[1].label", r'methods: [uchida, {name: uchida, label: "\uff55chida", args: {bits: 8}}]'),  # two alike
])
def test_look_alike_labels_are_refused(tmp_path, where, text):
    error = refused(tmp_path, where, text)
    assert error.field == where and ("reads as the name" in str(error) or "only in look-alike letters" in str(error)), str(error)


@pytest.mark.parametrize("label", ["watermas \u03c1=2", "\u03b1", "uchida-\u03c3", "\uff4d\uff59-uchida", "\u043d\u0435\u0442"])
def test_labels_in_other_scripts_that_name_nothing_load(tmp_path, label):
    (tmp_path / "s.yaml").write_text(f"name: ok\n{BASE.replace('[none]', '[none, {name: uchida, label: ' + repr(label) + '}]')}", encoding="utf-8")
    assert load_scenario(tmp_path / "s.yaml").methods[1].label == label


@pytest.mark.parametrize("text", ["training:", "training: null", "attacks: [{name: none, strengths: [0]}]", "attacks:", "attacks: []"])
def test_empty_sections_still_mean_the_defaults(tmp_path, text):
    (tmp_path / "s.yaml").write_text(f"name: ok\n{BASE}{text}\n")
    (tmp_path / "d.yaml").write_text(f"name: ok\n{BASE}")
    loaded, default = load_scenario(tmp_path / "s.yaml"), load_scenario(tmp_path / "d.yaml")
    assert loaded.training == default.training and [(a.label, a.strengths) for a in loaded.attacks] == [("none", (0.0,))]


def test_a_misspelled_attack_is_named_before_its_strengths_are_judged(tmp_path):
    (tmp_path / "s.yaml").write_text(f"name: ok\n{BASE}attacks: [{{name: finetuen, strengths: [0]}}]\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(tmp_path / "s.yaml")
    assert "finetune" in str(info.value) and "strength" not in info.value.field


ALIASED = """
name: aliased
datasets: [digits]
models: [small_cnn]
methods:
  - {name: watermas, label: wm-a, args: &a {n_carriers: 256, rho: 0.5}}
  - {name: watermas, label: wm-b, args: *a}
  - &m {name: tartaglione, label: tart-a, args: {n_carriers: 256}}
  - {<<: *m, label: tart-b}
attacks:
  - &n {name: noise, strengths: [0.3, 1.0]}
  - {<<: *n, label: noise2}
"""


@pytest.mark.parametrize("assignment,changed", [
    ("methods[1].args.n_carriers=512", ("methods", 1)),  # an alias: one mapping shared by both entries
    ("methods[3].args.n_carriers=512", ("methods", 3)),  # a merge key: the merged-in args are shared
    ("attacks[1].strengths[0]=0.5", ("attacks", 1)),  # the merged-in list
    ("methods[0].args.rho=0.25", ("methods", 0)),  # the anchor's own entry
])
def test_set_through_an_alias_changes_that_entry_only(tmp_path, assignment, changed):
    (tmp_path / "s.yaml").write_text(ALIASED)
    plain, edited = load_scenario(tmp_path / "s.yaml"), load_scenario(tmp_path / "s.yaml", [assignment])
    for section in ("methods", "attacks"):
        for i, (a, b) in enumerate(zip(getattr(plain, section), getattr(edited, section))):
            assert (a == b) is ((section, i) != changed), (section, i)


@pytest.mark.parametrize("device, command", [
    ("/dev/zero", "run"), ("/dev/urandom", "run"), ("large", "run"), *(("fifo", c) for c in ("run", "null", "curve", "embed")),
])
def test_a_scenario_without_end_is_refused_unread_or_read_bounded(tmp_path, device, command):
    """A scenario path that is a device without end (it was read whole: memory exhausted, then
    killed or a MemoryError traceback) or a FIFO (the open waited for a writer forever): refused as
    no regular file, unread; a regular file over 1 MiB: refused after 1 MiB. In a process limited
    to +1 GiB, with a timeout."""
    path = {"fifo": str(tmp_path / "s.yaml"), "large": str(tmp_path / "large.yaml")}.get(device, device)
    if device == "fifo":
        os.mkfifo(path)
    elif device == "large":
        with open(path, "wb") as fh:
            fh.truncate(2**20 + 1)
    extra = ["--out-model", str(tmp_path / "m"), "--out-key", str(tmp_path / "k")] if command == "embed" else []
    code = textwrap.dedent(f"""
        import resource, sys
        from wmbench.cli import main
        from wmbench import scenario  # torch and friends loaded before the limit
        used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))
        sys.exit(main([{command!r}, {path!r}, '--cache', {str(tmp_path / 'c')!r}, *{extra!r}]))
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} {device}: no answer in 60 s")
    assert done.returncode == 2, done.stderr[-500:]
    why = "larger than 1 MiB" if device == "large" else f"{path}: not a regular file"
    assert done.stderr.count("\n") == 1 and why in done.stderr, done.stderr


DEEP = "[" * 3000 + "]" * 3000  # deeper than the parser's recursion


@pytest.mark.parametrize("argv", [
    ["run", "{s}", "--dry-run", "--set", f"seeds={DEEP}"],
    ["run", "{s}", "--dry-run", "--set", "seeds=[" + "1" * 5000 + "]"],  # past Python's int() digit limit
    ["run", "{s}", "--dry-run", "--set", "description=!!timestamp 2024-13-45"],  # a date that does not exist
    ["run", "{s}", "--dry-run", "--set", "description=!!timestamp x"],  # PyYAML's constructor: AttributeError
    ["inspect", "small_cnn", "--dataset", "digits", "--arg", f"width={DEEP}"],
    ["inspect", "small_cnn", "--dataset", "digits", "--arg", "width=" + "1" * 5000],
])
def test_command_line_yaml_values_the_parser_cannot_read_are_one_line(tmp_path, capsys, argv):
    """A --set or --arg value read as YAML raised RecursionError, ValueError or AttributeError
    out of PyYAML (a traceback): now 'not valid YAML', exit 2."""
    (tmp_path / "s.yaml").write_text(f"name: s\n{BASE}")
    assert main([a.replace("{s}", str(tmp_path / "s.yaml")) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the value is not valid YAML" in err, err[-300:]


@pytest.mark.parametrize("text, why", [
    ("seeds: [" + "1" * 5000 + "]", "line 5: malformed YAML: an integer of more than 4300 digits"),
    ("description: !!timestamp x", "line 5: malformed YAML: not a YAML timestamp: 'x'"),
    ("description: !!timestamp 2024-13-45", "line 5: malformed YAML: not a date: '2024-13-45' (month must be in 1..12)"),
    (f"seeds: {DEEP}", "malformed YAML: nested too deeply"),
])
def test_scenario_values_the_parser_cannot_read_say_why(tmp_path, text, why):
    (tmp_path / "s.yaml").write_text(f"name: s\n{BASE}{text}\n")
    with pytest.raises(ConfigError, match=re.escape(why)):
        load_scenario(tmp_path / "s.yaml")


def test_a_plain_date_is_a_string_as_in_yaml_1_2(tmp_path, capsys):
    """YAML 1.2's core schema resolves no timestamp: ``description: 2024-05-01`` or a label
    ``2024-13-45`` is text (YAML 1.1's resolver made them dates, refused as 'got date')."""
    (tmp_path / "s.yaml").write_text(f"name: s\n{BASE}description: 2024-05-01\n")
    assert load_scenario(tmp_path / "s.yaml").description == "2024-05-01"
    assert main(["run", str(tmp_path / "s.yaml"), "--dry-run", "--set", "description=2024-13-45"]) == 0


@pytest.mark.parametrize("field", ["description", "seeds", "models[0].args"])
def test_an_alias_bomb_in_a_set_value_is_refused(tmp_path, capsys, field):
    """The size check ran on the file only: a bomb given with --set went on to validation, and
    under a field that takes any mapping (torchvision's ``options``) the run hung expanding it."""
    bomb = alias_bomb(6, "x").split("x: ", 1)[1].strip()  # a million strings
    (tmp_path / "s.yaml").write_text(f"name: s\n{BASE}")
    assert main(["run", str(tmp_path / "s.yaml"), "--dry-run", "--set", f"{field}={bomb}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--set '{field}=[" in err and "the value expands to more than 100000 values" in err, err[-300:]
