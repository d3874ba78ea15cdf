"""log10 p-values: finite where the p-value underflows to 0, exact where it does not; and the
result row records them with the torch thread count and device it was computed with."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from conftest import TINY_SCENARIO
from scipy import stats

from wmbench.api import Detection
from wmbench.devices import device_label
from wmbench.leaderboard import render_markdown
from wmbench.metrics import binomial_log10_sf, bit_detection, pearson_detection, pearson_log10_sf
from wmbench.report_html import render_html
from wmbench.runner import Runner
from wmbench.scenario import load_scenario

mpmath = pytest.importorskip("mpmath")


def reference_pearson_log10(r: float, n: int) -> float:
    """log10 P[R >= r] = log10(0.5 I_{1-r^2}((n-2)/2, 1/2)) in 50-digit arithmetic."""
    mpmath.mp.dps = 50
    x = 1 - mpmath.mpf(r) ** 2
    return float(mpmath.log10(mpmath.mpf("0.5") * mpmath.betainc((n - 2) / 2, 0.5, 0, x, regularized=True)))


@pytest.mark.parametrize("r, n", [(0.3, 100), (0.7, 1024), (0.95, 1024), (0.5, 16384), (0.999, 256)])
def test_pearson_log10_matches_high_precision(r: float, n: int) -> None:
    assert pearson_log10_sf(r, n) == pytest.approx(reference_pearson_log10(r, n), rel=1e-9)


def test_pearson_log10_finite_where_pvalue_underflows() -> None:
    g = torch.Generator().manual_seed(0)
    mark = torch.randn(1024, generator=g)
    near = pearson_detection(mark + 0.1 * torch.randn(1024, generator=g), mark)
    exact = pearson_detection(mark.clone(), mark)
    assert near.pvalue == 0.0 and exact.pvalue == 0.0  # float64 cannot hold them
    assert math.isfinite(near.log10_pvalue) and near.log10_pvalue < -300
    assert math.isfinite(exact.log10_pvalue) and exact.log10_pvalue < near.log10_pvalue  # still ranked
    weak = pearson_detection(mark + 3.0 * torch.randn(1024, generator=g), mark)
    assert 0 < weak.pvalue and weak.log10_pvalue == pytest.approx(math.log10(weak.pvalue), rel=1e-9)


def test_bit_log10_is_exact_where_pvalue_underflows() -> None:
    bits = torch.ones(4096, dtype=torch.bool)
    perfect = bit_detection(bits, bits)
    assert perfect.pvalue == 0.0 and perfect.log10_pvalue == pytest.approx(4096 * math.log10(0.5), rel=1e-12)
    assert binomial_log10_sf(700, 1024) == pytest.approx(math.log10(stats.binom.sf(699, 1024, 0.5)), rel=1e-9)
    assert binomial_log10_sf(0, 64) == 0.0


def test_detection_without_log10_computes_it() -> None:
    assert Detection(stat=0.9, pvalue=1e-3).log10_pvalue == pytest.approx(-3.0)
    assert Detection(stat=0.9, pvalue=0.0).log10_pvalue == -math.inf  # a plug-in that gives none
    with pytest.raises(ValueError, match="p-value"):  # a broken detector fails its cell (test_plugin_contract)
        Detection(stat=0.0, pvalue=math.nan)
    assert Detection(stat=0.9, pvalue=0.0, log10_pvalue=-500.0).log10_pvalue == -500.0


def test_result_rows_record_log10_p_threads_device_and_epochs(tmp_path) -> None:
    path = tmp_path / "logp.yaml"
    path.write_text(textwrap.dedent(TINY_SCENARIO.format(name="logp")))
    frame = Runner(load_scenario(path), tmp_path / "cache", progress=False).run()
    marked = frame[frame["method"] == "watermas"]
    assert marked["detect_log10_p"].map(math.isfinite).all()
    positive = frame[frame["detect_pvalue"] > 0]
    assert (positive["detect_log10_p"] - positive["detect_pvalue"].map(math.log10)).abs().max() < 1e-6
    assert (frame["torch_threads"] == torch.get_num_threads()).all() and (frame["device"] == device_label(torch.device("cpu"))).all()
    assert frame["device"].str.startswith("cpu").all()
    epochs = load_scenario(path).training.epochs  # what the models were trained for
    assert (frame["epochs"] == epochs).all()
    assert f"training epochs: {epochs}" in render_markdown(frame, "logp") and f"training epochs: {epochs}" in render_html(frame, "logp", [])


@pytest.mark.parametrize("method,args", [("hufunet", {}), ("fixed_embedding", {"bits": 1200, "spread": 1})])
def test_every_builtin_detector_gives_a_finite_log10_where_its_pvalue_underflows(method, args, digits, monkeypatch) -> None:
    """HufuNet (a z-score) and fixed_embedding (a binomial count) computed log10 p from the p-value,
    -inf once it underflowed: the leaderboard's log10 p column could not rank those rows."""
    from conftest import train_small

    from wmbench.registry import METHODS

    model, key = train_small(digits, method, epochs=1, **args)
    detector = METHODS.build(method, args)
    if method == "hufunet":  # a null of tiny spread: the z of a CIFAR model (45) and beyond
        null = detector.null_errors(model, key)
        monkeypatch.setattr(type(detector), "null_errors", lambda self, m, k: null.mean() + 1e-3 * (null - null.mean()))
    result = detector.detect(model, key)
    assert math.isfinite(result.log10_pvalue)
    if result.pvalue > 0:
        assert result.log10_pvalue == pytest.approx(math.log10(result.pvalue), rel=1e-6)
    else:
        assert result.log10_pvalue < -300


def test_pearson_p_value_and_its_log_agree_at_three_carriers():
    """At 3-4 carriers and r a few ulps from 1, the p-value (from 1 - r*r) and its log10 (from a
    precise 1 - r^2) differed by decades: Detection refused them and the cell failed."""
    from wmbench.metrics import pearson_detection

    for a in ([1.0, 2.0, 3 + 1e-9], [0.3, -1.2, 0.7 + 1e-8]):
        b = [round(v, 6) for v in a]
        d = pearson_detection(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        assert d.pvalue > 0 and abs(math.log10(d.pvalue) - d.log10_pvalue) < 1e-6, d


def test_z_score_pvalue_is_calibrated_with_a_few_null_draws():
    """Own and null drawn from one normal population: P[p < a] = a. The normal tail 1 - Phi(z),
    blind to the mean and std being estimated from the n draws, gave about 3x too many at n = 5."""
    from wmbench.metrics import z_detection

    g = torch.Generator().manual_seed(0)
    for n in (5, 200):
        draws = torch.randn(20000, n + 1, generator=g, dtype=torch.float64)
        p = torch.tensor([z_detection(float(d[0]), d[1:]).pvalue for d in draws])
        for a in (0.01, 0.05):
            assert abs(float((p < a).double().mean()) - a) < 4 * math.sqrt(a * (1 - a) / len(p)) + 0.002, (n, a)


def test_z_score_log10_p_is_the_predictive_t_tail_and_finite_far_out():
    from wmbench.metrics import z_detection

    null = torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for own in (0.5, 4.0, 12.0, 60.0, 1e7):
        d = z_detection(own, null)
        t = d.stat / math.sqrt(1 + 1 / 200)
        assert math.isfinite(d.log10_pvalue) and d.log10_pvalue <= 0
        if own < 100:
            assert d.log10_pvalue == pytest.approx(stats.t.logsf(t, 199) / math.log(10), rel=1e-9)
        assert d.pvalue == pytest.approx(10**d.log10_pvalue, rel=1e-6, abs=1e-300)


def test_z_detection_refuses_a_null_collapsed_to_rounding():
    """HufuNet after 1-bit quantization: the 200 null readings agreed to 11 digits (std 1.2e-12,
    39 distinct values), the own reading too (it differed in the 11th digit), and the z score of
    that rounding was 11, p = 1e-22, detected; where the null was one value to 12 digits and the
    own reading differed, z = 7e9. A null whose std is at most 1e-9 x its largest |reading|
    supports no z test: NotApplicable, the row unreadable, never detected."""
    from wmbench.errors import NotApplicable
    from wmbench.metrics import z_detection

    g = torch.Generator().manual_seed(0)
    rounding = 1.6031737414814 + 1.2e-12 * torch.randn(200, generator=g, dtype=torch.float64)
    one_value = torch.full((200,), -1.8627929839020, dtype=torch.float64)
    one_value[:5] += 1e-11  # 2 distinct values, the spread of float rounding
    for own, null in [(1.6031737414945, rounding), (-1.9840079773695, one_value), (0.5, torch.zeros(200, dtype=torch.float64)),
                      (3.0, torch.full((200,), 2.5, dtype=torch.float64)),
                      (1.0, 1e-12 * torch.randn(200, generator=g, dtype=torch.float64))]:  # collapsed near 0: own's magnitude counts
        with pytest.raises(NotApplicable, match=r"null readings collapsed: \d+ distinct values of 200.*no z test"):
            z_detection(own, null)


def test_z_detection_keeps_nulls_with_a_real_spread():
    """The rule leaves every null whose readings vary (by 1e-2..1e-1 of their magnitude in a
    healthy HufuNet detection, 3.7e-6 after 2-bit quantization, 200 distinct values) with the
    z score it had: (own - mean) / std."""
    from wmbench.metrics import z_detection

    g = torch.Generator().manual_seed(2)
    for mean, relative in [(-1.72, 0.13), (-1.8628, 3.7e-6), (1e-6, 0.5), (0.0, 1.0), (5e3, 1e-8)]:
        null = mean + relative * max(abs(mean), 1.0) * torch.randn(200, generator=g, dtype=torch.float64)
        own = mean + 10 * float(null.std())
        d = z_detection(own, null)
        assert d.stat == (own - float(null.mean())) / float(null.std())
        assert d.stat == pytest.approx(10.0, rel=0.1)


def test_a_detector_change_re_runs_attack_cells_not_trainings(tmp_path, monkeypatch):
    """``detect_version`` enters the attack cell ids only, and only past "1" (ids of unchanged
    detectors stay as stores hold them)."""
    from wmbench.grid import expand
    from wmbench.registry import METHODS

    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(TINY_SCENARIO.format(name="dv")).replace("methods: [none, ", "methods: [hufunet, "))

    def ids() -> dict[str, tuple[str, list[str]]]:
        return {c.method.obj.name: (c.train_id, [a.cell_id for a in c.attacks]) for c in expand(load_scenario(path))}

    hufunet = type(METHODS.build("hufunet"))
    assert hufunet.detect_version == "3"
    now = ids()
    monkeypatch.setattr(hufunet, "detect_version", "1")
    before = ids()
    assert now["hufunet"][0] == before["hufunet"][0]  # the training is kept
    assert not set(now["hufunet"][1]) & set(before["hufunet"][1])  # every attack cell re-runs
    assert now["watermas"] == before["watermas"]


def test_detection_compares_the_log10_p_with_the_p_value_in_log_space():
    """The allowance for a p-value computed as 1 - cdf was 1e-15 / p decades: below p = 1e-13 any
    log10 p <= 0 passed (a p-value of 1e-20, detected, beside a log10 p of -1, not), and a p-value of
    0 took any log10 p. Now they agree to 0.01 decades; to 1e-15 in absolute value only where the
    p-value can be a 1 - cdf (0, or 2^-54 and more); a subnormal p-value takes any log10 p below the
    normal range."""
    for p, log10_p in [(1e-20, -1.0), (1e-20, -16.0), (1e-100, -50.0), (1e-300, -200.0), (1e-14, -13.5), (0.0, -1.0), (0.0, -10.0), (1e-200, 0.0)]:
        with pytest.raises(ValueError, match="log10_pvalue"):
            Detection(0.9, p, log10_p)
    for p, log10_p in [
        (1e-20, -20.001), (1e-300, -300.0), (0.3, math.log10(0.3) + 0.009),
        (5e-320, math.log10(5e-320)), (5e-320, -330.0), (0.0, -400.0), (0.0, -math.inf),  # underflowed or subnormal
        (1e-16, -15.8), (2.220446049250313e-16, -20.0), (0.0, -17.0), (3.3306690738754696e-15, math.log10(3e-15)),  # 1 - cdf
    ]:
        assert Detection(0.9, p, log10_p).log10_pvalue == log10_p


def test_every_builtin_statistic_gives_a_consistent_log10_p():
    """Pearson r, bit counts and z scores over their whole range, into the far tail: Detection
    accepts what every built-in computation hands it (it raises otherwise)."""
    from wmbench.metrics import z_detection

    g = torch.Generator().manual_seed(0)
    for n in (3, 4, 10, 100, 1024, 16384):
        b = torch.randn(n, generator=g, dtype=torch.float64)
        e = torch.randn(n, generator=g, dtype=torch.float64)
        b, e = b - b.mean(), e - e.mean()
        e = e - (e @ b) / (b @ b) * b
        b, e = b / b.norm(), e / e.norm()
        for r in (-0.9, 0.0, 0.2, 0.5, 0.9, 0.99, 0.999, 1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1.0):
            pearson_detection(r * b + math.sqrt(max(0.0, 1 - r * r)) * e, b)
    for total in (16, 64, 256, 1200, 4096):
        bits = torch.zeros(total, dtype=torch.bool)
        for matches in sorted({0, 1, total // 2, total * 3 // 4, total * 9 // 10, total - 1, total}):
            decoded = bits.clone()
            decoded[matches:] = True
            bit_detection(decoded, bits)
    null = torch.randn(200, generator=g, dtype=torch.float64)
    for own in (-5.0, 0.0, 3.0, 7.0, 8.0, 9.0, 10.0, 20.0, 45.0, 1e3, 1e7):
        z_detection(own, null)
