"""Write your own discrete-latent program: two code sites, a top-down prior, mixed families.

The model is plain Pyro plus ``probvq.code``. The top layer is inferred by stochastic quantisation,
the bottom layer by relaxed responsibilities (whose mixing weights are the top-down prior), by
stacking two families that each claim one site; then the diagnostics (importance-weighted bound,
PSIS k-hat) of the stacked pair. Run: ``python examples/two_level_program.py``.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from probvq import DATA_PLATE, Codebook, CodeSite, code
from probvq.config import RunConfig
from probvq.data import synthetic
from probvq.inference import RR, SQ, FamilyStack, diagnose, evaluate, fit


class TwoLevel(nn.Module):
    """z_top (4 x 4 grid, K=16) -> p(z_bottom | z_top) (7 x 7 grid, K=32) -> x (28 x 28, binary)."""

    def __init__(self) -> None:
        super().__init__()
        self.top = CodeSite("top", Codebook(16, 8, init="normal"), (4, 4))
        self.bottom = CodeSite("bottom", Codebook(32, 8, init="normal"), (7, 7))
        self.topdown = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8, 49 * 32))
        self.decoder = nn.Sequential(
            nn.Flatten(), nn.Linear(49 * 8, 256), nn.ReLU(), nn.Linear(256, 784)
        )
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 16 * 8 + 49 * 8)
        )

    @property
    def code_sites(self) -> list[CodeSite]:
        return [self.top, self.bottom]

    def bottom_prior(self, z_top: torch.Tensor) -> torch.Tensor:
        return self.topdown(z_top).view(-1, 7, 7, 32)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z_top = code(self.top, self.top.uniform_logits((x.shape[0],)))
            z_bottom = code(self.bottom, self.bottom_prior(z_top))
            logits = self.decoder(z_bottom).view_as(x)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(3), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            h = self.encoder(x)
            top_features = h[:, : 16 * 8].view(-1, 4, 4, 8)
            z_top = code(self.top, self.top.uniform_logits((x.shape[0],)), features=top_features)
            bottom_features = h[:, 16 * 8 :].view(-1, 7, 7, 8)
            code(self.bottom, self.bottom_prior(z_top), features=bottom_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pyro.set_rng_seed(args.seed)
    data = synthetic(n_train=3000, n_valid=300)
    train_x, valid_x = data.train.float(), data.valid.float()
    vae = TwoLevel()
    families = FamilyStack(SQ(vae.code_sites, claims=["top"]), RR(vae.code_sites, claims=["bottom"]))
    config = RunConfig(
        max_steps=args.steps, eval_every=max(1, args.steps // 5), seed=args.seed, quiet=True
    )
    for record in fit(vae, families, train_x, valid_x, config).history:
        valid = record["valid"]
        rates = {name: round(rate["mean"], 2) for name, rate in valid["rate"].items()}
        print(f"step {record['step']:4d}  exact ELBO {valid['exact_elbo']['mean']:8.2f}  rates {rates}")
    result = evaluate(vae, families, valid_x)
    print("perplexity per site:", {k: round(v, 1) for k, v in result["perplexity"].items()})
    summary = diagnose(vae, families, valid_x[:50], k=200, seed=args.seed).summary()
    iwae, khat = summary["iwae"], summary["pareto_khat"]
    print(
        f"IWAE_200 {iwae['mean']:.2f} (ELBO + {iwae['minus_exact_elbo']['mean']:.2f}), "
        f"PSIS k-hat > 0.7 for {100 * khat['share_above_0.7']:.0f}% of 50 images"
    )


if __name__ == "__main__":
    main()
