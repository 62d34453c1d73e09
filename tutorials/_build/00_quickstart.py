import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_nb import notebook, install_cell

INSTALL = install_cell()

cells = [
("md", '''
# Quickstart: the loss kernel beside the LLC

You already estimate the local learning coefficient (LLC) with devinterp. Add one callback
and the same SGLD draws give the **loss kernel** K(x, x′) = Cov_w[ℓ(x; w), ℓ(x′; w)] on a
probe set: per-sample loss variances (memorization scores; their sum is the empirical
variance behind the singular fluctuation) and correlations R between samples.

Here: an MLP memorizes scikit-learn's digits with 10% of the labels flipped. We run
devinterp 1.x's `estimate_learning_coeff_with_summary` with a `LossKernelCallback` and check
that the per-sample variance finds the flipped samples.

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/timaeus-research/devinterp-losskernel/blob/main/tutorials/00_quickstart.ipynb)
'''),
("code", INSTALL),
("code", '''
import os
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from devinterp.slt.sampler import estimate_learning_coeff_with_summary
from devinterp_losskernel import LossKernelCallback
from devinterp_losskernel.analysis import detection_auc, memorization_scores, probe_llc, singular_fluctuation
from devinterp_losskernel.demo import DemoConfig, digits_with_flipped_labels, train_memorizing_mlp
from devinterp_losskernel.plotting import plot_correlation_matrix, plot_memorization

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# "ci" runs a small version of every step (used by the test suite); "full" is the real thing.
SCALE = os.environ.get("LOSSKERNEL_TUTORIAL_SCALE", "full")
cfg = DemoConfig() if SCALE == "full" else DemoConfig(num_probe=300, num_chains=2, num_draws=80, num_burnin_steps=50)
print(DEVICE, SCALE, cfg)
'''),
("md", "## A memorizing model\n`flipped[i]` marks the training samples whose label was changed."),
("code", '''
x, y_true, y_train, flipped = digits_with_flipped_labels(cfg)
model = train_memorizing_mlp(x, y_train, cfg).to(DEVICE)
train_acc = (model(x.to(DEVICE)).argmax(1).cpu() == y_train).float().mean().item()
print(f"training accuracy on the noisy labels: {train_acc:.3f}  ({int(flipped.sum())} flipped)")
'''),
("md", '''
## The LLC run, with the loss-kernel callback added

The probe is the first `num_probe` training samples (a fixed order: a DataLoader without
shuffling, or plain tensors). devinterp hands the callback each draw's model; the callback
evaluates the probe in eval mode and folds the loss vector into a running covariance on the
model's device.
'''),
("code", '''
def evaluate(model, batch):
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)

probe = (x[: cfg.num_probe], y_train[: cfg.num_probe])
callback = LossKernelCallback(probe, labels=probe[1])
loader = DataLoader(TensorDataset(x, y_train), batch_size=cfg.batch_size, shuffle=True)

results = estimate_learning_coeff_with_summary(
    model, loader, callbacks=[callback], evaluate=evaluate,
    optimizer_kwargs=dict(lr=cfg.lr, nbeta=cfg.nbeta, localization=cfg.localization),
    num_chains=cfg.num_chains, num_draws=cfg.num_draws, num_burnin_steps=cfg.num_burnin_steps,
    device=DEVICE, seed=cfg.seed, verbose=False,
)
kernel = callback.kernel
print(kernel)
print("llc/mean", results["llc/mean"], "   keys added:", [k for k in results if k.startswith("loss_kernel/")])
'''),
("md", '''
## SLT quantities from the same run

- devinterp's LLC uses a minibatch loss at w*; the **paired probe LLC** nβ·(E_w[L̄_probe(w)] − L̄_probe(w*))
  uses the same probe samples before and after, so it lacks that noise.
- The **singular fluctuation** ν = β·V/2 with V = Σ_i Var_w[ℓ(x_i; w)] over the training set
  (estimated from the probe, a subset of it) and β = nβ/n.
'''),
("code", '''
fluct = singular_fluctuation(kernel, nbeta=cfg.nbeta, num_train=cfg.num_train)
print(f"LLC (devinterp, minibatch): {results['llc/mean']:.2f}")
print(f"LLC (paired, probe):        {probe_llc(kernel, nbeta=cfg.nbeta):.2f}")
print(f"singular fluctuation nu:    {fluct.nu:.2f}   (V = {fluct.V:.3g}, beta = {fluct.beta:.3g})")
'''),
("md", "## Memorization: flipped labels have large K(x, x)"),
("code", '''
is_flipped = flipped[: cfg.num_probe].numpy()
auc_variance = detection_auc(memorization_scores(kernel), is_flipped)
auc_loss = detection_auc(kernel.init_loss.numpy(), is_flipped)
print(f"ROC-AUC, per-sample variance: {auc_variance:.3f}   loss at w*: {auc_loss:.3f}")
assert auc_variance > 0.8, "the variance should find the memorized (flipped) samples"
plot_memorization(memorization_scores(kernel), is_flipped);
'''),
("md", "## The correlation matrix, samples sorted by label"),
("code", '''
order = torch.argsort(probe[1], stable=True).numpy()
plot_correlation_matrix(kernel, order=order, labels=probe[1].numpy());
'''),
("md", '''
## Next

- `estimate_loss_kernel(model, loader, probe, **preset("inception_imagenet").sampler_kwargs())`
  runs all of this in one call and keeps the LLC in `kernel.metadata`.
- `kernel.save("kernel.pt")`, `LossKernel.load(...)`, `kernel.to_xarray()`.
- The analyses in `devinterp_losskernel.analysis`: neighbours, task separation, CKA,
  taxonomic lift, UMAP of 1 − R.
'''),
]
notebook(cells, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "00_quickstart.ipynb"), devinterp_major=1)
