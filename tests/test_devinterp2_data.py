"""Any model's data through devinterp 2.x's own sampler: as_devinterp2_dataset / devinterp2_evaluate,
and the refusals that name the fix before any sampling (run by CI in the devinterp 2.0 venv)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import require_devinterp
from devinterp_losskernel import LossKernelCallback, as_devinterp2_dataset, devinterp2_evaluate, llc

from _models import LMDataset, ProbeRecorder, TinyLM


def _images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))


def test_an_image_dataset_runs_through_sample_single_chain_and_the_kernel_is_exact():
    require_devinterp(2)
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    images, labels = _images()
    model, probe = _cnn(), (images[:40], labels[:40])
    cb, witness = LossKernelCallback(probe, reference_model=model, num_draws=12), ProbeRecorder(probe)
    for chain in range(2):
        sample_single_chain(model, as_devinterp2_dataset(TensorDataset(images, labels)), devinterp2_evaluate(),
                            param_masks={n: None for n, _ in model.named_parameters()}, num_draws=12,
                            num_burnin_steps=3, sampling_method=SGMCMC.sgld,
                            sampling_method_kwargs=dict(lr=1e-3, nbeta=30.0, localization=100.0),
                            chain=chain, seed=chain, callbacks=[cb, witness], batch_size=16)
    cb.finalize()
    kernel = cb.kernel
    assert kernel.num_draws == 24 and kernel.draws_per_chain == {0: 12, 1: 12}
    np.testing.assert_allclose(kernel.covariance.numpy(), np.cov(witness.traces().T), rtol=1e-9, atol=1e-12)
    assert float(kernel.variance.min()) > 0  # the chains moved: SGLD saw the labels through the wrapper


def test_devinterp2_evaluate_moves_the_labels_and_averages_per_sample():
    images, labels = _images(8)
    model = _cnn()
    loss, extra = devinterp2_evaluate()(model, {"input_ids": images, "labels": labels})
    assert extra == {} and loss.shape == (8,)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(images), labels, reduction="none"))
    with pytest.raises(TypeError, match="as_devinterp2_dataset"):
        devinterp2_evaluate()(model, (images, labels))
    with pytest.raises(TypeError, match=r"named \(logits, targets\)"):
        devinterp2_evaluate(lambda logits, targets: logits)


def test_as_devinterp2_dataset_checks_items_up_front():
    images, labels = _images(8)
    ds = as_devinterp2_dataset(TensorDataset(images, labels))
    assert len(ds) == 8 and torch.equal(ds[3]["input_ids"], images[3]) and int(ds[3]["labels"]) == int(labels[3])
    with pytest.raises(TypeError, match="expected an \\(input, target\\) pair"):
        as_devinterp2_dataset(TensorDataset(images, labels, labels))
    with pytest.raises(ValueError, match="empty"):
        as_devinterp2_dataset(TensorDataset(images[:0], labels[:0]))
    mapped = as_devinterp2_dataset([{"input_ids": torch.arange(4)}])
    assert set(mapped[0]) == {"input_ids"}  # mappings pass through


def test_llc_refuses_non_token_data_before_sampling():
    require_devinterp(2)
    images, labels = _images(32)
    torch.manual_seed(0)
    lm, tokens = TinyLM(), LMDataset(torch.randint(0, 13, (40, 9)))
    with pytest.raises(TypeError, match=r"dataset\[0\] is a tuple of length 2.*estimate_loss_kernel"):
        llc(_cnn(), TensorDataset(images, labels), {"probe": tokens}, lr=1e-3, n_beta=10.0, num_draws=2)
    with pytest.raises(TypeError, match=r"observables\['probe'\]\[0\]\['input_ids'\] is torch.float32"):
        llc(lm, tokens, {"probe": as_devinterp2_dataset(TensorDataset(images, labels))}, lr=1e-3, n_beta=10.0,
            num_draws=2)


def test_llc_takes_the_probe_as_training_data_only_when_it_is_the_training_set():
    """A held-out observable larger than the training set used to fail after all chains had run."""
    require_devinterp(2)
    torch.manual_seed(0)
    train, held_out = LMDataset(torch.randint(0, 13, (24, 9))), LMDataset(torch.randint(0, 13, (48, 9)))
    args = dict(lr=1e-3, n_beta=10.0, num_chains=2, num_draws=4, num_burnin_steps=1, batch_size=8,
                localization=50.0, device="cpu")
    ds = llc(TinyLM(), train, {"probe": (held_out, 6), "train": train}, **args)  # 6 batches: 48 > 24 train
    assert np.isnan(float(ds.singular_fluctuation)) and np.isfinite(float(ds.llc_mean))
    ds = llc(TinyLM(), train, {"train": train}, **args)                    # the training set itself
    assert np.isfinite(float(ds.singular_fluctuation)) and ds.singular_fluctuation.attrs["method"]
    with pytest.raises(ValueError, match=r"num_train=24 .* smaller than the 48 probe samples"):
        llc(TinyLM(), train, {"probe": (held_out, 6)}, callback_kwargs=dict(probe_train_mask=None), **args)
