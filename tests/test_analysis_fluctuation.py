"""Singular fluctuation and probe LLC: the formula, and the answer of a regular model.

Linear regression y = x·w₀ + ε, ε ~ N(0, 1), with d parameters and ℓ = ½(y − x·w)² (the
Gaussian NLL up to a constant) is regular: at β = 1 its posterior is N(ŵ, (XᵀX)⁻¹), so

    V = Σ_i Var_w[ℓ_i] = Σ_i (r_i² h_i + ½ h_i²) ≈ d,   h_i = x_iᵀ(XᵀX)⁻¹x_i,  r_i = y_i − x_i·ŵ
    ν = β V / 2 ≈ d / 2,       λ = nβ (E_w[L̄_n] − L̄_n(ŵ)) = ½ Σ_i h_i = d / 2.
"""

import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from devinterp_losskernel import LossKernel, estimate_loss_kernel
from devinterp_losskernel.analysis import SingularFluctuation, probe_llc, singular_fluctuation

from conftest import require_devinterp


def make_kernel(variance, mean=None, init_loss=None, metadata=None, num_draws=100):
    variance = torch.as_tensor(variance, dtype=torch.float64)
    n = variance.shape[0]
    return LossKernel(covariance=torch.diag(variance), variance=variance,
                      mean=torch.zeros(n, dtype=torch.float64) if mean is None else torch.as_tensor(mean),
                      init_loss=init_loss, num_draws=num_draws, metadata=metadata or {})


def test_formula_with_the_whole_training_set():
    kernel = make_kernel([1.0, 2.0, 3.0, 6.0])
    result = singular_fluctuation(kernel, nbeta=8.0, num_train=4)
    assert isinstance(result, SingularFluctuation)
    assert result.beta == 2.0  # β = nβ / n
    assert result.V == 12.0  # the trace
    assert result.nu == 12.0  # β V / 2
    assert result.num_probe_train == 4 and result.stderr == 0.0  # no subsampling error


def test_formula_with_a_probe_subset_and_test_samples():
    variance = np.array([1.0, 2.0, 3.0, 6.0, 100.0])
    is_train = np.array([True, True, True, True, False])  # the last probe sample is a test sample
    result = singular_fluctuation(make_kernel(variance), nbeta=50.0, num_train=100, train_mask=is_train)
    assert result.num_probe_train == 4
    assert result.V == pytest.approx(100 * 3.0)  # n · mean over the probe's training samples
    assert result.beta == 0.5
    assert result.nu == pytest.approx(0.5 * 300 / 2)
    # standard error of the mean of 4 out of 100, finite-population corrected
    se_V = 100 * np.std(variance[:4], ddof=1) / 2 * np.sqrt(1 - 4 / 100)
    assert result.V_stderr == pytest.approx(se_V)
    assert result.stderr == pytest.approx(0.5 * se_V / 2)
    # a plain covariance matrix works the same; torch masks too
    again = singular_fluctuation(np.diag(variance), nbeta=50.0, num_train=100, train_mask=torch.tensor(is_train))
    assert again == result


def test_defaults_come_from_the_kernel_metadata():
    meta = {"sampler": {"nbeta": 30.0, "lr": 1e-3}, "settings": {"num_train": 10}}
    kernel = make_kernel(np.full(10, 0.5), mean=np.full(10, 1.25), init_loss=torch.ones(10), metadata=meta)
    assert singular_fluctuation(kernel).nu == pytest.approx(3.0 * 5.0 / 2)
    assert probe_llc(kernel) == pytest.approx(30.0 * 0.25)
    assert probe_llc(kernel, nbeta=10.0) == pytest.approx(2.5)


def test_bad_inputs_name_the_argument():
    kernel = make_kernel([1.0, 2.0])
    with pytest.raises(ValueError, match="nbeta must be given"):
        singular_fluctuation(kernel, num_train=2)
    with pytest.raises(ValueError, match="num_train must be given"):
        singular_fluctuation(kernel, nbeta=2.0)
    with pytest.raises(ValueError, match="nbeta must be a positive finite number"):
        singular_fluctuation(kernel, nbeta=-1.0, num_train=2)
    with pytest.raises(ValueError, match="num_train must be a positive int"):
        singular_fluctuation(kernel, nbeta=1.0, num_train=2.5)
    with pytest.raises(ValueError, match="num_train must be at least the number of training samples in the probe"):
        singular_fluctuation(kernel, nbeta=1.0, num_train=1)
    with pytest.raises(ValueError, match="train_mask must be a boolean vector of length n=2"):
        singular_fluctuation(kernel, nbeta=1.0, num_train=2, train_mask=[True])
    with pytest.raises(ValueError, match="train_mask must mark at least one"):
        singular_fluctuation(kernel, nbeta=1.0, num_train=2, train_mask=[False, False])
    with pytest.raises(ValueError, match="kernel must be estimated from at least 2 draws"):
        singular_fluctuation(make_kernel([1.0, 2.0], num_draws=1), nbeta=1.0, num_train=2)
    with pytest.raises(ValueError, match="kernel.init_loss must hold the probe losses at w"):
        probe_llc(kernel, nbeta=1.0)
    with pytest.raises(ValueError, match="kernel must be a LossKernel"):
        probe_llc(np.eye(2), nbeta=1.0)


class WholeBatches(Dataset):
    """Indexes a whole batch at once (DataLoader calls __getitems__), so a full-batch SGLD step
    does not collate n single samples."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices)
        return self.x[indices], self.y[indices]


def _keep_batch(batch):
    return batch


def _half_squared_error(model, batch):
    return 0.5 * (model(batch[0]).squeeze(-1) - batch[1]) ** 2


def _mean_half_squared_error(model, batch):
    return _half_squared_error(model, batch).mean()


@pytest.mark.filterwarnings("ignore::UserWarning:devinterp")  # its advice on burn-in and batches
def test_regular_model_has_nu_and_llc_equal_to_half_the_dimension():
    require_devinterp(1)
    n, d, gamma, lr = 2000, 10, 1.0, 4e-5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    w_hat = torch.linalg.lstsq(x.double(), y.double()[:, None]).solution[:, 0]
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_hat.float()[None])  # the least-squares optimum w*
    # Full-batch SGLD: no minibatch noise; nβ = n gives β = 1. Step size: ε·nβ·λ_max(XᵀX/n)/2
    # ≈ 0.05, small enough that the Euler discretisation inflates the variance by ~2%
    # yet mixing within ~25 steps; γ = 1 ≪ n barely changes the posterior.
    loader = DataLoader(WholeBatches(x, y), batch_size=n, shuffle=False, collate_fn=_keep_batch)
    # thousands of tiny ops: one thread is ~3× faster than two on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        kernel = estimate_loss_kernel(
            model, loader, (x, y), loss_fn=_half_squared_error, evaluate=_mean_half_squared_error,
            num_chains=4, num_draws=1000, num_burnin_steps=100, lr=lr, nbeta=float(n),
            localization=gamma, seed=0, probe_batch_size=n, verbose=False,
            mode="diagonal",  # the whole training set as probe, O(n) memory: ν summed, not extrapolated
        )
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    result = singular_fluctuation(kernel)  # nβ and n from the kernel's metadata
    assert result.beta == 1.0 and result.num_train == n and result.num_probe_train == n
    assert result.method == "exact" and result.stderr == 0.0 and kernel.is_diagonal
    assert kernel.metadata["singular_fluctuation_method"] == "exact"
    llc = probe_llc(kernel)
    # this data set's own answer (E_D[V] = d is its expectation over data sets), for the
    # posterior the discretised chain samples: per eigenvalue a of XᵀX + γI, variance 1/(a(1 − εa/4))
    X, r = x.double().numpy(), (y.double() - x.double() @ w_hat).numpy()
    eigval, eigvec = np.linalg.eigh(X.T @ X + gamma * np.eye(d))
    h = np.einsum("ij,jk,ik->i", X, (eigvec / (eigval * (1 - lr * eigval / 4))) @ eigvec.T, X)
    exact_nu, exact_llc = np.sum(r**2 * h + 0.5 * h**2) / 2, h.sum() / 2
    print(f"\nnu={result.nu:.3f} (this data set: {exact_nu:.3f}, d/2 = {d / 2}); probe LLC={llc:.3f} "
          f"(this data set: {exact_llc:.3f}); devinterp llc/mean={kernel.metadata['llc/mean']:.3f}; "
          f"{seconds:.1f} s")
    assert result.nu == pytest.approx(d / 2, rel=0.25)
    assert result.nu == pytest.approx(exact_nu, rel=0.15)
    assert llc == pytest.approx(d / 2, rel=0.25)
    assert llc == pytest.approx(exact_llc, rel=0.15)
    # the probe is the full batch, so devinterp's LLC of the same draws is the same number
    assert kernel.metadata["llc/mean"] == pytest.approx(llc, rel=0.01)


def test_an_mse_loss_needs_its_scale_for_watanabes_nu_and_unseen_samples_are_extrapolated_over():
    """ℓ = (y − x·w)² with noise variance σ² is 2σ² · NLL + const: from exact posterior draws of
    exp(−nβ/n · Σ ℓ) (no SGLD), ν/loss_scale is the regular model's d/2; ν/loss_scale² would be d."""
    rng = np.random.default_rng(0)
    n, d, sigma2, draws = 1000, 4, 0.25, 4000
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + rng.normal(scale=np.sqrt(sigma2), size=n)
    w_hat = np.linalg.lstsq(x, y, rcond=None)[0]
    precision = 2.0 * x.T @ x  # exp(−Σ (y − x·w)²): nβ = n, so β = 1 in MSE units
    w = w_hat + rng.normal(size=(draws, d)) @ np.linalg.cholesky(np.linalg.inv(precision)).T
    losses = (y - w @ x.T) ** 2  # [draws, n]
    variance = losses.var(axis=0, ddof=1)
    raw = singular_fluctuation(make_kernel(variance), nbeta=float(n), num_train=n)
    scaled = singular_fluctuation(make_kernel(variance), nbeta=float(n), num_train=n, loss_scale=2 * sigma2)
    assert scaled.nu == pytest.approx(raw.nu / (2 * sigma2), rel=1e-12) and scaled.V == raw.V
    assert scaled.nu == pytest.approx(d / 2, rel=0.1) and scaled.loss_scale == 0.5
    assert "Watanabe" in scaled.meaning and "loss_scale" in scaled.meaning
    # recorded in the metadata, it is the default
    kernel = make_kernel(variance, metadata={"sampler": {"nbeta": float(n)}, "settings": {"num_train": n},
                                             "loss_scale": 2 * sigma2})
    assert singular_fluctuation(kernel).nu == scaled.nu
    with pytest.raises(ValueError, match="loss_scale must be a positive finite number"):
        singular_fluctuation(kernel, loss_scale=-1.0)

    # a minibatch-mode kernel: samples seen fewer than twice have no variance; ν extrapolates over them
    visits = np.where(np.arange(n) % 10 == 0, 1, 5)
    holes = np.where(visits < 2, np.nan, variance)
    minibatch = LossKernel(covariance=None, mean=torch.zeros(n, dtype=torch.float64),
                           variance=torch.as_tensor(holes), num_draws=draws, visits=torch.as_tensor(visits),
                           metadata={"mode": "minibatch", "sampler": {"nbeta": float(n)}, "num_train": n})
    f = singular_fluctuation(minibatch)
    assert f.unseen == n // 10 and f.num_probe_train == n - n // 10 and f.method == "extrapolated"
    assert f.nu == pytest.approx(float(n) / n / 2 * n * np.nanmean(holes), rel=1e-12)
    with pytest.raises(ValueError, match="must be finite"):  # NaN only where a sample was seen fewer than twice
        singular_fluctuation(LossKernel(covariance=None, mean=torch.zeros(n, dtype=torch.float64),
                                        variance=torch.as_tensor(np.where(visits < 2, variance, np.nan)),
                                        num_draws=draws, visits=torch.as_tensor(visits), metadata=minibatch.metadata))
