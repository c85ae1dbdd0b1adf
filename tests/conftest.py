"""Test set-up: 8 simulated CPU devices, set before jax is imported.

XLA's CPU collectives deadlock on 2-core machines unless the thread pool is larger
(NPROC=16), so both variables are set here and in .ci/run.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("NPROC", "16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Share compiled programs between test files and the two pytest workers.
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
