"""Tutorial 05's token-level section: the synthetic language, its groups, the separation
measure, and (devinterp 2) the bif() pipeline — deterministic, token rows, separation above chance."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from losskernel_examples.token_kernel import (
    GROUPS,
    SCALES,
    Language,
    TinyTransformer,
    make_sequences,
    per_token_loss,
    run_token_kernel,
    separation_numbers,
    target_groups,
    train_lm,
)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_language_has_its_structure():
    lang = Language(noise=0.0)
    ids = make_sequences(50, lang, seed=3)
    k = lang.num_pairs
    assert ids.shape == (50, lang.length) == (50, 2 * k + 2 + k)
    assert (ids[:, 0] == lang.bos).all() and (ids[:, 2 * k + 1] == lang.sep).all()
    fillers = ids[:, 1:2 * k + 1:2]
    assert (ids[:, 2:2 * k + 2:2] == lang.rule[fillers]).all()      # rule: g(f), a permutation of the symbols
    assert (ids[:, 2 * k + 2:] == fillers).all()                      # copy: the f's again
    assert sorted(lang.rule.tolist()) == list(range(lang.num_fillers))
    assert not (lang.rule == torch.arange(lang.num_fillers)).any()
    groups = target_groups(lang)
    assert len(groups) == lang.length - 1
    assert [int((groups == i).sum()) for i in range(len(GROUPS))] == [k, k, 1, k]
    noisy = make_sequences(4000, Language(noise=0.1), seed=3)
    wrong_rule = (noisy[:, 2:2 * k + 2:2] != lang.rule[noisy[:, 1:2 * k + 1:2]]).float().mean()
    wrong_copy = (noisy[:, 2 * k + 2:] != noisy[:, 1:2 * k + 1:2]).float().mean()
    for share in (wrong_rule, wrong_copy):  # 10% replaced, 1/8 of those by the right symbol
        assert abs(float(share) - 0.1 * 7 / 8) < 0.01


def test_private_generators_only(one_thread):
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    a = make_sequences(8, seed=5)
    model = TinyTransformer(Language().vocab, Language().length, width=16, heads=2, seed=1)
    small = replace(SCALES["ci"], num_train=64, train_steps=3, train_batch=8, width=16, heads=2)
    trained, _ = train_lm(Language(), small, seed=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1]) and random.getstate() == python_state
    assert torch.equal(a, make_sequences(8, seed=5)) and not torch.equal(a, make_sequences(8, seed=6))
    again = TinyTransformer(Language().vocab, Language().length, width=16, heads=2, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    trained_again, _ = train_lm(Language(), small, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), trained_again.parameters()))
    assert per_token_loss(model, a).shape == (8, Language().length - 1)


def test_separation_numbers_tell_groups_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    blocks = (labels[:, None] == labels[None, :]).astype(float)
    noise = rng.normal(size=(60, 60)) * 0.2
    R = np.clip(0.6 * blocks + (noise + noise.T) / 2, -1, 1)
    np.fill_diagonal(R, 1.0)
    good = separation_numbers(R, labels)
    assert good["knn_purity"] > 0.95 and good["pair_auc"] > 0.95 and good["silhouette"] > 0.3
    assert abs(good["knn_chance"] - 19 / 59) < 0.05
    shuffled = separation_numbers(R, rng.permutation(labels))
    assert abs(shuffled["knn_purity"] - shuffled["knn_chance"]) < 0.12 and abs(shuffled["pair_auc"] - 0.5) < 0.1


def test_token_kernel_pipeline(one_thread):
    """Token rows, deterministic, and the token-level R groups the tokens far above chance (and
    tells rule from copy tokens, which the loss at w* cannot); the sequence-level R cannot."""
    from conftest import require_devinterp

    require_devinterp(2)
    scale = replace(SCALES["ci"], num_draws=60)
    first = run_token_kernel(scale, seed=0)
    kernel, n = first.kernel, first.numbers
    T = Language().length - 1
    assert kernel.num_samples == scale.num_probe * T == len(first.groups)
    assert kernel.token_positions.shape == (scale.num_probe * T, 2)
    assert kernel.token_positions[:T].tolist() == [[0, t] for t in range(1, T + 1)]
    assert tuple(kernel.input_ids.shape) == (scale.num_probe, T + 1)
    assert first.dataset.influences.dims == ("batch_1", "batch_2", "target_position", "target_position_T")
    assert sum(kernel.draws_per_chain.values()) == scale.num_chains * scale.num_draws
    assert n["loss/random"] > 1.8 and n["loss/rule"] < 0.8 and n["loss/copy"] < 0.8  # it learned the language
    assert n["all/token/knn_purity"] > n["all/token/knn_chance"] + 0.3
    assert n["rule_vs_copy/token/knn_purity"] > n["rule_vs_copy/loss/knn_purity"] + 0.15
    assert n["all/sequence/knn_purity"] < n["all/sequence/knn_chance"] + 0.05
    print({k: round(v, 3) for k, v in n.items() if isinstance(v, float)})


def test_token_kernel_pipeline_is_deterministic(one_thread):
    from conftest import require_devinterp

    require_devinterp(2)
    tiny = replace(SCALES["ci"], num_train=256, train_steps=30, num_draws=8, num_burnin_steps=2)
    first, again = run_token_kernel(tiny, seed=1), run_token_kernel(tiny, seed=1)
    np.testing.assert_array_equal(again.R, first.R)
    np.testing.assert_array_equal(again.kernel.token_positions.numpy(), first.kernel.token_positions.numpy())
    assert {k: v for k, v in again.numbers.items() if not k.startswith("seconds")} == \
        {k: v for k, v in first.numbers.items() if not k.startswith("seconds")}
    other = run_token_kernel(tiny, seed=2)
    assert not np.array_equal(other.R, first.R)
