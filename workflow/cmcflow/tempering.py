"""Prior tempering for consensus Monte Carlo.

Each of the K shards targets  p(θ)^(1/K) · p(y_s | θ),  so that the product of the K
subposteriors is the full posterior  p(θ) · Π_s p(y_s | θ).
"""

from __future__ import annotations

from numpyro.primitives import Messenger


class temper_priors(Messenger):
    """Scale the log density of every *latent* sample site by ``power`` (= 1/K).

    NumPyro's ``handlers.scale`` scales observed sites too; this handler leaves observed
    sites (the likelihood, and ``numpyro.factor`` terms) untouched and tempers every prior,
    whatever its family, so no prior can be left untempered. For a Normal(μ, σ) prior the
    tempered density is Normal(μ, σ·√K) up to a constant; for HalfNormal(σ), HalfNormal(σ·√K).

    Usage: ``temper_priors(model, power=1 / K)`` is a model.
    """

    def __init__(self, fn=None, power: float = 1.0):
        if not power > 0:
            raise ValueError(f"tempering power must be positive, got {power}")
        self.power = power
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.power if msg.get("scale") is None else self.power * msg["scale"]
