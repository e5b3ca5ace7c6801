"""The sample stage: NUTS on one shard's features, with the prior tempered to the power 1/K.

One chain per virtual CPU device (``chain_method="parallel"``), or every chain on the
job's one GPU (``"vectorized"``: :func:`cmcflow.jaxenv.chain_layout`); the caller must have
run :func:`cmcflow.jaxenv.configure_jax` before importing this module.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
import numpyro
from numpyro.infer import MCMC, NUTS, init_to_uniform

from cmcflow import fused
from cmcflow.checkpoint import Checkpoint, SavedRun, run_key
from cmcflow.consensus import HESSIAN_MAX_PARAMETERS
from cmcflow.jaxenv import COMPILE_CLOCK, PRECISION
from cmcflow.models import ModelSpec, source_digest
from cmcflow.runs import Group, Run, diagnostics, draws_group, failed_run, is_transient, write_run
from cmcflow.screening import TREE_DEPTH_WARNING
from cmcflow.second_order import THIRD_DERIVATIVES_MAX_PARAMETERS
from cmcflow.tempering import temper_priors
from cmcflow.transforms import model_kwargs, potential_derivatives, split_static, unconstrain_draws

if TYPE_CHECKING:
    import arviz as az

log = logging.getLogger(__name__)

#: NUTS per-draw statistics kept in ``sample_stats`` (ArviZ adds ``tree_depth``).
EXTRA_FIELDS = ("diverging", "num_steps", "energy")
#: Without a model's own start, initial values are drawn uniformly in (-radius, radius) in
#: the unconstrained space, independently per chain, so chains start dispersed.
INIT_RADIUS = 2.0


@dataclass(frozen=True)
class NutsSettings:
    """NUTS settings of one analysis (the config's ``sample`` section)."""

    num_warmup: int
    num_samples: int
    target_accept_prob: float
    max_tree_depth: int
    dense_mass: bool
    #: draws per chain between checkpoints (0: no checkpoint); changes no draw
    checkpoint_every: int = 0


def sampling_key(seed: int, shard: int) -> jax.Array:
    """PRNG key of one sampling run: the analysis seed folded with the shard index.

    The full-data run uses ``shard = -1`` (folded as 2**32 - 1), distinct from every shard.
    """
    return jax.random.fold_in(jax.random.PRNGKey(seed), shard % 2**32)


@dataclass
class NutsDraws:
    """The draws of a NUTS run: ``samples`` ``{site: (chains, draws, …)}`` (latent and
    deterministic sites, constrained, and each latent site's unconstrained values under
    :data:`UNCONSTRAINED_PREFIX`), ``stats`` ``{field: (chains, draws)}`` (the
    :data:`EXTRA_FIELDS`), and ``resumed_draws``, the draws per chain read from a checkpoint
    (0: the run started afresh)."""

    samples: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    resumed_draws: int = 0

    def split(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``samples`` as the constrained sites and the latent sites' unconstrained values."""
        unconstrained = {
            name.removeprefix(UNCONSTRAINED_PREFIX): value
            for name, value in self.samples.items()
            if name.startswith(UNCONSTRAINED_PREFIX)
        }
        constrained = {name: value for name, value in self.samples.items() if not name.startswith(UNCONSTRAINED_PREFIX)}
        return constrained, unconstrained


#: The key prefix of a latent site's unconstrained values among a NUTS run's samples.
UNCONSTRAINED_PREFIX = "unconstrained:"


class NutsKeepingUnconstrained(NUTS):
    """NumPyro's NUTS whose draws carry, beside every site constrained, the latent sites'
    unconstrained values: the sampler's own position, which the stages after sample
    combine, kept in the sampling program rather than recomputed from the constrained
    draws by a program of its own."""

    def postprocess_fn(self, model_args, model_kwargs):
        constrain = super().postprocess_fn(model_args, model_kwargs)

        def constrained_and_unconstrained(position):
            return {**constrain(position), **{UNCONSTRAINED_PREFIX + name: value for name, value in position.items()}}

        return constrained_and_unconstrained


#: Alignment (bytes) of host memory that XLA's CPU client takes without a copy.
XLA_CPU_ALIGNMENT = 64


def aligned_host_array(value) -> np.ndarray:
    """``value`` copied into host memory aligned to :data:`XLA_CPU_ALIGNMENT` bytes. Every
    virtual CPU device takes such an array without a copy (``jax.device_put`` aliases it),
    so the chains of one program read one copy of the data (four copies, one per device,
    sample slower once they outgrow the cache: ``bench/results/shared_program.md``)."""
    value = np.asarray(value)
    buffer = np.empty(value.nbytes + XLA_CPU_ALIGNMENT, dtype=np.uint8)
    start = -buffer.ctypes.data % XLA_CPU_ALIGNMENT
    aligned = buffer[start : start + value.nbytes].view(value.dtype).reshape(value.shape)
    aligned[...] = value
    return aligned


class ParallelChains:
    """A NumPyro ``chain_method``: one chain per device (``jax.pmap``, as NumPyro's
    ``"parallel"``), with the model's data arrays passed to the program instead of closed
    over, so that a job's one :class:`~numpyro.infer.MCMC` (:data:`job_sampler`) traces its
    chains' program once and runs every shard of the same shapes with it (NumPyro's
    ``"parallel"`` traces, lowers and loads it again for every run), and so that the program
    is the same for every shard of a run's padded size: one job compiles it, the others load
    it from the persistent compilation cache (closed over, the data are constants of the
    program, and every shard's is new). The arrays reach the devices as one aliased host
    copy (:func:`aligned_host_array`).

    NumPyro calls it with ``partial(mcmc._single_chain_mcmc, args=…, kwargs=…, …)`` and maps
    the result over ``(rng_key, init_state, init_params)``."""

    def __init__(self):
        self._programs = {}

    def __call__(self, chain: functools.partial):
        others = {name: value for name, value in chain.keywords.items() if name not in ("args", "kwargs")}
        arrays, static = split_static(chain.keywords["kwargs"])
        if static is None:  # options that cannot key a program: NumPyro's own "parallel"
            return jax.pmap(chain)
        # what NumPyro's chain function reads from its MCMC when it is traced: which draws it keeps
        collection = tuple(sorted(chain.func.__self__._collection_params.items()))
        key = (chain.func, chain.keywords["args"], static, tuple(sorted(others.items())), collection)
        if key not in self._programs:

            def one_chain(map_args, arrays):
                return chain.func(map_args, args=chain.keywords["args"], kwargs={**arrays, **dict(static)}, **others)

            self._programs[key] = jax.pmap(one_chain, in_axes=(0, None))
        program = self._programs[key]
        shared = {name: aligned_host_array(value) for name, value in arrays.items()}
        return lambda map_args: program(map_args, shared)


@functools.cache
def tempered(model, power: float) -> temper_priors:
    """``temper_priors(model, power)``, one per job: one model object, so that its compiled
    programs (NUTS, the Hessian) are found again for the next shard."""
    return temper_priors(model, power=power)


def nuts_sampler(
    model,
    prior_power: float,
    settings: NutsSettings,
    num_chains: int,
    chain_method: str,
    num_samples: int,
    one_program: bool,
) -> MCMC:
    """NumPyro's MCMC of NUTS (:class:`NutsKeepingUnconstrained`) on ``temper_priors(model,
    prior_power)``. ``one_program``: the model's arguments are the program's
    (``jit_model_args``; with ``"parallel"`` chains, :class:`ParallelChains`), so that one
    sampler (:data:`job_sampler`) runs every shard of a job's shape with one compiled
    program, and the jobs of a run share it through the persistent compilation cache;
    otherwise NumPyro closes the program over the data, which makes a new program for every
    shard (``bench/shared_program.py`` compares the two)."""
    kernel = NutsKeepingUnconstrained(
        tempered(model, prior_power),
        target_accept_prob=settings.target_accept_prob,
        max_tree_depth=settings.max_tree_depth,
        dense_mass=settings.dense_mass,
        init_strategy=init_to_uniform(radius=INIT_RADIUS),
    )
    parallel = chain_method == "parallel" and one_program
    return MCMC(
        kernel,
        num_warmup=settings.num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=ParallelChains() if parallel else chain_method,
        jit_model_args=one_program,
        progress_bar=False,
    )


#: One :func:`nuts_sampler` per job and settings, for ``one_program`` runs.
job_sampler = functools.cache(nuts_sampler)


def run_nuts(
    model,
    kwargs: Mapping,
    *,
    prior_power: float,
    settings: NutsSettings,
    num_chains: int,
    rng_key: jax.Array,
    init_params: Mapping[str, jax.Array] | None = None,
    chain_method: str = "parallel",
    checkpoint: Checkpoint | None = None,
    one_program: bool = True,
) -> NutsDraws:
    """NUTS on ``temper_priors(model, prior_power)(**kwargs)``, ``num_chains`` chains.

    ``init_params``: unconstrained initial values ``{site: (num_chains, …)}``; without them
    every chain starts from its own uniform draw in (-2, 2) in the unconstrained space.
    ``chain_method``: NumPyro's; the stage always runs ``"parallel"`` (one chain per
    device), ``bench/sample_chains.py`` compares it with ``"sequential"`` and ``"vectorized"``.

    ``one_program``: the model's data are the program's arguments (:func:`nuts_sampler`):
    a job's sampler (:data:`job_sampler`) traces and compiles NUTS once for all the shards
    of one shape it samples (``sample.shards_per_job`` > 1), and a job finds the program
    another shard's job compiled in the persistent cache; ``False``: NumPyro's own way, a
    program closed over the data. The two programs do the same arithmetic, but XLA compiles
    data held as constants and data passed as arguments differently and may round them
    differently in the last bit: on the tests' logistic shards the draws are the same bit
    for bit; on the structure model (float32 distances) they part within a few warmup
    iterations, as NUTS's trajectories amplify any difference: another valid run of the
    same sampler, as another seed would give.

    Without a ``checkpoint``, warmup and draws are one program. With one, warmup runs
    first, then the draws in blocks of ``checkpoint.every``, each block continuing the
    chains from the state the last one left; the state and the draws so far are saved after
    warmup and after every block but the last, and a run that finds its checkpoint goes on
    from there. The draws are the same in every case, bit for bit.
    """

    def sampler(num_samples: int) -> MCMC:
        make = job_sampler if one_program and checkpoint is None else nuts_sampler
        return make(model, prior_power, settings, num_chains, chain_method, num_samples, one_program)

    if checkpoint is None:  # one program for warmup and draws
        mcmc = sampler(settings.num_samples)
        mcmc.run(rng_key, init_params=init_params, extra_fields=EXTRA_FIELDS, **kwargs)
        # device_get waits for the draws, so that timings mean something (JAX is asynchronous)
        return NutsDraws(
            jax.device_get(mcmc.get_samples(group_by_chain=True)),
            jax.device_get(mcmc.get_extra_fields(group_by_chain=True)),
        )
    block = min(checkpoint.every, settings.num_samples)
    # a sampler of this run's own: its state and block size change as the blocks go
    mcmc = sampler(block)
    saved = checkpoint.load()
    if saved is None:
        mcmc.warmup(rng_key, init_params=init_params, extra_fields=EXTRA_FIELDS, collect_warmup=False, **kwargs)
        saved = SavedRun(key=checkpoint.key, state=jax.device_get(mcmc.post_warmup_state))
        checkpoint.save(saved)
    else:
        log.info("resuming from %s: %d of %d draws per chain done", checkpoint.path, saved.draws, settings.num_samples)
    resumed_draws = saved.draws
    while saved.draws < settings.num_samples:
        mcmc.num_samples = min(block, settings.num_samples - saved.draws)
        mcmc.post_warmup_state = saved.state
        mcmc.run(saved.state.rng_key, extra_fields=EXTRA_FIELDS, **kwargs)
        saved.samples.append(jax.device_get(mcmc.get_samples(group_by_chain=True)))
        saved.stats.append(jax.device_get(mcmc.get_extra_fields(group_by_chain=True)))
        saved.state = jax.device_get(mcmc.last_state)
        if saved.draws < settings.num_samples:
            checkpoint.save(saved)
            log.info("checkpoint: %d of %d draws per chain", saved.draws, settings.num_samples)

    def joined(blocks):
        return {name: np.concatenate([block[name] for block in blocks], axis=1) for name in blocks[0]}

    return NutsDraws(joined(saved.samples), joined(saved.stats), resumed_draws)


def initial_values(spec: ModelSpec, features, options, kwargs, num_chains: int, seed: int, shard: int):
    """The model's own per-chain start (``spec.init_values``), unconstrained; or ``None``."""
    if spec.init_values is None:
        return None
    rng = np.random.default_rng([seed, shard % 2**32])
    constrained = spec.init_values(features, options, num_chains, rng)
    return unconstrain_draws(spec.numpyro_model, kwargs, constrained, batch_ndims=1)


def sample_run(
    spec: ModelSpec,
    features: Mapping[str, np.ndarray],
    options: Mapping[str, float],
    *,
    num_shards: int,
    shard: int,
    seed: int,
    settings: NutsSettings,
    chains: int,
    chain_method: str = "parallel",
    checkpoint_path: str | os.PathLike | None = None,
    one_program: bool = True,
    third_derivatives: bool = False,
) -> tuple[Run, dict]:
    """NUTS on shard ``shard`` (or on all rows: ``num_shards=1``, ``shard=-1``), ``chains``
    chains (``chain_method`` as in :func:`run_nuts`: "parallel", one per device, or
    "vectorized", all on one).

    ``checkpoint_path``: where the run keeps its checkpoint (``settings.checkpoint_every``
    > 0); a checkpoint there of this same run (features, options, settings, versions) is
    resumed. The caller removes it once the run is written. ``one_program``: as in
    :func:`run_nuts`. ``third_derivatives``: the ``curvature`` group holds them too
    (``combine.second_order``; up to
    :data:`~cmcflow.second_order.THIRD_DERIVATIVES_MAX_PARAMETERS` parameters).
    Returns the run (``posterior``, ``unconstrained_posterior``, ``sample_stats`` and, but for
    rigid models, ``curvature``; run facts in ``posterior.attrs``; :data:`~cmcflow.runs.Run`)
    and its diagnostics dict.
    """
    model = spec.numpyro_model
    kwargs = spec.device_layout(model_kwargs(features, options))
    checkpoint = None
    if checkpoint_path is not None and settings.checkpoint_every:
        checkpoint = Checkpoint(
            checkpoint_path,
            settings.checkpoint_every,
            run_key(
                features=dict(features),
                options=dict(options),
                model=source_digest(model),
                num_shards=num_shards,
                shard=shard,
                seed=seed,
                settings={**asdict(settings), "checkpoint_every": None},
                chains=[chains, chain_method],
                precision=PRECISION.name,
                # the kernel's draws and XLA's are two roundings of one posterior: not one run
                fused_likelihood=fused.enabled(),
                versions=[jax.__version__, numpyro.__version__],
                # what each saved block of draws holds (NutsDraws.samples)
                samples="constrained, and latent unconstrained",
            ),
        )
    compile_before, building_before = COMPILE_CLOCK.seconds, COMPILE_CLOCK.building_seconds
    started = time.perf_counter()
    draws = run_nuts(
        model,
        kwargs,
        prior_power=1.0 / num_shards,
        settings=settings,
        num_chains=chains,
        rng_key=sampling_key(seed, shard),
        init_params=initial_values(spec, features, options, kwargs, chains, seed, shard),
        chain_method=chain_method,
        checkpoint=checkpoint,
        one_program=one_program,
    )
    compile_seconds = COMPILE_CLOCK.seconds - compile_before
    building_seconds = COMPILE_CLOCK.building_seconds - building_before
    sampling_seconds = time.perf_counter() - started - building_seconds

    run = run_record(draws)
    unconstrained = run["unconstrained_posterior"].arrays()
    latents = list(unconstrained)
    started = time.perf_counter()
    dimension = sum(int(np.prod(value.shape[2:], dtype=int)) for value in unconstrained.values())
    # a rigid model's frame is fixed by align, after sampling: its draws weigh it
    if spec.symmetry != "rigid" and dimension <= HESSIAN_MAX_PARAMETERS:
        third = third_derivatives and dimension <= THIRD_DERIVATIVES_MAX_PARAMETERS
        run["curvature"] = curvature(spec, num_shards, kwargs, unconstrained, third)
    curvature_seconds = time.perf_counter() - started
    run_facts = {
        "num_shards": num_shards,
        "rows": int(np.sum(features["mask"])),
        "padded_rows": int(np.shape(features["mask"])[0]),
        "devices": len(jax.devices()),
        "precision": PRECISION.name,
        # 1: the likelihood's one-pass kernel (sample.fused_likelihood) computed it
        "fused_likelihood": int(fused.used()),
        "num_chains": chains,
        "chain_method": chain_method,
        "seed": seed,
        "shard": shard,
        "compile_seconds": compile_seconds,
        # tracing the model and NUTS into programs (not removed by the compilation cache)
        "tracing_seconds": building_seconds - compile_seconds,
        "sampling_seconds": sampling_seconds,
        "curvature_seconds": curvature_seconds,
        "persistent_cache_hits": COMPILE_CLOCK.persistent_cache_hits,
        "resumed_draws": draws.resumed_draws,
        **{
            f"nuts_{name}": int(value) if isinstance(value, bool) else value for name, value in asdict(settings).items()
        },
    }
    run["posterior"].attrs.update(run_facts)
    report = {**run_facts, **diagnostics(run, latents)}
    log.info(
        "%d chains x %d draws: tracing %.1f s, compile %.1f s, sampling %.1f s, max R-hat %.3f, min bulk ESS %.0f, "
        "%d divergences",
        chains,
        settings.num_samples,
        building_seconds - compile_seconds,
        compile_seconds,
        sampling_seconds,
        report["max_r_hat"],
        report["min_ess_bulk"],
        report["divergences"],
    )
    if report.get("tree_depth_saturation", 0.0) > TREE_DEPTH_WARNING:
        log.warning(
            "%.0f%% of iterations reached the largest tree (sample.max_tree_depth = %d): try sample.dense_mass: true",
            100 * report["tree_depth_saturation"],
            settings.max_tree_depth,
        )
    return run, report


def sample_features(*args, **kwargs) -> tuple[az.InferenceData, dict]:
    """:func:`sample_run` (same arguments), its run as ArviZ InferenceData."""
    import arviz as az

    run, report = sample_run(*args, **kwargs)
    return az.InferenceData(**{name: group.to_dataset() for name, group in run.items()}), report


def sample_shard_files(
    spec: ModelSpec,
    features: Mapping[str, np.ndarray],
    options: Mapping[str, float],
    posterior_path: str,
    diagnostics_path: str,
    *,
    num_shards: int,
    shard: int,
    seed: int,
    settings: NutsSettings,
    chains: int,
    chain_method: str = "parallel",
    checkpoint_path: str | os.PathLike | None = None,
    one_program: bool = True,
    third_derivatives: bool = False,
) -> dict:
    """:func:`sample_run` on shard ``shard``, written to its posterior (NetCDF) and
    diagnostics (JSON) files; returns the diagnostics.

    A NUTS failure that would recur (numerical, the model's own) is written as the shard's
    failure record, for combine to apply ``combine.on_failed_shard``; a transient one (out
    of memory, I/O: :func:`~cmcflow.runs.is_transient`) is raised, so the job fails and the
    profile's retries run it again, resuming from ``checkpoint_path`` where the run keeps
    one. The checkpoint is removed once the shard's files are written.
    """
    try:
        run, report = sample_run(
            spec,
            features,
            options,
            num_shards=num_shards,
            shard=shard,
            seed=seed,
            settings=settings,
            chains=chains,
            chain_method=chain_method,
            checkpoint_path=checkpoint_path,
            one_program=one_program,
            third_derivatives=third_derivatives,
        )
    except Exception as error:
        if is_transient(error):
            raise
        log.exception("NUTS failed on shard %d; writing a failure record", shard)
        run, report = failed_run(shard, f"{type(error).__name__}: {error}")
    write_run(run, report, posterior_path, diagnostics_path)
    if checkpoint_path is not None:
        Path(checkpoint_path).unlink(missing_ok=True)
    return report


def curvature(
    spec: ModelSpec, num_shards: int, kwargs: Mapping, unconstrained: Mapping[str, np.ndarray], third: bool = False
) -> Group:
    """The ``curvature`` group of a run: ``precision`` ``(D, D)``, the Hessian of the potential
    energy of ``spec``'s model tempered for ``num_shards`` shards
    (:func:`~cmcflow.transforms.potential_derivatives`) at the mean of the run's
    ``unconstrained`` draws ``{site: (chains, draws, …)}`` (its ``unconstrained_posterior``),
    sites in that order, and with ``third`` its ``third_derivatives`` ``(D, D, D)`` there.
    Combine weighs the shard by the first (``combine.weights: hessian``) and corrects the
    product's mean by the second (``combine.second_order``, :mod:`cmcflow.second_order`)."""
    mean = {name: values.mean(axis=(0, 1)) for name, values in unconstrained.items()}
    model, digest = spec.numpyro_model, source_digest(spec.numpyro_model)
    # what keys its stored program; a model without source (defined interactively) is traced
    identity = f"{spec.name} {digest} prior power 1/{num_shards}" if digest else None
    precision, third_derivatives = potential_derivatives(
        tempered(model, 1.0 / num_shards), kwargs, mean, identity, third
    )
    variables = {"precision": (("flat_row", "flat_column"), precision)}
    if third:
        variables["third_derivatives"] = (("flat_row", "flat_column", "flat_depth"), third_derivatives)
    return Group(variables, attrs={"at": "posterior mean"})


def run_record(draws: NutsDraws) -> dict[str, Group]:
    """The run's groups, in ArviZ's layout: ``posterior`` (every site's draws),
    ``sample_stats`` (named as ArviZ's ``from_numpyro`` names them: ``diverging``, ``energy``,
    ``n_steps`` and ``tree_depth`` = floor(log2 n_steps) + 1) and ``unconstrained_posterior``
    (the latent sites in the unconstrained space, where combine works)."""
    stats = {
        "diverging": draws.stats["diverging"],
        "energy": draws.stats["energy"],
        "n_steps": draws.stats["num_steps"],
    }
    stats["tree_depth"] = np.log2(stats["n_steps"]).astype(int) + 1
    constrained, unconstrained = draws.split()
    return {
        "posterior": draws_group(constrained, library=numpyro),
        "unconstrained_posterior": draws_group(unconstrained),
        "sample_stats": draws_group(stats, library=numpyro),
    }
