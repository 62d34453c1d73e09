"""Minibatch mode under devinterp 2.x (issue 19): ν and the per-sequence loss variances of the
whole training set from the losses devinterp's sampler already computes — in the ``llc()`` twin
by default and in a user's own ``sample_single_chain`` loop through ``MinibatchVariance2``.

The reference is built independently: a witness ``micro_callback`` records every micro-batch's
per-token losses and input ids; each row is matched to its sequence by its tokens (the test
data's rows are unique — the recorder itself never looks at tokens, it gets indices from the
dataset view), and the post-burn-in per-sequence losses (mean over token positions) give float64
numpy variances."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from _models import LMDataset, TinyLM
from conftest import require_devinterp


@pytest.fixture(autouse=True)
def _needs_devinterp2():
    require_devinterp(2)


class Witness:
    """devinterp 2's micro_callback: records every call, burn-in included."""

    def __init__(self):
        self.calls = []  # (chain, step, micro_step, per-token loss float64 [B, T−1], input_ids [B, T])

    def __call__(self, *, loss, input_ids, chain, step, micro_step):
        self.calls.append((int(chain), int(step), int(micro_step), loss.detach().to("cpu").double().clone(),
                           input_ids.detach().to("cpu").clone()))

    def reference(self, ids: torch.Tensor, num_burnin_steps: int):
        """Per-sequence post-burn-in losses, matched to ``ids`` rows by their tokens →
        (variance [N] float64, NaN below 2 visits; visits [N]; chains seen)."""
        row_of = {tuple(row.tolist()): i for i, row in enumerate(ids)}
        assert len(row_of) == len(ids), "the test data must have unique rows"
        values = [[] for _ in range(len(ids))]
        for chain, step, micro_step, loss, input_ids in self.calls:
            if step < num_burnin_steps:
                continue
            for row, per_token in zip(input_ids, loss.numpy()):
                values[row_of[tuple(row.tolist())]].append(np.mean(per_token))
        variance = np.array([np.var(v, ddof=1) if len(v) > 1 else np.nan for v in values])
        return variance, np.array([len(v) for v in values])


def both(*callbacks):
    def micro(**kwargs):
        for cb in callbacks:
            cb(**kwargs)

    return micro


def unique_ids(n, length=9, vocab=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    assert len({tuple(r.tolist()) for r in ids}) == n
    return ids


B, K, T, GA, BS = 2, 3, 4, 2, 8  # burn-in steps, steps between draws, draws, grad-accumulation, batch size


def run_user_loop(model, dataset, evaluate, micro_callback, chains=2, **extra):
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import sample_single_chain

    for chain in range(chains):
        sample_single_chain(model, dataset, evaluate, param_masks={n: None for n, _ in model.named_parameters()},
                            num_draws=T, num_burnin_steps=B, num_steps_bw_draws=K, gradient_accumulation_steps=GA,
                            sampling_method=SGLD, sampling_method_kwargs=dict(lr=1e-3, nbeta=20.0, localization=50.0),
                            chain=chain, seed=chain, dataloader_seed=10 + chain, device="cpu", batch_size=BS,
                            micro_callback=micro_callback, **extra)


# N = 40: every sequence seen ~10 times, one update at the end; N = 240: most seen 0–2 times (NaN
# variances), many partial updates merged
@pytest.mark.parametrize("n, fold_every", [(40, None), (240, 20)])
def test_users_loop_recorder_is_every_post_burn_in_micro_batch_and_the_chain_is_unchanged(n, fold_every):
    from devinterp.slt.lm_loss import make_evaluate_fn

    from devinterp_losskernel.devinterp2 import MinibatchVariance2

    ids = unique_ids(n)
    model, dataset = TinyLM(), LMDataset(ids)
    recorder = MinibatchVariance2(dataset, num_burnin_steps=B, nbeta=20.0, num_draws=T, num_steps_bw_draws=K)
    if fold_every is not None:
        recorder.fold_every = fold_every
    witness = Witness()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_user_loop(model, recorder.dataset, recorder.evaluate, both(recorder, witness))
        recorder.finalize()
        plain = Witness()  # the same loop without the recorder
        run_user_loop(model, dataset, make_evaluate_fn(), plain)

    # devinterp computed exactly the same losses on the same batches, step by step
    assert len(witness.calls) == len(plain.calls) == 2 * (B + K * T) * GA
    for (c, s, m, loss, inputs), (c2, s2, m2, loss2, inputs2) in zip(witness.calls, plain.calls):
        assert (c, s, m) == (c2, s2, m2) and torch.equal(inputs, inputs2) and torch.equal(loss, loss2)

    reference, visits = witness.reference(ids, B)
    np.testing.assert_allclose(recorder.variance().numpy(), reference, rtol=1e-10, atol=0, equal_nan=True)
    assert recorder.visits().tolist() == visits.tolist()  # a skipped or doubled step shows here
    assert int(recorder.visits().sum()) == 2 * (K * T) * BS * GA  # chains × post-burn-in steps × B × accum
    assert recorder.steps_per_chain == {0: K * T, 1: K * T}
    assert np.isfinite(reference).any() and np.isnan(reference).any() == (n == 240)
    nu = 20.0 / 2 * np.nanmean(reference)
    assert recorder.singular_fluctuation() == pytest.approx(nu, rel=1e-10)
    # the jackknife leaves a chain out: at N = 240 one chain sees no sequence twice, so no SE
    assert np.isfinite(recorder.singular_fluctuation_se()) == (n == 40)
    results = recorder.get_results()
    assert results["minibatch/unseen"] == int((visits < 2).sum())
    kernel = recorder.kernel
    assert kernel.metadata["mode"] == "minibatch" and torch.equal(kernel.visits, recorder.visits())
    assert kernel.num_draws == 2 * K * T


def test_recorder_refuses_train_mode_noise_and_a_missing_piece():
    from transformers import GPT2Config, GPT2LMHeadModel

    from devinterp_losskernel.devinterp2 import MinibatchVariance2
    from devinterp_losskernel.validation import train_mode_noise as _train_mode_noise

    ids = unique_ids(16)
    dataset = LMDataset(ids)
    gpt2 = dict(vocab_size=13, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    assert any("Dropout" in n for n in _train_mode_noise(GPT2LMHeadModel(GPT2Config(**gpt2))))  # default 0.1
    assert _train_mode_noise(GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **gpt2))) == []

    recorder = MinibatchVariance2(dataset)
    batch = torch.utils.data.default_collate([recorder.dataset[i] for i in range(4)])
    with pytest.raises(ValueError, match="Dropout"):
        recorder.evaluate(DropoutLM(), batch)
    with pytest.raises(ValueError, match="recorder.dataset"):
        recorder.evaluate(TinyLM(), {"input_ids": ids[:4]})
    recorder.evaluate(TinyLM(), batch)
    with pytest.raises(RuntimeError, match="micro_callback=recorder"):
        recorder.evaluate(TinyLM(), batch)
    fresh = MinibatchVariance2(dataset)
    with pytest.raises(RuntimeError, match="evaluate=recorder.evaluate"):
        fresh(loss=torch.zeros(4, 8), chain=0, step=0, micro_step=0)
    with pytest.raises(ValueError, match="nbeta"):
        fresh.singular_fluctuation()
    with pytest.raises(ValueError, match="at least 2"):
        MinibatchVariance2(LMDataset(ids[:1]))
    with pytest.raises(ValueError, match="loss_scale must be a positive finite number"):
        MinibatchVariance2(dataset, loss_scale=-1.0)
    with pytest.raises(TypeError, match="allow_train_mode_noise must be True or False"):
        MinibatchVariance2(dataset, allow_train_mode_noise=1)

    # the opt-in records instead of refusing, and says what it found
    allowed = MinibatchVariance2(dataset, nbeta=2.0, allow_train_mode_noise=True)
    allowed.evaluate(DropoutLM(), batch)
    assert allowed.allow_train_mode_noise and "Dropout" in allowed._noise_record()["train_mode_noise"]


def test_functional_dropout_and_batch_statistics_are_found():
    from devinterp_losskernel.validation import check_train_mode_noise, train_mode_noise

    encoder = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1)
    found = train_mode_noise(encoder)
    assert any("MultiheadAttention, dropout=0.1" in f for f in found) and any("Dropout, p=0.1" in f for f in found)
    assert train_mode_noise(torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)) == []
    attention = torch.nn.MultiheadAttention(8, 2, dropout=0.3)
    assert train_mode_noise(attention) == ["model (MultiheadAttention, dropout=0.3)"]
    untracked = torch.nn.BatchNorm1d(4, track_running_stats=False)
    assert train_mode_noise(untracked) == ["model (BatchNorm1d: batch statistics in train mode)"]
    assert train_mode_noise(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Dropout(0.0))) == []

    class Configured(torch.nn.Linear):  # an HF-style model whose attention drops out functionally
        config = type("Config", (), {"attention_dropout": 0.1})()

    assert train_mode_noise(Configured(2, 2)) == ["config.attention_dropout=0.1"]
    with pytest.raises(ValueError, match=r"here: .*MultiheadAttention, dropout=0.3.*allow_train_mode_noise=True"):
        check_train_mode_noise(torch.nn.MultiheadAttention(8, 2, dropout=0.3), where="here")
    assert check_train_mode_noise(torch.nn.MultiheadAttention(8, 2, dropout=0.3), True, where="here")


def test_the_index_view_keeps_devinterps_batches_and_fetches_through_getitems():
    from torch.utils.data import DataLoader

    from devinterp_losskernel.devinterp2 import INDEX_KEY, MinibatchVariance2

    ids = unique_ids(30)

    class Batched(LMDataset):  # an HF-style dataset that fetches a batch at once
        fetched = 0

        def __getitems__(self, indices):
            Batched.fetched += 1
            return [self[i] for i in indices]

    view = MinibatchVariance2(Batched(ids)).dataset
    assert len(view) == 30
    theirs = DataLoader(Batched(ids), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3),
                        drop_last=True)
    ours = DataLoader(view, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3), drop_last=True)
    Batched.fetched = 0
    for a, b in zip(theirs, ours):
        assert set(b) == {"input_ids", INDEX_KEY} and torch.equal(a["input_ids"], b["input_ids"])
        assert b[INDEX_KEY].dtype == torch.long and torch.equal(ids[b[INDEX_KEY]], b["input_ids"])
    assert Batched.fetched == 2 * 4  # both loaders, 4 batches each, fetched through __getitems__
    with pytest.raises(ValueError, match="already has the key"):
        MinibatchVariance2(_Keyed(ids)).dataset[0]


class _Keyed(LMDataset):
    def __getitem__(self, i):
        from devinterp_losskernel.devinterp2 import INDEX_KEY

        return {"input_ids": self.ids[i], INDEX_KEY: i}


def test_a_chain_with_a_nan_loss_is_left_out():
    from devinterp.slt.lm_loss import make_evaluate_fn

    from devinterp_losskernel.devinterp2 import MinibatchVariance2

    ids = unique_ids(40)
    model, dataset = TinyLM(), LMDataset(ids)
    inner, calls = make_evaluate_fn(), {"n": 0}

    def nan_in_chain_0(model, batch):  # chain 0, step 7 (post-burn-in): devinterp stops the chain
        calls["n"] += 1
        loss, extra = inner(model, batch)
        return (loss * float("nan") if calls["n"] == 7 * GA + 1 else loss), extra

    recorder = MinibatchVariance2(dataset, nan_in_chain_0, num_burnin_steps=B, nbeta=20.0, num_draws=T,
                                  num_steps_bw_draws=K)
    witness = Witness()
    with pytest.warns(RuntimeWarning, match="chain 0 is left out"):
        run_user_loop(model, recorder.dataset, recorder.evaluate, both(recorder, witness))
        recorder.finalize()
    assert set(recorder.failed_chains) == {0} and "non-finite" in recorder.failed_chains[0]
    witness.calls = [call for call in witness.calls if call[0] == 1]
    reference, visits = witness.reference(ids, B)
    np.testing.assert_allclose(recorder.variance().numpy(), reference, rtol=1e-10, equal_nan=True)
    assert int(recorder.visits().sum()) == K * T * BS * GA and np.isnan(recorder.singular_fluctuation_se())


# -- the llc() twin -------------------------------------------------------------------------------
class DropoutLM(TinyLM):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, input_ids):
        return self.out(self.drop(torch.tanh(self.mix(self.embed(input_ids)))))


def twin_args(**extra):
    args = dict(lr=1e-3, n_beta=20.0, num_chains=3, num_draws=T, batch_size=BS, num_burnin_steps=B,
                num_steps_bw_draws=K, gradient_accumulation_steps=GA, num_init_loss_batches=2, localization=50.0,
                device="cpu")
    args.update(extra)
    return args


def test_llc_twin_gives_the_training_sets_nu_and_devinterps_llc_bit_for_bit(monkeypatch):
    import devinterp.slt.sampler as sampler
    from devinterp.slt.llc import llc as devinterp_llc

    from devinterp_losskernel import llc
    from devinterp_losskernel.devinterp2 import MINIBATCH_METHOD

    ids = unique_ids(48, seed=1)
    model, dataset = TinyLM(), LMDataset(ids)
    observables = {"probe": (LMDataset(ids[:16]), 2)}  # another dataset object: no probe ν, the training ν anyway
    witness, plain, original = Witness(), Witness(), sampler.sample_single_chain
    record_into = {"witness": witness}

    def spied(**kwargs):  # the twin's own sample_single_chain calls, with a witness beside its micro_callback
        kwargs["micro_callback"] = both(kwargs["micro_callback"], record_into["witness"])
        return original(**kwargs)

    monkeypatch.setattr(sampler, "sample_single_chain", spied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_llc(model, dataset, observables, **twin_args())
        ours = llc(model, dataset, observables, **twin_args())
        record_into["witness"] = plain
        off = llc(model, dataset, observables, minibatch_variance=False, **twin_args())

    for name in ("llc_mean", "llc_std", "llc_per_chain", "llc_scalar", "loss_trace", "init_loss"):
        np.testing.assert_array_equal(np.asarray(ours[name].values), np.asarray(theirs[name].values), err_msg=name)
    assert not any(name.startswith("train_") for name in off.data_vars)  # turned off: not there
    for name in off.data_vars:  # and everything else identical, the kernel too
        np.testing.assert_array_equal(ours[name].values, off[name].values, err_msg=name)
    for (c, s, m, loss, inputs), (c2, s2, m2, loss2, inputs2) in zip(witness.calls, plain.calls, strict=True):
        assert (c, s, m) == (c2, s2, m2) and torch.equal(inputs, inputs2) and torch.equal(loss, loss2)

    reference, visits = witness.reference(ids, B)
    assert len(witness.calls) == 3 * (B + K * T) * GA
    np.testing.assert_allclose(ours.train_variance.values, reference, rtol=1e-10, atol=0, equal_nan=True)
    assert ours.train_visits.values.tolist() == visits.tolist()
    assert int(ours.train_visits.sum()) == 3 * (K * T) * BS * GA  # chains × post-burn-in steps × B × accum
    assert ours.train_variance.dims == ("train_sample",) and ours.train_sample.values.tolist() == list(range(48))
    nu = ours.train_singular_fluctuation
    assert float(nu) == pytest.approx(20.0 / 2 * np.nanmean(reference), rel=1e-10)
    assert np.isfinite(float(ours.train_singular_fluctuation_se)) and float(ours.train_singular_fluctuation_se) > 0
    assert nu.attrs["method"] == MINIBATCH_METHOD
    assert nu.attrs["samples_seen_fewer_than_twice"] == int((visits < 2).sum()) == \
        ours.train_variance.attrs["samples_seen_fewer_than_twice"]
    assert "Watanabe" in nu.attrs["meaning"] and nu.attrs["chains"] == [0, 1, 2]
    assert np.isnan(float(ours.singular_fluctuation))  # the probe kernel's ν: a different estimator, NaN here


def test_llc_twin_with_dropout_gives_nan_nu_with_the_reason_and_the_llc():
    from devinterp_losskernel import llc

    ids = unique_ids(32)
    torch.manual_seed(0)
    model, dataset = DropoutLM(), LMDataset(ids)
    args = twin_args(num_chains=2, gradient_accumulation_steps=1, num_steps_bw_draws=1)
    with pytest.warns(UserWarning, match="train_singular_fluctuation is NaN.*Dropout"):
        ours = llc(model, dataset, {"probe": dataset}, **args)
    assert np.isnan(float(ours.train_singular_fluctuation))
    assert "Dropout" in ours.train_singular_fluctuation.attrs["why_nan"]
    assert "train_variance" not in ours and np.isfinite(float(ours.llc_mean))  # the LLC run is not lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off = llc(model, dataset, {"probe": dataset}, minibatch_variance=False, **args)
    assert "train_singular_fluctuation" not in off and not any("train_singular" in str(w.message) for w in caught)
    assert float(off.llc_mean) == float(ours.llc_mean)
    with pytest.raises(TypeError, match="minibatch_variance"):
        llc(model, dataset, {"probe": dataset}, minibatch_variance="yes", **args)

    # the opt-in computes it anyway and says so; loss_scale divides ν (an MSE loss: 2σ²)
    allowed = llc(model, dataset, {"probe": dataset}, allow_train_mode_noise=True, loss_scale=4.0, **args)
    nu = allowed.train_singular_fluctuation
    assert float(nu) == pytest.approx(20.0 / 2 * np.nanmean(allowed.train_variance.values) / 4.0, rel=1e-10)
    assert nu.attrs["allow_train_mode_noise"] is True and "Dropout" in nu.attrs["train_mode_noise"]
    assert nu.attrs["loss_scale"] == 4.0 and float(allowed.llc_mean) == float(ours.llc_mean)
    with pytest.raises(ValueError, match="loss_scale must be a positive finite number"):
        llc(model, dataset, {"probe": dataset}, loss_scale=float("inf"), **args)
