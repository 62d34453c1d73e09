import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel import ProbeSet, lm_sequence_loss
from devinterp_losskernel.probe import evaluate_probe_losses


class BatchNormDropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def probe_data(n=37):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_losses_do_not_depend_on_batch_composition():
    torch.manual_seed(0)
    model = BatchNormDropoutNet()
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running stats
        model(torch.randn(64, 5) * 3 + 1)
    x, y = probe_data()
    results = [evaluate_probe_losses(model, ProbeSet((x, y), batch_size=bs)) for bs in (1, 5, 37)]
    permuted = torch.randperm(37)
    shuffled = evaluate_probe_losses(model, ProbeSet((x[permuted], y[permuted]), batch_size=8))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shuffled, results[0][permuted], rtol=1e-6, atol=1e-6)
    # repeated passes agree: dropout is off
    torch.testing.assert_close(evaluate_probe_losses(model, ProbeSet((x, y), batch_size=5)), results[1])
    assert model.training and model.body[3].training, "the model's train mode must be restored"


def test_submodule_modes_are_restored():
    model = BatchNormDropoutNet()
    model.train()
    model.body[1].eval()  # user froze BatchNorm
    evaluate_probe_losses(model, (probe_data()))
    assert model.training and not model.body[1].training


@pytest.mark.parametrize("bad_fn, match", [
    (lambda model, batch: model(batch[0]).sum(), r"shape \[batch_size\]"),
    (lambda model, batch: model(batch[0]), r"shape \[batch_size\]"),
    (lambda model, batch: 1.0, r"shape \[batch_size\]"),
])
def test_loss_fn_shape_checked(bad_fn, match):
    with pytest.raises(ValueError, match=match):
        evaluate_probe_losses(BatchNormDropoutNet(), probe_data(), bad_fn)


def test_empty_probe():
    empty = (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="probe is empty"):
        evaluate_probe_losses(BatchNormDropoutNet(), empty)


def test_shuffling_loader_refused():
    loader = DataLoader(TensorDataset(*probe_data()), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        ProbeSet(loader)


def test_size_change_detected():
    with pytest.raises(ValueError, match="same 40 samples"):
        evaluate_probe_losses(BatchNormDropoutNet(), probe_data(37), expected_num_samples=40)


def test_unsupported_probe_type():
    with pytest.raises(TypeError, match="probe must be"):
        ProbeSet(42)


def test_cache_matches_fresh_batches():
    model = BatchNormDropoutNet().eval()
    x, y = probe_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    cached = ProbeSet(loader, cache_on_device=True)
    first = evaluate_probe_losses(model, cached)
    assert cached._cache is not None
    torch.testing.assert_close(evaluate_probe_losses(model, cached), first)
    torch.testing.assert_close(evaluate_probe_losses(model, ProbeSet(loader, cache_on_device=False)), first)


class TinyLM(nn.Module):
    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.out(self.embed(input_ids))


def test_lm_sequence_loss_against_manual():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    losses = lm_sequence_loss(model, {"input_ids": ids, "attention_mask": mask})
    logits = model(ids)
    manual = []
    for i in range(4):
        valid = int(mask[i, 1:].sum())
        ce = torch.nn.functional.cross_entropy(logits[i, :valid], ids[i, 1 : valid + 1])
        manual.append(ce)
    torch.testing.assert_close(losses, torch.stack(manual))
    # dict probes batch themselves
    out = evaluate_probe_losses(model, ProbeSet({"input_ids": ids}, batch_size=3))
    torch.testing.assert_close(out, lm_sequence_loss(model, {"input_ids": ids}))


def test_channels_last_gives_the_same_losses():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(23, 3, 12, 12), torch.randint(0, 4, (23,))
    plain = evaluate_probe_losses(net, ProbeSet((x, y), batch_size=8))
    fast = evaluate_probe_losses(net, ProbeSet((x, y), batch_size=8), channels_last=True)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    # non-image tensors (the targets) pass through untouched
    from devinterp_losskernel.probe import to_channels_last
    out = to_channels_last({"x": x, "y": y, "pair": (x[:2], y[:2])})
    assert out["x"].is_contiguous(memory_format=torch.channels_last) and out["y"] is y
    assert out["pair"][0].is_contiguous(memory_format=torch.channels_last)


# -- the default loss: what it takes, and what it refuses before any sampling -------------------
def test_default_loss_refuses_images_given_as_input_ids_at_construction():
    from devinterp_losskernel import LossKernelCallback

    images = torch.randn(16, 1, 8, 8)
    with pytest.raises(ValueError, match=r"input_ids'\] is torch.float32 \(16, 1, 8, 8\).*\(inputs, targets\)"):
        LossKernelCallback({"input_ids": images})  # no model needed: refused before any sampling
    with pytest.raises(ValueError, match="not integer token ids"):
        LossKernelCallback({"input_ids": torch.randint(0, 5, (16, 3, 4))})


def test_default_loss_classifies_mappings_with_per_sample_labels():
    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    cnn = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    from devinterp_losskernel.probe import default_loss_fn, default_loss_kind

    got = default_loss_fn(cnn, {"input_ids": images, "labels": labels})
    want = F.cross_entropy(cnn(images), labels, reduction="none")
    torch.testing.assert_close(got, want)
    # token ids with [B, T] labels are a language-model batch (Hugging Face style), not a classifier's
    ids = torch.randint(0, 7, (4, 5))
    assert default_loss_kind({"input_ids": ids, "labels": ids}) == "language_model"
    assert default_loss_kind({"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}) == "classification"


def test_language_model_loss_names_a_classifier_given_token_ids():
    from devinterp_losskernel.probe import default_loss_fn

    classifier = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(20, 3))  # [B, 5] ids -> [B, 3]
    with pytest.raises(ValueError, match=r"logits \[batch_size, seq_len, vocab\].*got \[4, 3\]"):
        default_loss_fn(classifier, {"input_ids": torch.randint(0, 7, (4, 5))})


@pytest.mark.parametrize("loss_fn, match", [
    (lambda logits, targets: F.cross_entropy(logits, targets, reduction="none"), r"named \(logits, targets\)"),
    (lambda batch: batch[0].sum(1), r"takes \(batch\)"),
    (lambda model, batch, extra: None, r"takes \(model, batch, extra\)"),
    (F.cross_entropy, r"takes \(logits, targets\)"),
    (nn.CrossEntropyLoss(reduction="none"), r"takes \(logits, targets\)"),
])
def test_a_loss_fn_of_the_wrong_signature_is_named_before_any_pass(loss_fn, match):
    from devinterp_losskernel import LossKernelCallback

    with pytest.raises(TypeError, match=match):
        LossKernelCallback((torch.randn(8, 3), torch.randint(0, 2, (8,))), loss_fn)


def test_a_loss_fn_with_defaults_or_varargs_is_accepted():
    from devinterp_losskernel.probe import check_loss_fn

    check_loss_fn(lambda model, batch, scale=1.0: None)
    check_loss_fn(lambda *args: None)
    check_loss_fn(lambda m, b: None)


def test_a_list_of_batches_is_refused_as_a_probe_but_a_list_of_samples_is_not():
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    with pytest.raises(ValueError, match="list of batches"):
        ProbeSet([(x[:10], y[:10]), (x[10:], y[10:])])
    assert ProbeSet([(x[i], y[i]) for i in range(20)], batch_size=7).fingerprint()[0] == 20


def test_a_probe_with_non_finite_inputs_is_refused_before_any_sampling():
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    x[4, 2] = float("nan")
    x[9, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in the inputs of 2 samples \(e.g. probe indices \[4, 9\]\)"):
        ProbeSet((x, y)).check_stable()
