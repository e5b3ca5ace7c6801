# Config validation, per-analysis settings resolved once at parse time, and path helpers.
# Every config value reaches a job through its rule's params:, so an edit reruns exactly
# the rules that use it (and what depends on their outputs).
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cmcflow.config import check_config, resolve_analyses
from cmcflow.errors import InputError
from cmcflow.resources import draws_mem_mb, light_mem_mb, runtime_minutes, sample_mem_mb


#: Where a config error's details (a user module's traceback) go; its one line names the file.
CONFIG_ERROR_LOG = Path(".snakemake/log/cmcflow-config-error.log")


def config_error(error):
    """Snakemake's error for a cmcflow config error: one line, and its details in a log."""
    line = f"cmcflow config error: {error}"
    if getattr(error, "details", ""):
        CONFIG_ERROR_LOG.parent.mkdir(parents=True, exist_ok=True)
        CONFIG_ERROR_LOG.write_text(f"{line}\n\n{error.details}")
        line += f" (traceback in {CONFIG_ERROR_LOG})"
    return WorkflowError(line)


try:
    check_config(config)  # one line naming the key, before Snakemake's own check
except InputError as error:
    raise config_error(error) from None
validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results_dir"]


wildcard_constraints:
    analysis=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    shard=r"\d+",
    batch=r"\d+",


try:
    ANALYSES = resolve_analyses(config)
except (InputError, OSError) as error:
    raise config_error(error) from None


# --- paths: every file of an analysis, as wildcard patterns ---
_A = f"{RESULTS}/{{analysis}}"
SIMULATED_TABLE = f"{_A}/input/simulated.parquet"
SIMULATED_TRUTH = f"{_A}/input/truth.json"
SHARD_DIR = f"{_A}/shards"
FEATURES = f"{_A}/features/shard-{{shard}}.npz"
FEATURES_INFO = f"{_A}/features/shard-{{shard}}.json"
SHARD_POSTERIOR = f"{_A}/samples/shard-{{shard}}.nc"
SHARD_DIAGNOSTICS = f"{_A}/samples/shard-{{shard}}.diagnostics.json"
# sample.shards_per_job > 1: one directory per sample job, the same two files per shard in it
SAMPLE_BATCH = f"{_A}/samples/batch-{{batch}}"
BATCH_SHARD_FILES = {
    "posterior": f"{SAMPLE_BATCH}/shard-{{shard}}.nc",
    "diagnostics": f"{SAMPLE_BATCH}/shard-{{shard}}.diagnostics.json",
}
ALIGN_REFERENCE = f"{_A}/aligned/reference.json"
ALIGNED_POSTERIOR = f"{_A}/aligned/shard-{{shard}}.nc"
ALIGNED_DIAGNOSTICS = f"{_A}/aligned/shard-{{shard}}.diagnostics.json"
COMBINED_POSTERIOR = f"{_A}/combined/posterior.nc"
COMBINED_SUMMARY = f"{_A}/combined/summary.csv"
COMBINED_SHARDS = f"{_A}/combined/shards.json"
COMBINED_MOMENTS = f"{_A}/combined/shard_moments.csv"
COMBINED_GAUSSIAN = f"{_A}/combined/gaussian.npz"
PROPOSAL = f"{_A}/corrected/proposal.npz"
SHARD_LOG_LIKELIHOOD = f"{_A}/corrected/loglik/shard-{{shard}}.npz"
CORRECTED_POSTERIOR = f"{_A}/corrected/posterior.nc"
CORRECTED_SUMMARY = f"{_A}/corrected/summary.csv"
IMPORTANCE = f"{_A}/corrected/importance.json"
REPORT = f"{_A}/report/report.html"
REPORT_SHARDS_FIGURE = f"{_A}/report/shards.png"
REPORT_POSTERIOR_FIGURE = f"{_A}/report/posterior.png"
FULLDATA_POSTERIOR = f"{_A}/fulldata/posterior.nc"
FULLDATA_DIAGNOSTICS = f"{_A}/fulldata/diagnostics.json"
FULLDATA_SUMMARY = f"{_A}/fulldata/summary.csv"
LOGS = f"{_A}/logs"
# sample.checkpoint_every > 0: a sample job's NUTS state and draws so far, kept where a failed
# job's outputs are not removed, read by its rerun, removed when the job finishes
CHECKPOINTS = f"{_A}/checkpoints"
PREFLIGHT = f"{_A}/preflight.json"
BENCHMARKS = f"{_A}/benchmarks"


def shard_paths(analysis, pattern):
    """``pattern`` filled in for every shard of ``analysis``."""
    return expand(pattern, analysis=analysis, shard=ANALYSES[analysis].shard_ids)


def per_shard(pattern):
    """Input function: ``pattern`` for every shard of the job's analysis."""

    def paths(wildcards):
        return shard_paths(wildcards.analysis, pattern)

    return paths


# --- a shard's sample outputs: its own files (sample.shards_per_job = 1), or files in the
# directory of its batch, which Snakemake tracks as the batch job's one output ---


def sample_file(analysis, shard, kind):
    """Shard ``shard``'s sample output ``kind`` ("posterior" or "diagnostics")."""
    settings = ANALYSES[analysis]
    if settings.shards_per_job == 1:
        return (SHARD_POSTERIOR if kind == "posterior" else SHARD_DIAGNOSTICS).format(analysis=analysis, shard=shard)
    return BATCH_SHARD_FILES[kind].format(analysis=analysis, batch=settings.batch_of(shard), shard=shard)


def sample_target(analysis, shard):
    """What a rule that reads shard ``shard``'s sample outputs must wait for."""
    settings = ANALYSES[analysis]
    if settings.shards_per_job == 1:
        return [sample_file(analysis, shard, kind) for kind in ("posterior", "diagnostics")]
    return [SAMPLE_BATCH.format(analysis=analysis, batch=settings.batch_of(shard))]


def sample_targets(wildcards):
    """Input function: every sample output of the analysis, as Snakemake tracks them."""
    settings = ANALYSES[wildcards.analysis]
    if settings.shards_per_job == 1:
        return shard_paths(wildcards.analysis, SHARD_POSTERIOR) + shard_paths(wildcards.analysis, SHARD_DIAGNOSTICS)
    return expand(SAMPLE_BATCH, analysis=wildcards.analysis, batch=list(settings.batches))


def sample_files(kind):
    """Params function: every shard's sample output ``kind``, in shard order."""

    def paths(wildcards):
        return [sample_file(wildcards.analysis, shard, kind) for shard in ANALYSES[wildcards.analysis].shard_ids]

    return paths


def batch_features(wildcards):
    """Input function: the features of every shard of a sample batch."""
    shards = ANALYSES[wildcards.analysis].batches[wildcards.batch]
    return expand(FEATURES, analysis=wildcards.analysis, shard=shards)


def all_reports():
    return expand(REPORT, analysis=list(ANALYSES))


def all_fulldata_summaries():
    return expand(FULLDATA_SUMMARY, analysis=list(ANALYSES))


# --- params: one function per rule family, named, so each rule's provenance is explicit ---


def model_params(wildcards):
    """The model's name, its resolved hyperparameters, and a digest of its module's source
    (an edit of the model reruns the stages that run it)."""
    analysis = ANALYSES[wildcards.analysis]
    return {"name": analysis.settings["model"], "options": analysis.options, "source": analysis.model_source}


def model_name_param(wildcards):
    """The model's name only: shard does not depend on its hyperparameters."""
    return ANALYSES[wildcards.analysis].settings["model"]


def featurizer_param(wildcards):
    """The model's name and a digest of its featurizer's module source (an edit of the
    featurizer reruns featurize and what follows)."""
    analysis = ANALYSES[wildcards.analysis]
    return {"name": analysis.settings["model"], "source": analysis.featurizer_source}


def columns_param(wildcards):
    return ANALYSES[wildcards.analysis].columns


def setting_param(*keys):
    """params function: the analysis' setting at ``keys`` (e.g. "sample", or "shard", "seed")."""

    def param(wildcards):
        value = ANALYSES[wildcards.analysis].settings
        for key in keys:
            value = value[key]
        return value

    param.__name__ = "_".join(keys) + "_param"
    return param


def nuts_param(wildcards):
    """The NUTS settings and seed: the config's ``sample`` section without
    ``shards_per_job``, which lays out the jobs and changes no draw."""
    settings = dict(ANALYSES[wildcards.analysis].settings["sample"])
    settings.pop("shards_per_job")
    return settings


def checkpoints_param(wildcards):
    return CHECKPOINTS.format(analysis=wildcards.analysis)


def sample_rerun_targets(wildcards):
    """Per shard, what ``snakemake --forcerun`` takes to sample it again: its posterior
    file, or its batch directory (named in combine's message about failed shards)."""
    return [sample_target(wildcards.analysis, shard)[0] for shard in ANALYSES[wildcards.analysis].shard_ids]


def num_shards_param(wildcards):
    return ANALYSES[wildcards.analysis].num_shards


def strata_param(wildcards):
    """The roles the shard stage stratifies by, resolved (the model's own for ``model``)."""
    return list(ANALYSES[wildcards.analysis].strata)


def jax_param(devices):
    """The JAX process settings of a job that runs on ``devices`` virtual devices."""
    return {
        "devices": devices,
        "precision": config["jax"]["precision"],
        "compilation_cache_dir": config["jax"]["compilation_cache_dir"],
    }


def table_input(wildcards):
    """The analysis' input table: the simulated demo table or the user's file."""
    analysis = ANALYSES[wildcards.analysis]
    if analysis.simulated:
        return SIMULATED_TABLE.format(analysis=analysis.name)
    return analysis.settings["input"]["path"]


def first_shard_features(wildcards):
    return shard_paths(wildcards.analysis, FEATURES)[0]


def rigid_shard_features(wildcards):
    """Every shard's features for rigid models (combine reads the observed point pairs), none otherwise."""
    return shard_paths(wildcards.analysis, FEATURES) if ANALYSES[wildcards.analysis].rigid else []


def stage_benchmarks(wildcards):
    """Benchmark files of every job of the analysis that precedes the report."""
    analysis = ANALYSES[wildcards.analysis]
    benchmarks = BENCHMARKS.format(analysis=wildcards.analysis)
    stages = ["featurize"] + ["sample"] * (analysis.shards_per_job == 1)  # else one file per batch
    stages += ["align"] * analysis.rigid + ["reweight"] * analysis.corrected
    per_shard_stages = [
        path
        for stage in stages
        for path in shard_paths(wildcards.analysis, f"{BENCHMARKS}/{stage}/shard-{{shard}}.tsv")
    ]
    if analysis.shards_per_job > 1:
        batches = list(analysis.batches)
        per_shard_stages += expand(f"{BENCHMARKS}/sample/batch-{{batch}}.tsv", analysis=wildcards.analysis, batch=batches)
    correction = [f"{benchmarks}/propose.tsv", f"{benchmarks}/correct.tsv"] if analysis.corrected else []
    return [f"{benchmarks}/shard.tsv", *per_shard_stages, f"{benchmarks}/combine.tsv", *correction]


def run_targets(wildcards):
    """Input function: the per-shard runs that combine merges and the report shows, as
    Snakemake tracks them: aligned runs for rigid models (the align stage exists in the DAG
    only for them), sampled ones otherwise."""
    if ANALYSES[wildcards.analysis].rigid:
        return shard_paths(wildcards.analysis, ALIGNED_POSTERIOR) + shard_paths(wildcards.analysis, ALIGNED_DIAGNOSTICS)
    return sample_targets(wildcards)


def run_files(kind):
    """Params function: the per-shard run files (``kind`` "posterior" or "diagnostics") of
    :func:`run_targets`, in shard order."""
    aligned = ALIGNED_POSTERIOR if kind == "posterior" else ALIGNED_DIAGNOSTICS

    def paths(wildcards):
        if ANALYSES[wildcards.analysis].rigid:
            return shard_paths(wildcards.analysis, aligned)
        return sample_files(kind)(wildcards)

    return paths


def importance_input(wildcards):
    """The importance correction's record, where the analysis is corrected (none otherwise)."""
    return IMPORTANCE.format(analysis=wildcards.analysis) if ANALYSES[wildcards.analysis].corrected else []


def corrected_summary_input(wildcards):
    """The corrected posterior's summary, where the analysis is corrected (none otherwise)."""
    return CORRECTED_SUMMARY.format(analysis=wildcards.analysis) if ANALYSES[wildcards.analysis].corrected else []


# --- resources: memory from the inputs' sizes, scaled by the retry attempt ---


def directory_mb(path):
    return sum(entry.stat().st_size for entry in Path(path).iterdir()) / 2**20


def light_mem(wildcards, input, attempt):
    return light_mem_mb(input.size_mb, attempt)


def light_base_mem(wildcards, attempt):
    """featurize and report: small inputs (one shard, a few JSON files)."""
    return light_mem_mb(0, attempt)


def sample_mem(wildcards, input, attempt):
    return sample_mem_mb(input.size_mb, attempt)


def batch_mem(wildcards, input, attempt):
    # the shards run one after another, each padded to the same size: one shard's memory
    return sample_mem_mb(input.size_mb / len(input.features), attempt)


def fulldata_mem(wildcards, input, attempt):
    # the validated shards hold every row as float64 columns, about the features' size
    return sample_mem_mb(directory_mb(input.shards), attempt)


def draws_mem(wildcards, input, attempt):
    return draws_mem_mb(input.size_mb, attempt)
