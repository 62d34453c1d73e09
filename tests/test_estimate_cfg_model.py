"""A plain model with a ``cfg.n_heads`` (e.g. the modular-arithmetic transformer) through
devinterp 2.x: devinterp takes such a model for a TransformerLens one and calls
``model.to(device, print_details=False)``; the runner hands devinterp a wrapper instead."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel import estimate_loss_kernel

from conftest import require_devinterp


class CfgModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(n_heads=2, d_model=8)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def test_a_plain_model_with_cfg_n_heads_samples_under_devinterp2_and_is_left_alone():
    require_devinterp(2)
    from devinterp.slt.sampler import is_transformer_lens_model

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CfgModel()
    assert is_transformer_lens_model(model)  # what made devinterp call model.to(…, print_details=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = set()

    def loss_fn(m, batch):  # the probe pass sees the user's model, not the wrapper
        seen.add(type(m))
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    kernel = estimate_loss_kernel(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), (x[:20], y[:20]),
                                  loss_fn=loss_fn, lr=1e-3, nbeta=10.0, localization=100.0, num_chains=2, num_draws=6,
                                  num_burnin_steps=2, seed=0, verbose=False)
    assert kernel.draws_per_chain == {0: 6, 1: 6} or dict(kernel.draws_per_chain) == {0: 6, 1: 6}
    assert seen == {CfgModel}
    assert type(model) is CfgModel and not hasattr(model, "model")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.isfinite(kernel.covariance).all()


def test_the_wrapper_is_only_used_where_devinterp_would_misread_the_model():
    from devinterp_losskernel.estimate import _not_transformer_lens

    plain = nn.Linear(2, 2)
    assert _not_transformer_lens(plain) == (plain, None)

    class LensLike(CfgModel):
        def to(self, *args, print_details=True, **kwargs):
            return super().to(*args, **kwargs)

    lens = LensLike()
    assert _not_transformer_lens(lens)[1] is None
    wrapped, unwrap = _not_transformer_lens(CfgModel())
    assert not hasattr(wrapped, "cfg") and isinstance(unwrap(wrapped), CfgModel)
    with pytest.raises(TypeError):
        CfgModel().to("cpu", print_details=False)
