"""Plug-in methods unlike the built-ins (a security researcher's probe, 2026-12-05): a mark in
BatchNorm's gamma and beta, and a multi-bit mark whose detector reports a bit-error rate (smaller:
more likely watermarked). Each attack and the null must treat them as they treat the built-ins, or
say why not."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
from conftest import plugin_scenario, run_scenario

NOVEL = '''
from dataclasses import dataclass

import torch
from torch import nn

from wmbench.api import Detection, Key, Method, keyed_tensor, plain_step
from wmbench.methods.fixed_embedding import FixedEmbedding
from wmbench.metrics import pearson_detection
from wmbench.registry import METHODS


@METHODS.register("bn_mark")
@dataclass(frozen=True)
class BNMark(Method):
    """A +-1 code in frozen BatchNorm entries: gamma 1 +- 0.5, beta +- 0.5; Pearson r."""

    n_carriers: int = 16
    statistic = "pearson_r"

    def keygen(self, model, data, rng):
        names = [f"{n}.{a}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for a in ("weight", "bias")]
        sizes = [dict(model.named_parameters())[n].numel() for n in names]
        chosen = torch.randperm(sum(sizes), generator=rng)[: self.n_carriers]
        offsets = torch.tensor([0, *sizes]).cumsum(0)
        pid = torch.searchsorted(offsets, chosen, right=True) - 1
        code = torch.randint(0, 2, (len(chosen),), generator=rng).float() * 2 - 1
        centre = torch.tensor([1.0 if names[i].endswith("weight") else 0.0 for i in pid])
        key = Key(self.name, {"param_id": pid, "flat_idx": chosen - offsets[pid], "code": code, "centre": centre},
                  {"params": names, "shapes": [[s] for s in sizes]})
        self.write(model, key)
        return key

    def bound(self, model, key):
        named = dict(model.named_parameters())
        for i, (name, shape) in enumerate(zip(key.meta["params"], key.meta["shapes"])):
            sel = key.tensors["param_id"] == i
            if bool(sel.any()):
                yield keyed_tensor(named, name, shape), key.tensors["flat_idx"][sel], sel

    @torch.no_grad()
    def write(self, model, key):
        for p, idx, sel in self.bound(model, key):
            p[idx] = (key.tensors["centre"] + 0.5 * key.tensors["code"])[sel].to(p)

    def training_step(self, model, batch, loss_fn, optimizer, key):
        loss = plain_step(model, batch, loss_fn, optimizer)
        self.write(model, key)
        return loss

    def extract(self, model, key):
        out = torch.empty(len(key.tensors["code"]))
        for p, idx, sel in self.bound(model, key):
            out[sel] = p.detach()[idx].float().cpu()
        return out - key.tensors["centre"]

    def detect(self, model, key):
        return pearson_detection(self.extract(model, key), key.tensors["code"])

    def carriers(self, key):
        return {name: key.tensors["flat_idx"][key.tensors["param_id"] == i] for i, name in enumerate(key.meta["params"])
                if bool((key.tensors["param_id"] == i).any())}


@METHODS.register("ber_as_accuracy")
@dataclass(frozen=True)
class BERAsAccuracy(FixedEmbedding):
    """Fixed embedding's bits, its detector reporting the bit-error rate under the bit_accuracy statistic."""

    def detect(self, model, key):
        d = super().detect(model, key)
        return Detection(1.0 - d.stat, d.pvalue, d.log10_pvalue)
'''


@pytest.fixture(scope="module")
def novel(tmp_path_factory):
    plugin = tmp_path_factory.mktemp("novel") / "novel.py"
    plugin.write_text(NOVEL)
    return plugin


def test_a_detector_reading_below_its_statistics_null_while_detected_fails_its_cell(tmp_path, novel):
    """A bit-error rate under ``statistic = "bit_accuracy"``: 0.0 with p = 1e-77 read "bit accuracy
    0.000, detected" in every row, and `wmbench null` placed its cutoffs the wrong way round."""
    path = plugin_scenario(tmp_path, novel, "ber_as_accuracy, fixed_embedding", name="ber")
    code, frame = run_scenario(path, tmp_path / "c")
    ber = frame[frame["method"] == "ber_as_accuracy"]
    assert ber["detected"].isna().all() and ber["failure"].str.contains(
        r"detect: ValueError: BERAsAccuracy.detect reports bit accuracy 0 with p-value \S+, below 0.5, the value of no watermark:.*larger must mean more likely watermarked").all(), ber["failure"].tolist()
    assert frame.loc[frame["method"] == "fixed_embedding", "failure"].isna().all()


def test_the_null_gives_no_empirical_tpr_for_a_statistic_that_falls_with_the_evidence():
    """A bit-error rate under ``statistic = ""`` (no declared direction to check): every row detected
    at the threshold read 0/2 at 1% FPR, the cutoff placed on the wrong tail (measured with a
    head-of-classifier BER plug-in on digits, 2 seeds, 40 keys per model)."""
    from wmbench.null import NullSample
    from wmbench.null_report import null_table

    null = NullSample(stats=[0.4 + 0.002 * i for i in range(100)], pvalues=[0.05 + 0.009 * i for i in range(100)])
    marked = [(0.0, 1e-39), (0.01, 1e-35)]
    key = ("small_cnn", "digits", "ber_mark", "clean", 0.0)
    row = null_table({key: null}, {key: marked}, "ber", 1e-6, "cpu", 1).iloc[0]
    assert row["tpr_threshold"] == 1.0
    assert pd.isna(row["tpr_fpr1"]) and pd.isna(row["cutoff_fpr1"]), row.to_dict()
    assert "the statistic falls as the evidence grows" in row["note"] and "needs >= 100 null draws" not in row["note"], row["note"]
    from wmbench.null_report import null_markdown

    table = null_table({key: null}, {key: marked}, "ber", 1e-6, "cpu", 1)
    assert "No TPR at an empirical FPR for ber_mark: the statistic falls as the evidence grows" in null_markdown(table, "ber", 100, [0, 1, 2])
    # a statistic that grows with the evidence keeps its cutoffs
    grows = NullSample(stats=[-s for s in null.stats], pvalues=null.pvalues)
    row = null_table({key: grows}, {key: [(-s, p) for s, p in marked]}, "ber", 1e-6, "cpu", 1).iloc[0]
    assert row["tpr_fpr1"] == 1.0 and "falls" not in row["note"]


def test_an_attack_that_leaves_every_carrier_unchanged_says_so(tmp_path, novel):
    """noise, prune and quantize change Conv/Linear weights only: a mark in BatchNorm read r = 1.00
    after noise 1.0 at 89% error, a survival the row did not explain."""
    attacks = "{name: noise, strengths: [1.0]}, {name: quantize, strengths: [2]}, {name: key_leak, strengths: [1.0]}"
    path = plugin_scenario(tmp_path, novel, "bn_mark, watermas", attacks, name="untouched")
    code, frame = run_scenario(path, tmp_path / "c")
    attacked = frame[frame["strength"] > 0].set_index(["method", "attack"])["detect_note"].fillna("")
    for attack in ("noise", "quantize"):
        assert f"{attack} left all 16 of the key's carriers unchanged" in attacked["bn_mark", attack], attacked["bn_mark", attack]
        assert "carriers unchanged" not in attacked["watermas", attack]
    assert "carriers unchanged" not in attacked["bn_mark", "key_leak"]


def test_the_untouched_note_tells_other_entries_of_the_carriers_tensors_from_other_tensors():
    """Large carriers that magnitude pruning passes over sit in tensors it did change: the note says
    so rather than that the mark lies outside them."""
    import torch
    from torch import nn

    from wmbench.carrier_change import untouched_carriers_note

    trained = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    carriers = {"0.weight": torch.tensor([0, 5]), "1.weight": torch.tensor([1])}
    attacked = copy.deepcopy(trained)
    with torch.no_grad():
        attacked[0].weight.view(-1)[3] = 0.0  # not a carrier
    note = untouched_carriers_note("prune", carriers, trained, attacked)
    assert note == "prune left all 3 of the key's carriers unchanged (it changed other entries of their tensors)"
    attacked = copy.deepcopy(trained)
    attacked[0].bias.data.zero_()  # another tensor only
    assert untouched_carriers_note("noise", carriers, trained, attacked).endswith("(the mark lies outside the tensors it changed)")
    attacked[0].weight.data.view(-1)[5] += 1.0  # a carrier
    assert untouched_carriers_note("noise", carriers, trained, attacked) is None


def test_the_untouched_note_counts_each_carrier_once():
    """A key may list a position twice (bits drawn with replacement): the note counted it twice,
    "left all 4 of the key's carriers" of a key with 3 distinct carriers."""
    import torch
    from torch import nn

    from wmbench.carrier_change import untouched_carriers_note

    trained = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    carriers = {"0.weight": torch.tensor([0, 5, 5]), "1.weight": torch.tensor([1])}
    attacked = copy.deepcopy(trained)
    attacked[0].bias.data.zero_()
    assert untouched_carriers_note("noise", carriers, trained, attacked).startswith("noise left all 3 of the key's carriers unchanged")


def test_the_owners_commands_refuse_a_verdict_whose_statistic_reads_against_it(tmp_path, novel, capsys):
    """``wmbench embed``'s check of its own model (``wmbench detect``'s code) read the same plug-in as
    "bit accuracy 0.000, detected" and wrote the files; it now prints the contract in one line,
    gives no verdict and leaves no file, as the grid fails the cell."""
    from wmbench.cli import main

    path = plugin_scenario(tmp_path, novel, "ber_as_accuracy", name="owned")
    files = ["--out-model", str(tmp_path / "m.safetensors"), "--out-key", str(tmp_path / "m.key")]
    capsys.readouterr()
    assert main(["embed", str(path), "--cache", str(tmp_path / "c"), "-q", "--reproducible-seed", "0", *files]) == 2
    err = capsys.readouterr().err
    assert "BERAsAccuracy.detect reports bit accuracy 0 " in err and "larger must mean more likely watermarked" in err, err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.key").exists()


@pytest.mark.parametrize("method", ["none", "uchida", "hufunet"])
def test_a_one_sided_detector_below_its_null_is_no_contract_breach_at_a_lax_threshold(method):
    """A one-sided test gives p >= 1/2 where its statistic reads below the null value; with a
    ``detection.threshold`` above 1/2 (the scenario allows up to 1) that is "detected", and the
    direction check failed a built-in's cell: ``none`` read r = -0.036, p = 0.874 at threshold 0.9
    (digits, small_cnn, seed 1). Only a p-value below 1/2 beside such a statistic breaks the contract."""
    from wmbench.api import Detection
    from wmbench.detection import direction_problem
    from wmbench.registry import METHODS
    from wmbench.statistic_kinds import STATISTICS

    obj = METHODS.build(method, {})
    below = STATISTICS[obj.statistic][1] - 0.03
    assert direction_problem(obj, Detection(below, 0.874), 0.9) is None
    assert direction_problem(obj, Detection(below, 0.45), 0.9) is not None  # a reversed statistic still fails
    assert direction_problem(obj, Detection(below, 1e-9), 1e-6) is not None
