"""Every numeric field of every component is range-checked at load from its own declaration
(``wmbench.api.bounded``): out-of-range values are one ConfigError naming the field, never a
traceback at run time."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from wmbench.api import Range
from wmbench.cli import main
from wmbench.errors import ConfigError
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS
from wmbench.scenario import DetectionConfig, Resources, parse_scenario
from wmbench.train import TrainingConfig

BASE = {"name": "r", "seeds": [0], "device": "cpu", "datasets": ["digits"], "models": ["small_cnn"], "methods": ["none"]}
SECTIONS = {"methods": METHODS, "attacks": ATTACKS, "models": MODELS, "datasets": DATASETS}
BLOCKS = {"training": TrainingConfig, "detection": DetectionConfig, "resources": Resources}


def numeric(hint) -> bool:
    args = typing.get_args(hint)
    return hint in (int, float) or any(numeric(a) for a in args)


def components():
    for section, registry in SECTIONS.items():
        for name in registry.names():
            yield section, name, registry.get(name)
    for block, cls in BLOCKS.items():
        yield block, None, cls


def numeric_fields():
    for section, name, cls in components():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and numeric(hints[f.name]):
                yield section, name, cls, f


def out_of_range(bounds: Range, is_int: bool) -> list:
    step = 1 if is_int else 1e-3
    values = []
    if bounds.ge is not None:
        values.append(int(bounds.ge) - 1 if is_int else bounds.ge - step)
    if bounds.gt is not None:
        values.append(int(bounds.gt) if is_int else bounds.gt)
    if bounds.le is not None:
        values.append(int(bounds.le) + 1 if is_int else bounds.le + step)
    if bounds.lt is not None:
        values.append(int(bounds.lt) if is_int else bounds.lt)
    if not is_int:
        values += [math.inf, -math.inf]
    return values


FIELDS = list(numeric_fields())


@pytest.mark.parametrize("section, name, cls, f", FIELDS, ids=[f"{s}.{n or ''}.{f.name}" for s, n, _, f in FIELDS])
def test_every_numeric_field_declares_its_range(section, name, cls, f):
    assert isinstance(f.metadata.get("range"), Range), f"{cls.__name__}.{f.name} has no bounded(...) declaration"


def document(section: str, name: str | None, field: str, value) -> dict:
    doc = {k: (list(v) if isinstance(v, list) else v) for k, v in BASE.items()}
    if name is None:
        doc[section] = {field: value}
    else:
        doc[section] = [{"name": name, "args": {field: value}, **({"strengths": [1]} if section == "attacks" else {})}]
    return doc


CASES = [
    (s, n, f.name, v)
    for s, n, cls, f in FIELDS if isinstance(f.metadata.get("range"), Range)
    for v in out_of_range(f.metadata["range"], typing.get_type_hints(cls)[f.name] is int or typing.get_args(typing.get_type_hints(cls)[f.name])[:1] == (int,))
]


@pytest.mark.parametrize("section, name, field, value", CASES, ids=[f"{s}.{n or ''}.{f}={v}" for s, n, f, v in CASES])
def test_out_of_range_values_are_refused_at_load(tmp_path, section, name, field, value):
    doc = document(section, name, field, [value] if field in ("milestones", "size") and section != "datasets" or (field == "size" and name == "cityscapes") else value)
    with pytest.raises(ConfigError) as info:
        parse_scenario(doc, tmp_path)
    assert info.value.field.endswith(f".{field}") or info.value.field == f"{section}.{field}", str(info.value)
    assert "\n" not in str(info.value)


ISSUE = [
    ("training.momentum=-1", "training.momentum"),
    ("training.weight_decay=-1", "training.weight_decay"),
    ("training.lr=.inf", "training.lr"),
    ("methods[0].args.rho=.inf", "methods[0].args.rho"),
    ("attacks[0]={name: finetune, strengths: [1], args: {batch_size: 0}}", "attacks[0].args.batch_size"),
    ("attacks[0]={name: finetune, strengths: [1], args: {lr: -1}}", "attacks[0].args.lr"),
    ("attacks[0]={name: quantize, strengths: [1024]}", "attacks[0].strengths[0]"),
    ("datasets[0]={name: digits, args: {test_fraction: 1.5}}", "datasets[0].args.test_fraction"),
    ("seeds=[0, 99999999999999999999999999999]", "seeds"),
    ("device=mps", "device"),
]


@pytest.mark.parametrize("override, field", ISSUE)
def test_the_issue_examples_fail_at_dry_run_with_one_line(tmp_path, capsys, override, field):
    (tmp_path / "s.yaml").write_text("name: s\ndevice: cpu\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [watermas]\n"
                                     "attacks: [{name: noise, strengths: [1]}]\n")
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--dry-run", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("device", ["mps", "meta", "xla", "cuda:-1", "cpu:0:0"])
def test_device_option_refused_before_any_work(tmp_path, capsys, device):
    (tmp_path / "s.yaml").write_text("name: s\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [none]\n")
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--device", device]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "c").exists()
