"""The second-order term of consensus (``combine.second_order``) against full-data NUTS where
shards are small: simulated regressions (logistic; linear, Poisson and negative binomial,
whose scale parameters are skewed) with 50 to 800 rows per shard.

Real data, where the term matters most (shards that disagree beyond the model), are bench R
(``real_data.py``). Here the model describes every shard, so plain consensus is off only by
the shards' skew, which grows as the shards shrink, and so does the expansion's remainder:
this measures where the term helps, where it does not, and whether combine's guard (the
largest expansion ratio ρ_s at most :data:`~cmcflow.second_order.MAX_EXPANSION_RATIO`)
keeps it from the cases it would make worse.

Every case in this process, as the stages run it: each shard sampled by
:func:`cmcflow.sample.sample_run` (4 chains on 4 devices, 500 + 1,000 draws, priors tempered
to 1/K, the third derivatives with the Hessian), combined by
:func:`cmcflow.combine.combine_shards` with the default Hessian weights, without and with the
term (the same shard runs), against full-data NUTS (the same settings) on every row; error
of each unconstrained mean in full-data sd, the largest over the parameters; and the
importance correction from each combination's proposal (:func:`cmcflow.combine.draw_proposal`,
every shard's log-likelihood, :func:`cmcflow.correct.correct_draws`, the config's defaults):
its error, k̂ and effective sample size, the result a user reads. One run per case. And
what the term costs a sample job: the Hessian alone and with the third derivatives on a P4
shard (logistic, 125,000 rows x 20 features, the job's layout and default
likelihood), first call (tracing and compiling) and the median of 3 after it.

Usage: python bench/second_order.py [--tables-only]
Writes bench/results/second_order.json and .md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import RESULTS, write_results

from cmcflow.config import schema, schema_default
from cmcflow.jaxenv import configure_jax

#: (model, rows, features, K, data seed): rows per shard 50 to 800
CASES = [
    ("logistic", 800, 3, 16, 2),
    ("logistic", 1600, 4, 32, 3),
    ("logistic", 800, 2, 8, 8),
    ("logistic", 1600, 3, 16, 4),
    ("logistic", 3200, 3, 32, 5),
    ("logistic", 1200, 3, 8, 6),
    ("logistic", 2400, 5, 16, 7),
    ("logistic", 3200, 5, 16, 10),
    ("logistic", 6400, 3, 32, 11),
    ("logistic", 1600, 3, 8, 2),
    ("logistic", 6400, 5, 8, 9),
    # more seeds at 100 rows per shard, where the term did worst
    ("logistic", 800, 3, 8, 12),
    ("logistic", 1600, 2, 16, 13),
    ("logistic", 3200, 4, 32, 14),
    # the other families, whose scale parameters (sigma, concentration) are skewed
    ("linear", 800, 3, 8, 31),
    ("linear", 1600, 3, 16, 32),
    ("linear", 1600, 5, 8, 33),
    ("linear", 3200, 5, 16, 34),
    ("poisson", 1600, 3, 16, 41),
    ("poisson", 1600, 3, 8, 42),
    ("negative_binomial", 1600, 3, 16, 21),
    ("negative_binomial", 1600, 3, 8, 22),
    ("negative_binomial", 3200, 3, 16, 23),
    ("negative_binomial", 3200, 3, 8, 24),
]
MODELS = ("logistic", "linear", "poisson", "negative_binomial")
SETTINGS = {"num_warmup": 500, "num_samples": 1000, "target_accept_prob": 0.8, "max_tree_depth": 10}
#: The importance correction's settings: the config's defaults
CORRECT = {key: schema_default("correct", key) for key in ("draws", "proposal", "df", "seed")}
DEVICES = 4


def measure(model: str, rows: int, features: int, num_shards: int, seed: int) -> dict:
    """Plain and second-order consensus of one simulated regression of ``model`` against
    full-data NUTS: largest error (sd) and its parameter, and combine's record of the term."""
    from cmcflow.combine import CombineSettings, combine_shards, draw_proposal
    from cmcflow.consensus import constrained_sites, flatten, layout_sites
    from cmcflow.correct import correct_draws
    from cmcflow.featurize import padded_size
    from cmcflow.likelihood import log_likelihood_at
    from cmcflow.models import get_model, resolve_options
    from cmcflow.runs import element_labels
    from cmcflow.sample import NutsSettings, sample_features
    from cmcflow.shard import split_rows
    from cmcflow.transforms import model_kwargs

    spec = get_model(model)
    options = resolve_options(spec, {})
    settings = NutsSettings(**SETTINGS, dense_mass=False)
    table, _ = spec.simulate(rows, seed, features=features)
    columns = {"features": table[[f"x{i}" for i in range(features)]].to_numpy(), "label": table["y"].to_numpy()}
    parts = split_rows(rows, num_shards, seed=0)
    pad_to = padded_size([len(part) for part in parts], 64)
    runs, shard_kwargs = [], []
    for shard, part in enumerate(parts):
        features_of = spec.featurize({role: values[part] for role, values in columns.items()}, pad_to, {})
        run, _ = sample_features(
            spec,
            features_of,
            options,
            num_shards=num_shards,
            shard=shard,
            seed=11,
            settings=settings,
            chains=DEVICES,
            third_derivatives=True,
        )
        runs.append(run)
        shard_kwargs.append(model_kwargs(features_of, options))
    full, _ = sample_features(
        spec,
        spec.featurize(columns, padded_size([rows], 64), {}),
        options,
        num_shards=1,
        shard=-1,
        seed=11,
        settings=settings,
        chains=DEVICES,
    )

    def flat(run) -> np.ndarray:
        """A run's unconstrained draws ``(chains × draws, D)``."""
        group = run.unconstrained_posterior
        return flatten({name: group[name].values.reshape(-1, *group[name].shape[2:]) for name in group}, list(group))

    reference = flat(full)
    group = full.unconstrained_posterior
    labels = [label for name in group for label in element_labels(name, group[name].shape[2:])]

    def largest_error(mean: np.ndarray) -> dict:
        error = np.abs(mean - reference.mean(axis=0)) / reference.std(axis=0)
        return {"max_mean_error_sd": float(error.max()), "worst_parameter": labels[int(np.argmax(error))]}

    result = {"model": model, "rows": rows, "features": features, "num_shards": num_shards, "seed": seed}
    for label, second_order in (("plain", False), ("second_order", True)):
        combine = CombineSettings("consensus", 0, 0.0, None, 1.0, "fail", "hessian", second_order)
        combination = combine_shards(runs.__getitem__, num_shards, spec.numpyro_model, shard_kwargs[0], combine)
        result[label] = largest_error(flat(combination.idata).mean(axis=0))
        # the correction from this combination's proposal, as the reweight and correct jobs make it
        proposal = draw_proposal(spec.numpyro_model, shard_kwargs[0], combination.gaussian, CORRECT)
        constrained = constrained_sites(proposal)
        latent = {name: constrained[name] for name in layout_sites(str(proposal["layout"]))}
        log_likelihoods = [
            log_likelihood_at(spec.numpyro_model, kwargs, latent, rows=len(part))
            for kwargs, part in zip(shard_kwargs, parts)
        ]
        figures = correct_draws(
            proposal, log_likelihoods, proposal["log_prior"], CORRECT["draws"], CORRECT["seed"]
        ).figures
        result[f"{label}_corrected"] = largest_error(np.array(figures["unconstrained_mean"])) | {
            key: figures[key] for key in ("khat", "effective_sample_size")
        }
        if second_order:
            term = result["term"] = combination.record["second_order"]
            if not term["applied"]:  # what the term would have given: the product's mean moved by δ
                shift = np.array([term["shift_sd"][name] for name in labels])
                product_sd = np.sqrt(np.diag(combination.gaussian["covariance"]))
                result["refused_term"] = largest_error(flat(combination.idata).mean(axis=0) - shift * product_sd)
    print(json.dumps({key: value for key, value in result.items() if key != "term"}), flush=True)
    return result


#: A P4 shard: 10⁶ rows over K = 8, 20 features
COST_SHARD = (125_000, 20)


def derivative_seconds() -> dict:
    """Seconds of :func:`cmcflow.transforms.potential_derivatives` on a :data:`COST_SHARD`
    at its simulated coefficients, without and with the third derivatives: first call
    and median (min–max) of 3 after it."""
    import time

    from common import spread

    from cmcflow.fused import enable_in_job
    from cmcflow.models import get_model, resolve_options
    from cmcflow.sample import tempered
    from cmcflow.transforms import model_kwargs, potential_derivatives

    rows, features = COST_SHARD
    spec = get_model("logistic")
    fused = enable_in_job(True, None)
    table, truth = spec.simulate(rows, 1, features=features)
    columns = {"features": table[[f"x{i}" for i in range(features)]].to_numpy(), "label": table["y"].to_numpy()}
    kwargs = spec.device_layout(model_kwargs(spec.featurize(columns, rows, {}), resolve_options(spec, {})))
    position = {"intercept": np.asarray(truth["intercept"]), "beta": np.asarray(truth["beta"])}
    model = tempered(spec.numpyro_model, 1 / 8)
    result = {"rows": rows, "features": features, "fused_likelihood": fused}
    for label, third in (("hessian", False), ("with_third", True)):
        started = time.perf_counter()
        potential_derivatives(model, kwargs, position, third=third)
        first = time.perf_counter() - started
        repeats = []
        for _ in range(3):
            started = time.perf_counter()
            potential_derivatives(model, kwargs, position, third=third)
            repeats.append(time.perf_counter() - started)
        result[label] = {"first_call": first, **spread(repeats)}
    print(json.dumps(result), flush=True)
    return result


def refused_cell(case: dict) -> str:
    """Where combine refused the term: the error it would have given, in brackets."""
    if "refused_term" not in case:
        return ""
    return f" [{case['refused_term']['max_mean_error_sd']:.3f}]"


def corrected_cell(corrected: dict) -> str:
    """The importance correction's largest error, k̂ and effective sample size."""
    return f"{corrected['max_mean_error_sd']:.3f}; {corrected['khat']:.2f}; {corrected['effective_sample_size']:.0f}"


def figures(cases: list[dict], label: str) -> str:
    """The cases' largest errors under ``label``, comma-separated."""
    return ", ".join(f"{case[label]['max_mean_error_sd']:.3f}" for case in cases)


def by_size(cases: list[dict], size: int) -> str:
    """How the term did on the ``cases`` of ``size`` rows per shard: better in how many, and
    the largest error without and with it."""
    sized = [case for case in cases if case["rows"] // case["num_shards"] == size]
    better = sum(case["second_order"]["max_mean_error_sd"] < case["plain"]["max_mean_error_sd"] for case in sized)
    return (
        f"{size} rows, better in {better} of {len(sized)} (largest error "
        f"{max(case['plain']['max_mean_error_sd'] for case in sized):.3f} -> "
        f"{max(case['second_order']['max_mean_error_sd'] for case in sized):.3f} sd)"
    )


def family_sentence(cases: list[dict]) -> str:
    """How the term did on one model family's ``cases``: where it applied, better or worse, by
    rows per shard; where it was refused, what it would have given."""
    from cmcflow.second_order import MAX_EXPANSION_RATIO

    applied = [case for case in cases if case["term"]["applied"]]
    refused = [case for case in cases if not case["term"]["applied"]]
    better = sum(case["second_order"]["max_mean_error_sd"] < case["plain"]["max_mean_error_sd"] for case in applied)
    return (
        f"- **{model_of(cases[0])}**: applied in {len(applied)} of {len(cases)} cases, smaller error in {better}, "
        f"larger in {len(applied) - better}; by rows per shard: "
        + "; ".join(by_size(applied, size) for size in sorted({case["rows"] // case["num_shards"] for case in applied}))
        + (
            f". Refused in {len(refused)} (ρ > {MAX_EXPANSION_RATIO}): plain {figures(refused, 'plain')} sd, where "
            f"the term would have given {figures(refused, 'refused_term')}."
            if refused
            else "."
        )
    )


def model_of(case: dict) -> str:
    """The case's model (cases recorded before other families were measured are logistic)."""
    return case.get("model", "logistic")


def write_tables(cases: list[dict], cost: dict, measured: str | None = None) -> None:
    from cmcflow.second_order import MAX_EXPANSION_RATIO

    applied = [case for case in cases if case["term"]["applied"]]
    table = [
        "# The second-order term against full-data NUTS: simulated regressions with 50 to 800 rows per shard "
        "(one run each)",
        "",
        "Largest |mean − full-data mean| over the parameters (unconstrained), in full-data sd; the same shard runs "
        "combined without and with `combine.second_order` (Hessian weights). ρ: the largest shard's expansion "
        f"ratio; above {MAX_EXPANSION_RATIO} combine keeps the plain product (second order is then the plain "
        "error, and the error the term would have given follows it in brackets). Real data: "
        "[real_data.md](real_data.md).",
        "",
        "| model | rows | features | K | rows per shard | plain (sd) | second order (sd) | applied | ρ | shift (sd) "
        "| corrected from plain: error (sd); k-hat; ESS | corrected from second order: error (sd); k-hat; ESS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {model_of(case)} | {case['rows']:,} | {case['features']} | {case['num_shards']} | "
            f"{case['rows'] // case['num_shards']} | "
            f"{case['plain']['max_mean_error_sd']:.3f} ({case['plain']['worst_parameter']}) | "
            f"{case['second_order']['max_mean_error_sd']:.3f} ({case['second_order']['worst_parameter']})"
            f"{refused_cell(case)} | "
            f"{'yes' if case['term']['applied'] else 'no'} | {max(case['term']['expansion_ratio'].values()):.2f} | "
            f"{case['term']['max_abs_shift_sd']:.3f} | {corrected_cell(case['plain_corrected'])} | "
            f"{corrected_cell(case['second_order_corrected'])} |"
            for case in sorted(
                cases,
                key=lambda case: (MODELS.index(model_of(case)), case["rows"] // case["num_shards"], case["num_shards"]),
            )
        ],
        "",
        *[
            family_sentence(family)
            for model in MODELS
            if (family := [case for case in cases if model_of(case) == model])
        ],
    ]
    more_ess = sum(
        case["second_order_corrected"]["effective_sample_size"] > case["plain_corrected"]["effective_sample_size"]
        for case in applied
    )
    table += [
        "",
        "The importance correction (the config's `correct` defaults: 4,096 Sobol' draws of the Gaussian proposal, "
        "every shard's log-likelihood at each, PSIS) from each combination's proposal: the term moves the proposal "
        "with the combination. Largest corrected error over the cases, from plain / second order: "
        f"{max(case['plain_corrected']['max_mean_error_sd'] for case in cases):.3f} / "
        f"{max(case['second_order_corrected']['max_mean_error_sd'] for case in cases):.3f} sd; smallest ESS "
        f"{min(case['plain_corrected']['effective_sample_size'] for case in cases):.0f} / "
        f"{min(case['second_order_corrected']['effective_sample_size'] for case in cases):.0f} of "
        f"{CORRECT['draws']:,}; ESS larger with the term in {more_ess} of the {len(applied)} cases where it applied.",
    ]
    hessian, with_third = cost["hessian"], cost["with_third"]
    table += [
        "",
        f"Cost to a sample job, on a P4 shard ({cost['rows']:,} rows x {cost['features']} features, "
        f"{'the fused likelihood' if cost['fused_likelihood'] else 'XLA'}): the Hessian alone "
        f"{hessian['median']:.3f} s ({hessian['min']:.3f}–{hessian['max']:.3f}; first call "
        f"{hessian['first_call']:.1f} s), with the third derivatives {with_third['median']:.3f} s "
        f"({with_third['min']:.3f}–{with_third['max']:.3f}; first call {with_third['first_call']:.1f} s, which a "
        "later job of the same shapes loads from the compilation cache's stored programs).",
    ]
    write_results("second_order", {"cases": cases, "cost": cost}, table, measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables-only", action="store_true", help="rewrite the table from the JSON results present")
    args = parser.parse_args()
    if args.tables_only:
        recorded = json.loads((RESULTS / "second_order.json").read_text())
        write_tables(recorded["cases"], recorded["cost"], recorded["written"])
        return
    configure_jax(
        devices=DEVICES,
        precision=schema()["properties"]["jax"]["properties"]["precision"]["default"],
        compilation_cache_dir=None,
    )
    cost = derivative_seconds()
    write_tables([measure(*case) for case in CASES], cost)


if __name__ == "__main__":
    main()
