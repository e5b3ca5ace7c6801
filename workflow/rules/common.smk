# Config validation, per-analysis settings resolved once at parse time, and path helpers.
# Every config value reaches a job through its rule's params:, so an edit reruns exactly
# the rules that use it (and what depends on their outputs).
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cmcflow.config import check_config, resolve_analyses
from cmcflow.errors import InputError
from cmcflow.jaxenv import chain_layout
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


# an analysis, or a sweep's grid point: <analysis>/<key>=<value>,… (cmcflow.sweep.point_name)
wildcard_constraints:
    analysis=r"[A-Za-z0-9][A-Za-z0-9_-]*(/[A-Za-z0-9_.]+=[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.]+=[A-Za-z0-9_.+-]+)*)?",
    shard=r"\d+",
    batch=r"\d+",
    sweep=r"[A-Za-z0-9][A-Za-z0-9_-]*",


try:
    ANALYSES, SWEEPS = resolve_analyses(config)
except (InputError, OSError) as error:
    raise config_error(error) from None


# --- paths: every file of an analysis, as wildcard patterns ---
_A = f"{RESULTS}/{{analysis}}"
SIMULATED_TABLE = f"{_A}/input/simulated.parquet"
SIMULATED_TRUTH = f"{_A}/input/truth.json"
SHARD_DIR = f"{_A}/shards"
FEATURES = f"{_A}/features/shard-{{shard}}.npz"
FEATURES_INFO = f"{_A}/features/shard-{{shard}}.json"
# sample.shards_per_job > 1: featurize runs per sample batch too, its files in one directory
FEATURE_BATCH = f"{_A}/features/batch-{{batch}}"
BATCH_FEATURE_FILES = {
    "features": f"{FEATURE_BATCH}/shard-{{shard}}.npz",
    "info": f"{FEATURE_BATCH}/shard-{{shard}}.json",
}
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
# the kept shards' Gaussian product and, where the importance correction runs, its proposal
COMBINED_GAUSSIAN = f"{_A}/combined/gaussian.npz"
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
# a swept analysis: the page that puts its grid points side by side
_S = f"{RESULTS}/{{sweep}}/sweep"
SWEEP_REPORT = f"{_S}/report.html"
SWEEP_SUMMARY = f"{_S}/summary.csv"
SWEEP_COMPARISON = f"{_S}/comparison.json"
SWEEP_FIGURE = f"{_S}/posterior.png"

#: The stage whose settings decide each file: a sweep's grid points that agree on them
#: read one analysis' file (the stage's owner, cmcflow.sweep.stage_owners).
STAGE_OF = {
    **dict.fromkeys([SIMULATED_TABLE, SIMULATED_TRUTH], "simulate"),
    SHARD_DIR: "shard",
    **dict.fromkeys([FEATURES, FEATURES_INFO, FEATURE_BATCH, *BATCH_FEATURE_FILES.values()], "featurize"),
    **dict.fromkeys([PREFLIGHT, SHARD_POSTERIOR, SHARD_DIAGNOSTICS, SAMPLE_BATCH, *BATCH_SHARD_FILES.values()], "sample"),
    **dict.fromkeys([ALIGN_REFERENCE, ALIGNED_POSTERIOR, ALIGNED_DIAGNOSTICS], "align"),
    **dict.fromkeys(
        [COMBINED_POSTERIOR, COMBINED_SUMMARY, COMBINED_SHARDS, COMBINED_MOMENTS, COMBINED_GAUSSIAN], "combine"
    ),
    **dict.fromkeys(
        [SHARD_LOG_LIKELIHOOD, CORRECTED_POSTERIOR, CORRECTED_SUMMARY, IMPORTANCE], "correct"
    ),
    **dict.fromkeys([FULLDATA_POSTERIOR, FULLDATA_DIAGNOSTICS, FULLDATA_SUMMARY], "fulldata"),
}


def path_of(pattern, analysis, **wildcards):
    """``pattern`` (one of the patterns above) filled in for ``analysis``: the file of the
    analysis that owns the pattern's stage (:data:`STAGE_OF`; itself outside sweeps, and
    for a pattern of no shared stage, such as the report's)."""
    stage = STAGE_OF.get(pattern)
    owner = ANALYSES[analysis].owner(stage) if stage else analysis
    return pattern.format(analysis=owner, **wildcards)


def owned(pattern):
    """Input function: ``pattern`` for the job's analysis and wildcards (:func:`path_of`)."""

    def path(wildcards):
        return path_of(pattern, **dict(wildcards.items()))

    return path


def shard_paths(analysis, pattern):
    """``pattern`` filled in for every shard of ``analysis`` (:func:`path_of`)."""
    return [path_of(pattern, analysis, shard=shard) for shard in ANALYSES[analysis].shard_ids]


def per_shard(pattern):
    """Input function: ``pattern`` for every shard of the job's analysis."""

    def paths(wildcards):
        return shard_paths(wildcards.analysis, pattern)

    return paths


# --- a shard's featurize and sample outputs: its own files (sample.shards_per_job = 1), or
# files in the directory of its batch, which Snakemake tracks as the batch job's one output.
# A rule that reads them takes the *target* as input and the *file* as a param ---


def feature_file(analysis, shard, kind="features"):
    """Shard ``shard``'s featurize output ``kind`` ("features": the arrays, "info": the record)."""
    settings = ANALYSES[analysis]
    if settings.shards_per_job == 1:
        return path_of(FEATURES if kind == "features" else FEATURES_INFO, analysis, shard=shard)
    return path_of(BATCH_FEATURE_FILES[kind], analysis, batch=settings.batch_of(shard), shard=shard)


def feature_target(analysis, shard, kind="features"):
    """What a rule that reads shard ``shard``'s featurize output ``kind`` must wait for."""
    settings = ANALYSES[analysis]
    if settings.shards_per_job == 1:
        return feature_file(analysis, shard, kind)
    return path_of(FEATURE_BATCH, analysis, batch=settings.batch_of(shard))


def shard_features(function):
    """Input (``function`` = :func:`feature_target`) or params (:func:`feature_file`)
    function: the job's own shard's features."""
    return lambda wildcards: function(wildcards.analysis, wildcards.shard)


def first_shard_features(function):
    """Input or params function: the first shard's features (any shard's arrays will do to
    trace the model)."""
    return lambda wildcards: function(wildcards.analysis, ANALYSES[wildcards.analysis].shard_ids[0])


def every_shard_features(function, kind="features", rigid_only=False):
    """Input or params function: every shard's featurize output ``kind``, in shard order
    (a batch directory once); with ``rigid_only``, none unless the model is rigid (combine
    reads a rigid model's observed point pairs)."""

    def paths(wildcards):
        analysis = ANALYSES[wildcards.analysis]
        if rigid_only and not analysis.rigid:
            return []
        return list(dict.fromkeys(function(analysis.name, shard, kind) for shard in analysis.shard_ids))

    return paths


def batch_feature_files(wildcards):
    """Params function: per shard of a batch, its featurize outputs [features, info]."""
    shards = ANALYSES[wildcards.analysis].batches[wildcards.batch]
    return [[feature_file(wildcards.analysis, shard, kind) for kind in ("features", "info")] for shard in shards]


def sample_file(analysis, shard, kind):
    """Shard ``shard``'s sample output ``kind`` ("posterior" or "diagnostics")."""
    settings = ANALYSES[analysis]
    if settings.shards_per_job == 1:
        return path_of(SHARD_POSTERIOR if kind == "posterior" else SHARD_DIAGNOSTICS, analysis, shard=shard)
    return path_of(BATCH_SHARD_FILES[kind], analysis, batch=settings.batch_of(shard), shard=shard)


def sample_target(analysis, shard):
    """What a rule that reads shard ``shard``'s sample outputs must wait for."""
    settings = ANALYSES[analysis]
    if settings.shards_per_job == 1:
        return [sample_file(analysis, shard, kind) for kind in ("posterior", "diagnostics")]
    return [path_of(SAMPLE_BATCH, analysis, batch=settings.batch_of(shard))]


def sample_targets(wildcards):
    """Input function: every sample output of the analysis, as Snakemake tracks them."""
    settings = ANALYSES[wildcards.analysis]
    if settings.shards_per_job == 1:
        return shard_paths(wildcards.analysis, SHARD_POSTERIOR) + shard_paths(wildcards.analysis, SHARD_DIAGNOSTICS)
    return [path_of(SAMPLE_BATCH, wildcards.analysis, batch=batch) for batch in settings.batches]


def sample_files(kind):
    """Params function: every shard's sample output ``kind``, in shard order."""

    def paths(wildcards):
        return [sample_file(wildcards.analysis, shard, kind) for shard in ANALYSES[wildcards.analysis].shard_ids]

    return paths


def batch_shards(wildcards):
    """Params function: the shard ids of a batch."""
    return ANALYSES[wildcards.analysis].batches[wildcards.batch]


def all_reports():
    """Every analysis' (every grid point's) report, and every sweep's."""
    return expand(REPORT, analysis=list(ANALYSES)) + expand(SWEEP_REPORT, sweep=list(SWEEPS))


def all_fulldata_summaries():
    """Every full-data run's summary, once per distinct run (grid points may share one)."""
    return sorted({path_of(FULLDATA_SUMMARY, analysis) for analysis in ANALYSES})


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


def correct_param(wildcards):
    """The config's ``correct`` section where the analysis is importance-corrected, else None
    (so that correct.* edits rerun combine only where it draws the proposal)."""
    analysis = ANALYSES[wildcards.analysis]
    return analysis.settings["correct"] if analysis.corrected else None


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


def jax_param(devices, stage=None):
    """Params function: the JAX process settings of a job of ``stage`` (sample, align or
    fulldata: on the analysis' ``platform``; any other stage: cpu), which runs on
    ``devices`` virtual CPU devices, or on the one GPU (cmcflow.jaxenv.chain_layout)."""

    def param(wildcards):
        platform = job_platform(wildcards, stage)
        return {
            "devices": chain_layout(platform, devices)[0],
            "platform": platform,
            "precision": config["jax"]["precision"],
            "compilation_cache_dir": config["jax"]["compilation_cache_dir"],
        }

    return param


def job_platform(wildcards, stage):
    return ANALYSES[wildcards.analysis].platform(stage) if stage else "cpu"


def job_threads(stage):
    """Threads of a job of ``stage`` on ``jax.devices`` devices: one per virtual CPU device;
    on a GPU, one (the host side of a GPU job is one Python thread)."""

    def threads(wildcards):
        return config["jax"]["devices"] if job_platform(wildcards, stage) == "cpu" else 1

    return threads


def job_gpus(stage):
    """The ``gpu`` resource of a job of ``stage``: 1 on a GPU, else 0. The SLURM executor
    turns it into ``--gpus=1``, profiles/pbs/submit into ``ngpus=1`` (PBS Pro) or
    ``gpus=1`` (Torque)."""

    def gpus(wildcards):
        return int(job_platform(wildcards, stage) == "gpu")

    return gpus


def jax_env(stage, cpu_env):
    """The conda environment of a job of ``stage``: ``envs/<cpu_env>.yaml``, or on a GPU
    ``envs/jax-gpu.yaml`` (JAX with its CUDA 12 wheels)."""

    def env(wildcards):
        name = "jax-gpu" if job_platform(wildcards, stage) == "gpu" else cpu_env
        return f"../../envs/{name}.yaml"

    return env


def table_input(wildcards):
    """The analysis' input table: the simulated demo table or the user's file."""
    analysis = ANALYSES[wildcards.analysis]
    if analysis.simulated:
        return path_of(SIMULATED_TABLE, analysis.name)
    return analysis.settings["input"]["path"]


def stage_benchmarks(wildcards):
    """Benchmark files of every job of the analysis that precedes the report (those of a
    stage that a sweep's grid point shares: the owner's)."""
    analysis = ANALYSES[wildcards.analysis]

    def owner_benchmarks(stage):
        return BENCHMARKS.format(analysis=analysis.owner(stage))

    def per_shard(stage, directory):
        return [f"{owner_benchmarks(stage)}/{directory}/shard-{shard}.tsv" for shard in analysis.shard_ids]

    def per_job(stage):  # featurize and sample: a job per shard, or per batch
        if analysis.shards_per_job == 1:
            return per_shard(stage, stage)
        return [f"{owner_benchmarks(stage)}/{stage}/batch-{batch}.tsv" for batch in analysis.batches]

    paths = [f"{owner_benchmarks('shard')}/shard.tsv", *per_job("featurize"), *per_job("sample")]
    paths += per_shard("align", "align") if analysis.rigid else []
    paths.append(f"{owner_benchmarks('combine')}/combine.tsv")
    if analysis.corrected:
        correct = owner_benchmarks("correct")
        paths += [*per_shard("correct", "reweight"), f"{correct}/correct.tsv"]
    return paths


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
    return path_of(IMPORTANCE, wildcards.analysis) if ANALYSES[wildcards.analysis].corrected else []


def corrected_summary_input(wildcards):
    """The corrected posterior's summary, where the analysis is corrected (none otherwise)."""
    return path_of(CORRECTED_SUMMARY, wildcards.analysis) if ANALYSES[wildcards.analysis].corrected else []


# --- a sweep's grid points, for its report ---


def sweep_points(wildcards):
    """Params function: per grid point of the sweep, in grid order, its name, swept values,
    combined summary and shard record, and (``sweep.fulldata``) its full-data run's summary."""
    sweep = SWEEPS[wildcards.sweep]
    return [
        {
            "name": name,
            "values": values,
            "summary": path_of(COMBINED_SUMMARY, name),
            "shards": path_of(COMBINED_SHARDS, name),
            "fulldata": path_of(FULLDATA_SUMMARY, name) if sweep.options["fulldata"] else None,
        }
        for name, values in sweep.points.items()
    ]


def sweep_inputs(kind):
    """Input function: the sweep's combined summaries (``kind`` "summary"), shard records
    ("shards") or its distinct full-data summaries ("fulldata"; none unless ``sweep.fulldata``)."""

    def paths(wildcards):
        return list(dict.fromkeys(point[kind] for point in sweep_points(wildcards) if point[kind]))

    return paths


def sweep_setting(wildcards, *keys):
    """A setting the sweep's grid points share (its first point's): e.g. "model"."""
    value = ANALYSES[next(iter(SWEEPS[wildcards.sweep].points))].settings
    for key in keys:
        value = value[key]
    return value


# --- resources: memory from the inputs' sizes, scaled by the retry attempt ---


def directory_mb(path):
    return sum(entry.stat().st_size for entry in Path(path).iterdir()) / 2**20


def light_mem(wildcards, input, attempt):
    return light_mem_mb(input.size_mb, attempt)


def light_base_mem(wildcards, attempt):
    """featurize and report: small inputs (one shard, a few JSON files)."""
    return light_mem_mb(0, attempt)


def sample_mem(wildcards, input, attempt):
    """preflight, sample, reweight: from the inputs' sizes (a batch directory of features
    counted as the one shard's file the job reads)."""
    mb = input.size_mb  # (a missing input makes the resource "to be determined")
    if ANALYSES[wildcards.analysis].shards_per_job > 1:
        shard = getattr(wildcards, "shard", None) or ANALYSES[wildcards.analysis].shard_ids[0]
        mb += Path(feature_file(wildcards.analysis, shard)).stat().st_size / 2**20
    return sample_mem_mb(mb, attempt)


def batch_mem(wildcards, input, attempt):
    # the shards run one after another, each padded to the same size: one shard's memory
    return sample_mem_mb(directory_mb(input.features) / len(batch_shards(wildcards)), attempt)


def fulldata_mem(wildcards, input, attempt):
    # the validated shards hold every row as float64 columns, about the features' size
    return sample_mem_mb(directory_mb(input.shards), attempt)


def draws_mem(wildcards, input, attempt):
    """align, combine, correct: from the inputs' sizes, a batch directory of sample outputs
    by its files (Snakemake counts a directory as its own entry's size)."""
    batches = [path for path in input if Path(path).is_dir()]
    return draws_mem_mb(input.size_mb + sum(map(directory_mb, batches)), attempt)
