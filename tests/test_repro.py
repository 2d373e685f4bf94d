"""`gpctl repro --ci` end to end: queue, worker, fork, control requests, TV, figures, report.

It checks the claims that hold at this size together with their negative controls, with the
thresholds of docs/REPRODUCTION.md (gpctl.repro.THRESHOLDS), and that every verdict follows the one
rule (holds / not shown / does not hold). The raise and the TV claims do not show at this size: at
600 steps the noisy runs' curves are too short, and the never-dropped run passes the TV-close
threshold too (its control). The drop's snap is checked by its numbers (near the threshold here) and
its control (far from it). TV is measured level by level from loss-level checkpoints, >= 10 levels
each. About 5 minutes on 2 cores.
"""
import json
import subprocess
import sys

import pytest

from gpctl.repro import THRESHOLDS

pytestmark = pytest.mark.slow

HOLD_AT_CI_SIZE = (   # with a wide margin: the drop's snap (0.237 against 0.25 here) is too close to assert
    "1. online, batch 512 vs 32, equal steps",
    "determinism (not a claim of the paper): live drop = scheduled drop",
)


def test_repro_ci_reproduces_the_claims_that_hold_at_its_size_with_their_controls(tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "gpctl", "--home", str(home), "repro", "--ci", "--cpu-slots", "2",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    report = json.loads((out / "repro.json").read_text())
    assert report["thresholds"] == THRESHOLDS
    claims = {c["name"]: c for c in report["claims"]}
    assert len(claims) == 6
    assert res.returncode == (1 if any(c["verdict"] is False for c in claims.values()) else 0), res.stdout + res.stderr
    for name in HOLD_AT_CI_SIZE:   # the check passes and its negative control fails
        c = claims[name]
        assert (c["passed"], c["control_passed"], c["label"], c["verdict"]) == (True, False, "holds", True), \
            json.dumps(c, indent=1)
    for c in claims.values():      # every claim carries a control with its own numbers, and one rule labels it
        assert c["control"] and c["control_measured"] and c["control_passed"] in (True, False)
        want = ("not shown" if not c["enough"] or (c["passed"] and c["control_passed"])
                else "holds" if c["passed"] else "does not hold")
        assert c["label"] == want and c["verdict"] == {"holds": True, "does not hold": False}.get(want)
    live = claims["determinism (not a claim of the paper): live drop = scheduled drop"]
    assert live["measured"]["ack step"] == 200 and live["measured"]["ack"] == "applied"
    assert live["measured"]["steps compared"] == 400
    assert live["measured"]["max abs loss difference"] <= THRESHOLDS["live_equal"]
    assert live["control_measured"]["max abs loss difference"] > 100 * THRESHOLDS["live_equal"]
    snap = claims["2. drop at T0 (scheduled): a right-translation of the low-noise curve"]
    assert snap["measured"]["residual / gap"] < 0.5 < 2 < snap["control_measured"]["residual / gap"]
    assert snap["control_passed"] is False
    # TV (rule 3): level by level against the seed baseline at the same levels; each claim's control
    # is the other claim's measurement; at CI size neither holds (the never-dropped run also passes <= 1.3)
    close = claims["3. TV at matched loss: dropped vs low noise, against two low-noise seeds"]
    apart = claims["3. TV at matched loss: high noise vs low noise, against two low-noise seeds"]
    assert close["control_measured"]["ratio"] == apart["measured"]["ratio"]
    assert apart["control_measured"]["ratio"] == close["measured"]["ratio"]
    assert close["measured"]["levels"] >= THRESHOLDS["tv_min_levels"] <= apart["measured"]["levels"]
    assert close["measured"]["ratio"] == pytest.approx(close["measured"]["TV(dropped, low)"]
                                                       / close["measured"]["baseline at the same levels"])
    lo, hi = map(float, close["measured"]["level range"].split("–"))
    assert lo < hi
    assert close["verdict"] is not True and apart["verdict"] is not True
    assert set(report["runs"]) == {"low", "low_seed2", "high", "high_drop", "high_live", "low_raise", "high_s2",
                                   "high_s3", "high_drop_s2", "high_drop_s3"}
    assert snap["measured"]["seeds"] == 3
    text = (out / "REPRODUCTION.md").read_text()
    assert "| 1. online, batch 512 vs 32, equal steps |" in text and "fails (good) | **holds** |" in text
    for fig in ("repro_fig3_batch.png", "repro_fig4_drop.png", "repro_fig5_raise.png", "repro_fig7_tv.png"):
        assert (out / fig).stat().st_size > 10_000 and f"]({fig})" in text
