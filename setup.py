"""mmgen_jax: a unified multi-modal diffusion transformer in JAX/Flax.

Tested (2026-11, CPU, Python 3.11): jax 0.10.2, flax 0.12.8, optax 0.2.8,
orbax-checkpoint 0.12.8, grain 0.2.18, ml_collections 1.1.0,
tensorflow-datasets 4.9.10, array-record 0.8.6, clu 0.0.12,
tensorflow-cpu 2.21.0, tensorboard 2.21.0, numpy 2.4.6, pillow 13.0.0,
safetensors 0.8.0, etils 1.15.0, scikit-image 0.26.0, pytest 9.2.0; labelers extra:
torch 2.14.1, torchvision 0.29.1, transformers 5.24.0, diffusers 0.42.1.
"""

import setuptools

CORE = [
    'jax>=0.8,<0.11',
    'flax>=0.12,<0.13',
    'optax>=0.2.5,<0.3',
    'orbax-checkpoint>=0.11,<0.13',
    'grain>=0.2.12,<0.3',
    'ml_collections>=1.0,<2',
    'tensorflow-datasets>=4.9.8,<5',
    'array-record>=0.8,<0.9',
    'clu>=0.0.12,<0.1',
    'tensorflow-cpu>=2.19,<2.22',  # clu's TensorBoard writer and TFDS encoding
    'tensorboard>=2.19,<2.22',
    'numpy>=1.26,<3',
    'pillow>=10',
    'safetensors>=0.4,<1',
    'absl-py>=2',
    'etils[epath]>=1.7',  # paths that may be local or gs:// (checkpoints, grids, scores)
    'tqdm>=4.60',
    'importlib_resources>=6',  # tensorflow-datasets imports it but declares it only for old Pythons
    'scikit-image>=0.19,<1',  # the weight-free segmentation labeller (Felzenszwalb), run time
]

setuptools.setup(
    name='mmgen_jax',
    version='0.1.0',
    description='Unified multi-modal diffusion transformer (MMGen, MT-Diffusion) in JAX/Flax.',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['mmgen_jax', 'mmgen_jax.*']),
    install_requires=CORE,
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3'],
        'cuda': ['jax[cuda13]'],
        'tpu': ['jax[tpu]'],
        # PyTorch checkpoints (.pt) for the converters; safetensors needs no torch.
        'torch': ['torch>=2.4,<=2.14.1'],
        # Expert pseudo-labellers with weights (data/labelers.py): Depth Anything / DPT and
        # SAM (transformers; its mask generation needs torchvision), Marigold (diffusers).
        'labelers': ['torch>=2.4,<=2.14.1', 'torchvision>=0.19', 'transformers>=4.45,<6',
                     'diffusers>=0.28,<1'],
    },
)
