"""Any model's data through devinterp 2.x's own sampler: as_devinterp2_dataset / devinterp2_evaluate,
and the refusals that name the fix before any sampling (run by CI in the devinterp 2.0 venv)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from devinterp_losskernel import LossKernelCallback, as_devinterp2_dataset, devinterp2_evaluate, llc

from _models import LMDataset, ProbeRecorder, TinyLM
from conftest import require_devinterp


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


class _CountingLM(TinyLM):
    """TinyLM that counts its forward passes: a refusal must come before the first one."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return super().forward(input_ids)


_IDS = torch.randint(0, 13, (40, 9), generator=torch.Generator().manual_seed(0))
_DS = LMDataset(_IDS)
_BAD_LLC_ARGUMENTS = [
    (dict(dataset=LMDataset(_IDS[:10]), batch_size=12), ValueError,
     r"batch_size=12 is larger than dataset \(10 items\)"),
    (dict(observables={"probe": LMDataset(_IDS[:10])}), ValueError,
     r"observables\['probe'\] has 10 sequences, but .* batch_size × batches_per_draw = 8 × 3 = 24"),
    (dict(observables={"probe": {"input_ids": _IDS}}), TypeError, r"observables\['probe'\] must be a dataset"),
    (dict(observables={"probe": (_DS, 0)}), ValueError, r"observables\['probe'\]\[1\] \(batches_per_draw\) must be a "
                                                         r"positive int, got 0"),
    (dict(observables={"probe": (_DS, 2.5)}), ValueError, r"batches_per_draw\) must be a positive int, got 2.5"),
    (dict(observables={"probe": (_DS,)}), ValueError, r"a \(dataset, batches_per_draw\) pair, got a tuple of length 1"),
    (dict(observables={0: _DS}), TypeError, r"observables must be keyed by names"),
    (dict(observables=[_DS]), ValueError, r"observables must be a non-empty dict"),
    (dict(batches_per_draw=0), ValueError, r"batches_per_draw must be a positive int, got 0"),
    (dict(batch_size=8.0), ValueError, r"batch_size must be a positive int, got 8.0"),
    (dict(observable=0), TypeError, r"observable must be the name \(a str\)"),
    (dict(param_masks={"nope": None}), ValueError, r"param_masks names parameters the model does not have: \['nope'\]"),
    (dict(callback_kwargs=[("dtype", torch.float32)]), TypeError, r"callback_kwargs must be a dict"),
    (dict(callback_kwargs={"nope": 1}), TypeError, r"callback_kwargs has arguments LossKernelCallback does not take"),
    (dict(callback_kwargs={"rows": [1, 1]}), ValueError,
     r"callback_kwargs\['rows'\] must name each probe sequence once"),
    (dict(callback_kwargs={"rows": [24]}), ValueError, r"callback_kwargs\['rows'\] must be probe sequence indices in "
                                                       r"\[0, 24\)"),
    (dict(device="gpu"), ValueError, r"device must be a torch device"),
    (dict(observables={"probe": LMDataset(_IDS[:, :5])}), ValueError,
     r"observables\['probe'\]\[0\]\['input_ids'\] has length 5, but dataset\[0\]'s has 9"),
]


@pytest.mark.parametrize("changes, error, match", _BAD_LLC_ARGUMENTS)
def test_llc_refuses_bad_arguments_by_name_before_any_forward_pass(changes, error, match):
    require_devinterp(2)
    model = _CountingLM()
    args = dict(model=model, dataset=_DS, observables={"probe": _DS}, lr=1e-3, n_beta=10.0, num_chains=1,
                num_draws=2, batch_size=8, num_init_loss_batches=1, device="cpu")
    args.update(changes)
    with pytest.raises(error, match=match):
        llc(**args)
    assert model.calls == 0


def test_llc_says_and_records_the_probe_sequences_and_observables_it_leaves_out():
    """devinterp's Observable keeps batch_size × batches_per_draw sequences: 24 of a 40-sequence probe."""
    require_devinterp(2)
    torch.manual_seed(0)
    args = dict(lr=1e-3, n_beta=10.0, num_chains=1, num_draws=3, batch_size=8, num_init_loss_batches=1,
                localization=50.0, device="cpu")
    with pytest.warns(UserWarning, match=r"the kernel is 24 × 24, over 24 of the 40 probe sequences.*"
                                         r"observables \['other'\] are not evaluated"):
        ds, kernel = llc(TinyLM(), _DS, {"probe": _DS, "other": _DS}, return_kernel=True, **args)
    assert ds.sizes["sample"] == 24 and ds.attrs["probe_samples_used"] == 24 and ds.attrs["probe_samples_given"] == 40
    assert kernel.metadata["dropped"]["probe_samples"]["count"] == 16
    assert "batch_size × batches_per_draw" in kernel.metadata["dropped"]["probe_samples"]["why"]
    assert kernel.metadata["dropped"]["observables"]["names"] == ["other"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all 40 used, one observable: nothing to say
        full = llc(TinyLM(), _DS, {"probe": (_DS, 5)}, **args)
    assert full.sizes["sample"] == 40 and full.attrs["dropped"] == "nothing"
