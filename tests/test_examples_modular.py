"""Multitask modular arithmetic: data correctness, the shipped checkpoint, kernel helpers."""

import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator
from losskernel_examples.modular import (
    ADD,
    CHECKPOINT_PATH,
    DIV,
    SCALES,
    KernelScale,
    ModelConfig,
    ModularTransformer,
    TrainConfig,
    accuracy,
    load_checkpoint,
    modular_dataset,
    modular_inverse,
    modular_probe,
    pool_kernels,
    run_modular_kernel,
    save_checkpoint,
    split_half_agreement,
    training_loader,
)

from conftest import require_devinterp


# -- data ------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [5, 97])
def test_modular_inverse(p):
    for b in range(1, p):
        assert b * modular_inverse(b, p) % p == 1
    with pytest.raises(ValueError, match="non-zero"):
        modular_inverse(0, p)


def test_dataset_results_are_correct():
    p = 97
    data = modular_dataset(p)
    assert len(data) == p * p + p * (p - 1)
    add, div = data.task == ADD, data.task == DIV
    assert int(add.sum()) == p * p and int(div.sum()) == p * (p - 1)
    assert torch.equal(data.result[add], (data.a[add] + data.b[add]) % p)
    assert bool((data.b[div] != 0).all()), "division by 0 is excluded"
    assert torch.equal((data.result[div] * data.b[div]) % p, data.a[div]), "a / b · b = a"
    # every (a, b) pair of each task appears exactly once
    for mask in (add, div):
        pairs = data.a[mask] * p + data.b[mask]
        assert len(torch.unique(pairs)) == int(mask.sum())


def test_vocabularies_are_separate():
    p = 11
    data = modular_dataset(p)
    add, div = data.task == ADD, data.task == DIV
    for tokens in (data.inputs[add].flatten(), data.targets[add]):
        assert int(tokens.min()) >= 0 and int(tokens.max()) < p
    for tokens in (data.inputs[div].flatten(), data.targets[div]):
        assert int(tokens.min()) >= p and int(tokens.max()) < 2 * p
    assert torch.equal(data.inputs[:, 0], data.a + data.task * p)
    assert torch.equal(data.inputs[:, 1], data.b + data.task * p)
    assert torch.equal(data.targets, data.result + data.task * p)
    assert data.vocab_size == 2 * p


def test_a_zero_division_flags_the_trivial_inputs():
    p = 13
    data = modular_dataset(p)
    flagged = data.a_zero_division
    assert int(flagged.sum()) == p - 1
    assert bool((data.task[flagged] == DIV).all() and (data.a[flagged] == 0).all())
    assert bool((data.result[flagged] == 0).all()), "0 / b = 0"


def test_split_is_per_task_and_deterministic():
    data = modular_dataset(97, train_fraction=0.5, seed=3)
    for t in (ADD, DIV):
        members = data.task == t
        assert abs(float(data.is_train[members].float().mean()) - 0.5) < 1e-3
    again = modular_dataset(97, train_fraction=0.5, seed=3)
    assert torch.equal(data.is_train, again.is_train)
    assert not torch.equal(data.is_train, modular_dataset(97, train_fraction=0.5, seed=4).is_train)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prime"):
        modular_dataset(96)
    with pytest.raises(ValueError, match="train_fraction"):
        modular_dataset(7, train_fraction=1.0)
    with pytest.raises(ValueError, match="even"):
        modular_probe(modular_dataset(7), 5)


def test_probe_is_half_per_task_sorted():
    data = modular_dataset(97)
    index = modular_probe(data, 1000, seed=0)
    assert len(torch.unique(index)) == 1000
    task = data.task[index]
    assert int((task == ADD).sum()) == int((task == DIV).sum()) == 500
    assert bool((task[:500] == ADD).all()) and bool((index[:500].diff() > 0).all())
    assert torch.equal(index, modular_probe(data, 1000, seed=0))


def test_training_loader_batches():
    data = modular_dataset(7)
    loader = training_loader(data, 16)
    x, y = next(iter(loader))
    assert x.shape == (16, 2) and y.shape == (16,)
    seen = torch.cat([b[1] for b in loader])
    assert len(seen) == int(data.is_train.sum())


# -- model and checkpoint -------------------------------------------------------------------
def test_model_shapes_and_last_position_shortcut():
    torch.manual_seed(0)
    model = ModularTransformer(ModelConfig(p=7, d_model=16, n_heads=2, d_mlp=32))
    x = modular_dataset(7).inputs[:10]
    logits = model(x)
    assert logits.shape == (10, 14)
    # the last block computes only the last position; compare with the full causal pass
    h = model.embed(x) + model.pos
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(model.unembed(model.ln_f(h[:, -1])), logits)


def test_shipped_checkpoint_fits_and_generalizes():
    assert CHECKPOINT_PATH.exists(), "the trained checkpoint ships with the package"
    assert CHECKPOINT_PATH.stat().st_size < 5 * 2**20
    model, data, info = load_checkpoint()
    assert data.p == 97 and info["model_config"].p == 97
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    for t in (ADD, DIV):
        train = data.is_train & (data.task == t)
        test = ~data.is_train & (data.task == t)
        assert accuracy(model, data.inputs[train], data.targets[train]) == 1.0
        assert accuracy(model, data.inputs[test], data.targets[test]) >= 0.99


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(p=5, d_model=8, n_heads=2, d_mlp=16)
    model = ModularTransformer(cfg)
    path = save_checkpoint(model, tmp_path / "m.pt", train_cfg=TrainConfig(seed=2, train_fraction=0.4))
    loaded, data, info = load_checkpoint(path)
    x = data.inputs
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert torch.equal(data.is_train, modular_dataset(5, 0.4, seed=2).is_train)
    assert info["train_config"].train_fraction == 0.4
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# -- kernel helpers ---------------------------------------------------------------------------
def _kernel(losses):
    acc = KernelAccumulator(losses.shape[1])
    acc.update(losses)
    return acc.compute(draws_per_chain={0: losses.shape[0]})


def test_pooled_kernels_equal_one_run_over_all_draws():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 6, generator=gen, dtype=torch.float64) + 5
    b = torch.randn(17, 6, generator=gen, dtype=torch.float64) * 2
    pooled = pool_kernels(_kernel(a), _kernel(b))
    whole = _kernel(torch.cat([a, b]))
    assert pooled.num_draws == 47
    torch.testing.assert_close(pooled.covariance, whole.covariance)
    torch.testing.assert_close(pooled.mean, whole.mean)
    torch.testing.assert_close(pooled.variance, whole.variance)
    assert pooled.draws_per_chain == {0: 30, 1: 17}


def test_split_half_agreement():
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    mixing = torch.randn(5, 60, generator=gen, dtype=torch.float64)
    k1 = _kernel(shared @ mixing)
    assert split_half_agreement(k1, k1, block_rows=7) == pytest.approx(1.0)
    noise1 = _kernel(torch.randn(40, 60, generator=gen, dtype=torch.float64))
    noise2 = _kernel(torch.randn(40, 60, generator=gen, dtype=torch.float64))
    assert abs(split_half_agreement(noise1, noise2)) < 0.1


def test_scales_are_consistent():
    assert set(SCALES) == {"ci", "cpu", "paper"}
    paper = SCALES["paper"]
    assert (paper.num_probe, paper.num_chains * paper.num_draws, paper.batch_size) == (10_000, 24_000, 512)
    for scale in SCALES.values():
        assert scale.num_probe % 2 == 0 and scale.num_chains >= 2


def test_run_modular_kernel_tiny():
    require_devinterp(1)
    tiny = KernelScale(num_probe=60, num_chains=2, num_draws=8, num_burnin_steps=8, num_steps_bw_draws=1,
                       batch_size=64, lr=1.5e-6, nbeta=500.0, localization=300_000.0)
    result = run_modular_kernel(tiny, device="cpu", verbose=False)
    numbers = result.numbers
    assert result.kernel.num_draws == 16 and result.kernel.num_samples == 60
    assert numbers["train_accuracy"] == 1.0
    assert 0.5 <= numbers["pc1_auc"] <= 1.0 and -1 <= numbers["split_half_agreement"] <= 1
    assert np.array_equal(result.task, np.repeat([ADD, DIV], 30))
    assert numbers["probe_loss/mean_over_draws"] > numbers["probe_loss/at_w_star"]


def test_run_modular_kernel_halves_in_separate_calls_pool_to_the_one_call_result(tmp_path):
    """``only_half`` lets two processes sample the halves; pooling them afterwards gives the
    kernel of one uninterrupted call."""
    require_devinterp(1)
    tiny = KernelScale(num_probe=40, num_chains=2, num_draws=6, num_burnin_steps=4, num_steps_bw_draws=1,
                       batch_size=64, lr=1.5e-6, nbeta=500.0, localization=300_000.0)
    whole = run_modular_kernel(tiny, device="cpu", verbose=False)
    for half in (1, 0):
        assert run_modular_kernel(tiny, device="cpu", verbose=False, checkpoint_dir=tmp_path, only_half=half) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half0", "half1"]
    pooled = run_modular_kernel(tiny, device="cpu", verbose=False, checkpoint_dir=tmp_path)
    torch.testing.assert_close(pooled.kernel.covariance, whole.kernel.covariance, rtol=1e-12, atol=1e-15)
    assert pooled.numbers["pc1_auc"] == whole.numbers["pc1_auc"]
    assert pooled.split_half == pytest.approx(whole.split_half, abs=1e-12)
    with pytest.raises(ValueError, match="only_half"):
        run_modular_kernel(tiny, device="cpu", verbose=False, only_half=0)  # no checkpoint_dir
    with pytest.raises(ValueError, match="only_half"):
        run_modular_kernel(tiny, device="cpu", verbose=False, checkpoint_dir=tmp_path, only_half=2)
