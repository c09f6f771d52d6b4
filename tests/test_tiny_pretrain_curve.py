"""The shipped pretrained tiny model (assets/tiny_pretrained) is what its recorded recipe makes: its pretrain.json
holds PretrainSettings' defaults and the loss curves of the run that made it, and a short re-pretraining with those
settings (the whole VAE phase, whose lr schedule spans it, then the first flow-matching steps) follows the recorded
curves within a tolerance (never bit-exact: sums run in another order with another thread count)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from deepgen_rl.model.tiny import TinyDiTSize, build_tiny_deepgen
from deepgen_rl.model.tiny_pretrain import (CURVE_EVERY, PRETRAIN_RECORD, PretrainSettings, loss_curve,
                                            pretrain_tiny_deepgen)
from tests.conftest import SHIPPED_PRETRAINED

RECORD = json.loads((SHIPPED_PRETRAINED / PRETRAIN_RECORD).read_text())
# Flow-matching steps re-run: the loss falls from ~4.9 to ~0.6 over them, so a wrong VAE, seed, lr or data
# order shows in the first points already.
SHORT_STEPS = 100
# Largest relative deviation allowed per curve point (a mean over CURVE_EVERY steps). Measured between the shipped
# record (made with 1 thread) and a re-run of this test with 2 threads: 9.1e-4 on the VAE curve, 2.7e-4 on the
# flow-matching one (with 1 thread: 0, the same sums in the same order); a rerun with another seed or lr moves
# the first points by far more (the loss falls 2.63 -> 1.44 over the first 30 steps).
CURVE_RTOL = 0.02


def curve_deviation(recorded: list[float], rerun: list[float]) -> float:
    """max_i |rerun_i - recorded_i| / |recorded_i| over the rerun's points; inf when the rerun is longer."""
    if len(rerun) > len(recorded) or not rerun:
        return float("inf")
    a, b = np.asarray(recorded[:len(rerun)], dtype=np.float64), np.asarray(rerun, dtype=np.float64)
    return float(np.max(np.abs(b - a) / np.abs(a)))


def test_shipped_record_holds_the_default_recipe_and_its_curves():
    assert RECORD["settings"] == asdict(PretrainSettings()) and RECORD["model_seed"] == 0
    curves = RECORD["loss_curve"]
    assert curves["every"] == CURVE_EVERY
    assert len(curves["vae"]) == -(-PretrainSettings.vae_steps // CURVE_EVERY)
    assert len(curves["flow_matching"]) == -(-PretrainSettings.steps // CURVE_EVERY)
    # The losses the record states at the end are the curves' ends (flow: mean of the last 50 steps).
    assert np.mean(curves["flow_matching"][-50 // CURVE_EVERY:]) == pytest.approx(RECORD["flow_matching_loss"],
                                                                                    rel=1e-4)
    assert curves["flow_matching"][-1] < 0.1 * curves["flow_matching"][0]  # it learnt


@pytest.mark.timeout(1800)  # ~45 s on an idle 2-core machine; >15 min measured under heavy load
def test_short_repretraining_follows_the_recorded_loss_curve():
    settings = replace(PretrainSettings(**RECORD["settings"]), steps=SHORT_STEPS)
    model = build_tiny_deepgen(RECORD["model_seed"], TinyDiTSize(settings.dit_layers, settings.dit_heads,
                                                                 settings.dit_head_dim))
    rerun = pretrain_tiny_deepgen(model, settings)["loss_curve"]
    recorded = RECORD["loss_curve"]
    assert len(rerun["vae"]) == len(recorded["vae"])
    assert len(rerun["flow_matching"]) == SHORT_STEPS // CURVE_EVERY
    deviations = {name: curve_deviation(recorded[name], rerun[name]) for name in ("vae", "flow_matching")}
    print("largest relative deviation from the recorded curves:", deviations)
    assert all(d <= CURVE_RTOL for d in deviations.values()), (deviations, rerun, recorded)


def test_curve_deviation_and_loss_curve():
    # float64 re-computation by hand: blocks of 10 step losses, then the largest relative gap
    steps = [float(i) for i in range(1, 26)]
    assert loss_curve(steps, every=10) == [5.5, 15.5, 23.0]
    assert curve_deviation([2.0, 4.0, 8.0], [2.1, 3.8]) == pytest.approx(0.05)
    assert curve_deviation([2.0], [2.0, 1.0]) == float("inf")
    assert curve_deviation([2.0], []) == float("inf")
