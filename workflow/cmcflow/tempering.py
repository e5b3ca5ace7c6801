"""Prior tempering for consensus Monte Carlo.

Each of the K shards targets  p(θ)^(1/K) · p(y_s | θ),  so that the product of the K
subposteriors is the full posterior  p(θ) · Π_s p(y_s | θ).

Consensus Monte Carlo multiplies the shards' densities in the unconstrained space, θ = T(z),
where a density carries the Jacobian of the support transform: the full posterior there is
p(T z) |J_T(z)| Π_s p(y_s | T z). So the Jacobian is part of the prior the shards share, and
is tempered with it: each shard targets (p(T z) |J_T(z)|)^(1/K) p(y_s | T z), whose product is
the full posterior in z. Left whole in every shard, the product would hold K Jacobians: for a
scale σ = e^z that adds (K − 1) z to the log density and moves the combination's log σ up by
(K − 1) times its posterior variance, (K − 1) s in units of its posterior sd s (0.17 sd at
K = 8 for a linear regression of 800 rows, where s ≈ 0.025).
"""

from __future__ import annotations

from numpyro.primitives import Messenger


def jacobian_site(name: str) -> bool:
    """Whether a site of this name is the Jacobian factor NumPyro adds for a latent site
    when it evaluates a model at unconstrained values (``_<site>_log_det``, an observed
    site of ``numpyro.factor``)."""
    return name.startswith("_") and name.endswith("_log_det")


class temper_priors(Messenger):
    """Scale the log density of every *latent* sample site, and of its Jacobian factor in the
    unconstrained space, by ``power`` (= 1/K).

    NumPyro's ``handlers.scale`` scales observed sites too; this handler leaves observed
    sites (the likelihood, and ``numpyro.factor`` terms) untouched and tempers every prior,
    whatever its family, so no prior can be left untempered. For a Normal(μ, σ) prior the
    tempered density is Normal(μ, σ·√K) up to a constant; for HalfNormal(σ), HalfNormal(σ·√K).
    NumPyro adds each constrained latent site's log |J| as an observed factor
    ``_<site>_log_det`` (:func:`jacobian_site`); it is tempered with the prior (module
    docstring), so a model's own ``numpyro.factor`` must not use such a name.

    Usage: ``temper_priors(model, power=1 / K)`` is a model.
    """

    def __init__(self, fn=None, power: float = 1.0):
        if not power > 0:
            raise ValueError(f"tempering power must be positive, got {power}")
        self.power = power
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and (not msg["is_observed"] or jacobian_site(msg["name"])):
            msg["scale"] = self.power if msg.get("scale") is None else self.power * msg["scale"]
