"""cmcflow: Consensus Monte Carlo on HPC clusters with Snakemake, JAX and NumPyro.

The package is imported by every rule script. Importing it, or any of its jax-free
modules (``errors``, ``io``, ``script``, ``models``, ``table``, ``shard``, ``featurize``),
never imports JAX: the light stages stay light, and the heavy stages can set the XLA
environment (:mod:`cmcflow.jaxenv`) before JAX is first imported.
"""

__version__ = "0.1.0"
