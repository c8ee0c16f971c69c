"""The promotion gate's decision, on the metric or on its 95 % interval's cautious end."""

import pytest

from pcm.config import RegisterConfig
from pcm.registry import gate_decision

METRIC = "pcm-M4/k4/fid_teacher"


def _rule(**kw) -> RegisterConfig:
    return RegisterConfig(gate_metric=METRIC, gate_threshold=50.0, **kw)


def _metrics(value, low=None, high=None) -> dict:
    out = {METRIC: value}
    if low is not None:
        out |= {f"{METRIC}/ci_low": low, f"{METRIC}/ci_high": high}
    return out


def test_on_the_value_the_point_estimate_decides():
    assert gate_decision(_rule(), _metrics(40.0, 30.0, 60.0), None)[:2] == (
        True, f"{METRIC}=40 passes 50; first champion")
    assert not gate_decision(_rule(), _metrics(40.0), ("3", METRIC, 35.0))[0]  # worse than the champion's 35
    assert gate_decision(_rule(), _metrics(30.0), ("3", METRIC, 35.0))[0]


@pytest.mark.parametrize("direction,metrics,champion,promoted,reason", [
    ("lower", _metrics(40.0, 30.0, 60.0), None, False, "ci_high=60 misses the threshold 50"),
    ("lower", _metrics(40.0, 35.0, 45.0), None, True, "ci_high=45 passes 50; first champion"),
    ("lower", _metrics(30.0, 25.0, 38.0), ("2", METRIC, 36.0), False, "ci_high=38 is worse than champion v2 (36)"),
    ("lower", _metrics(30.0, 25.0, 34.0), ("2", METRIC, 36.0), True, "ci_high=34 passes 50 and beats v2"),
    ("higher", _metrics(70.0, 55.0, 80.0), ("2", METRIC, 60.0), False, "ci_low=55 is worse than champion v2 (60)"),
    ("higher", _metrics(70.0, 65.0, 80.0), ("2", METRIC, 60.0), True, "ci_low=65 passes 50 and beats v2"),
])
def test_on_the_interval_its_cautious_end_must_pass_and_beat_the_champion(direction, metrics, champion, promoted,
                                                                          reason):
    decided, why, value = gate_decision(_rule(gate_bound="ci", gate_direction=direction), metrics, champion)
    assert (decided, value) == (promoted, metrics[METRIC]) and reason in why


def test_on_the_interval_without_one_nothing_is_promoted_and_the_fix_is_named():
    decided, why, _ = gate_decision(_rule(gate_bound="ci"), _metrics(10.0), None)
    assert not decided and "eval.bootstrap_resamples > 0" in why and "register.gate_bound=value" in why
