"""mmgen_jax: a unified multi-modal diffusion transformer (MMGen, MT-Diffusion) in JAX/Flax."""

__version__ = '0.1.0'
