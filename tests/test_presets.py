"""SGLDSettings, the one validated SGLD record, and the paper's Table 1 presets (presets.py)."""

from __future__ import annotations

import math
import types

import pytest

from devinterp_losskernel import PAPER_PRESETS, SGLDSettings, preset


def settings(**changes):
    values = dict(batch_size=64, num_chains=2, num_draws=10, num_burnin_steps=5, lr=1e-3, nbeta=10.0,
                  localization=100.0)
    values.update(changes)
    return SGLDSettings(**values)


@pytest.mark.parametrize("changes, match", [
    (dict(lr=math.nan), "lr"),
    (dict(nbeta=math.inf), "nbeta"),
    (dict(lr=0.0), "lr"),
    (dict(num_chains=0), "num_chains"),
    (dict(num_draws=1.5), "num_draws"),
    (dict(num_chains=1, num_draws=1), r"num_chains \* num_draws must be at least 2"),
    (dict(seed=-1), "seed"),
    (dict(localization=math.nan), "localization"),
])
def test_bad_values_are_refused_by_name(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        settings(**changes)


def test_sampler_kwargs_and_round_trip():
    s = settings(seed=3)
    assert s.sampler_kwargs() == dict(num_chains=2, num_draws=10, num_burnin_steps=5, lr=1e-3, nbeta=10.0,
                                      localization=100.0, seed=3)
    assert s.sampler_kwargs(num_draws=20)["num_draws"] == 20
    assert SGLDSettings(**s.to_dict()) == s
    assert s.scaled(num_chains=4).num_chains == 4 and s.num_chains == 2
    with pytest.raises(ValueError, match="lr"):
        s.scaled(lr=-1.0)


def test_from_config_reads_the_fields_and_refuses_unknown_changes():
    config = types.SimpleNamespace(num_chains=3, num_draws=4, num_burnin_steps=1, lr=1e-4, nbeta=5.0,
                                   localization=10.0, hidden=128)
    s = SGLDSettings.from_config(config, num_draws=8)
    assert (s.num_chains, s.num_draws, s.batch_size) == (3, 8, None)
    with pytest.raises(ValueError, match=r"SGLDSettings has no settings \['hidden'\]"):
        SGLDSettings.from_config(config, hidden=3)


def test_the_papers_presets():
    assert preset("inception_imagenet") is PAPER_PRESETS["inception_imagenet"]
    s = preset("modular_arithmetic")
    assert (s.num_chains, s.num_draws, s.lr, s.nbeta, s.localization) == (30, 800, 2e-7, 500.0, 30_000.0)
    with pytest.raises(ValueError, match="this preset varies localization"):
        preset("inception_gamma_sweep").sampler_kwargs()
    assert preset("inception_gamma_sweep").sampler_kwargs(localization=1000.0)["localization"] == 1000.0
    with pytest.raises(ValueError, match="name must be one of"):
        preset("nope")
