"""Random scenario documents and texts: the loader returns a scenario or raises ConfigError, never
anything else (a crash would be a traceback for the user)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wmbench.errors import ConfigError
from wmbench.grid import expand
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS, Registry
from wmbench.scenario import TOP_LEVEL, Resources, apply_override, load_scenario, parse_scenario
from wmbench.train import TrainingConfig

HERE = Path(__file__).parent
scalars = st.none() | st.booleans() | st.integers(-(2**1100), 2**1100) | st.integers(-3, 300) | st.floats() | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] + ["bogus"]


def args_of(cls: type) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(fields(cls)), scalars | st.lists(st.integers(-2, 20), max_size=3), max_size=3)


def entries(registry: Registry, extra: dict | None = None) -> st.SearchStrategy:
    """Lists of entries written as bare names or {name, args, label}, mostly well-formed."""
    def entry(name: str) -> st.SearchStrategy:
        args = args_of(registry.get(name)) if name in registry.names() else values
        return st.just(name) | st.fixed_dictionaries(
            {"name": st.just(name)}, optional={"args": args, "label": st.text(max_size=4), **(extra or {})}
        )
    return st.lists(st.sampled_from([*registry.names(), "typo"]).flatmap(entry), min_size=1, max_size=3)


valid_ish = {
    "name": st.just("fuzz"),
    "description": st.text(max_size=10),
    "seeds": st.lists(st.integers(-1, 2**64), min_size=1, max_size=2),
    "device": st.sampled_from(["cpu", "auto", "cuda:x"]),
    "plugins": st.sampled_from([[]] * 8 + [["wmbench_no_such_plugin"], ["missing.py"], [3], "x"]),  # never import random names
    "resources": st.dictionaries(st.sampled_from(fields(Resources)), scalars, max_size=2),
    "datasets": entries(DATASETS),
    "models": entries(MODELS),
    "methods": entries(METHODS),
    "training": st.dictionaries(st.sampled_from(fields(TrainingConfig)), scalars | st.lists(st.integers(-2, 20), max_size=3), max_size=3),
    "attacks": entries(ATTACKS, {"strengths": st.lists(scalars | st.floats(-1, 40) | st.sampled_from([0, 1, 2, 8, 0.5]), min_size=1, max_size=3) | values}),
    "detection": st.dictionaries(st.just("threshold"), scalars | st.floats(0, 1), max_size=1),
}
documents = st.builds(
    lambda doc, dropped, noise: {**{k: v for k, v in doc.items() if k not in dropped}, **noise},
    st.fixed_dictionaries(valid_ish),
    st.sets(st.sampled_from(TOP_LEVEL), max_size=2),
    st.dictionaries(st.sampled_from([k for k in TOP_LEVEL if k != "plugins"] + ["junk"]), values, max_size=1),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents_load_or_raise_config_error(doc):
    try:
        scenario = parse_scenario(doc, HERE)
    except ConfigError:
        return
    assert expand(scenario)  # a scenario that loads also plans


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | values.map(yaml.safe_dump) | documents.map(yaml.safe_dump))
def test_random_texts_load_or_raise_config_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_scenario(path)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(documents, st.text(max_size=30) | st.sampled_from(["training.epochs=", "attacks[0].strengths=", "seeds.0=", "methods[9].x="]).flatmap(
    lambda k: st.text(max_size=10).map(lambda v: k + v)))
def test_random_overrides_apply_or_raise_config_error(doc, assignment):
    try:
        parse_scenario(apply_override(doc, assignment), HERE)
    except ConfigError:
        pass
