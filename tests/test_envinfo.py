"""The environment fingerprint and the determinism risks read from it."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import jax
import pytest
from expected_risks import assert_default_risks

from jpr.envinfo import determinism_risks, environment

SAFE = {
    "backend": "cpu",
    "jax_threefry_partitionable": True,
    "jax_default_prng_impl": "threefry2x32",
    "jax_enable_x64": False,
    "XLA_FLAGS": "",
    "process_count": 1,
}


def test_environment_reports_versions_and_devices():
    env = environment()
    assert env["python"] == platform.python_version()
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert env[dist] == metadata.version(dist)
    assert env["backend"] == jax.default_backend()
    assert env["device_count"] == jax.device_count() >= 1
    assert env["local_device_count"] == jax.local_device_count()
    assert env["device_kind"] == jax.devices()[0].device_kind
    assert (env["process_index"], env["process_count"]) == (0, 1)
    assert env["jax_threefry_partitionable"] is True
    assert env["jax_default_prng_impl"] == "threefry2x32"
    assert env["jax_enable_x64"] is False
    assert env["machine"] == platform.machine()
    json.dumps(env)  # goes into run records as is


def test_environment_reads_xla_flags_at_call_time(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert environment()["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    monkeypatch.delenv("XLA_FLAGS")
    assert environment()["XLA_FLAGS"] == ""


def test_environment_follows_jax_config():
    before = environment()["jax_threefry_partitionable"]
    jax.config.update("jax_threefry_partitionable", not before)
    try:
        assert environment()["jax_threefry_partitionable"] is (not before)
    finally:
        jax.config.update("jax_threefry_partitionable", before)
    assert environment()["jax_threefry_partitionable"] is before


def test_no_risks_in_the_default_cpu_setup():
    assert determinism_risks(SAFE) == []
    assert_default_risks(determinism_risks(environment()))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"jax_threefry_partitionable": False}, "jax_threefry_partitionable is off"),
        ({"jax_default_prng_impl": "rbg"}, "default PRNG impl is rbg"),
        ({"jax_default_prng_impl": "philox2x32"}, "default PRNG impl is philox2x32"),
        ({"backend": "gpu"}, "xla_gpu_deterministic_ops=true"),
        ({"jax_enable_x64": True}, "jax_enable_x64 is on"),
        ({"process_count": 2}, "only with --microbatches"),
    ],
)
def test_each_risk_is_reported_alone(change, needle):
    risks = determinism_risks({**SAFE, **change})
    assert len(risks) == 1
    assert needle in risks[0]


# The summary table of the `jax.random` module documentation (jax/random.py, JAX 0.10.2):
# impl -> (identical across shardings, identical across CPU/GPU/TPU, exact vmap over keys).
JAX_TABLE = {
    "threefry4x32": (True, True, True),
    "philox2x32": (True, True, True),
    "philox4x32": (True, True, True),
    "rbg": (True, False, False),
    "unsafe_rbg": (True, False, False),
}


def test_every_prng_impl_jax_offers_is_in_the_table():
    from jax._src.random import prng  # the registry of implementations (private)

    assert set(prng.prngs) == {"threefry2x32", *JAX_TABLE}


@pytest.mark.parametrize("impl", sorted(JAX_TABLE))
def test_the_prng_message_says_what_jax_promises_for_that_impl(impl):
    shardings, backends, vmap = JAX_TABLE[impl]
    (risk,) = determinism_risks({**SAFE, "jax_default_prng_impl": impl})
    assert risk.startswith(f"default PRNG impl is {impl}")
    assert ("identical across shardings" in risk) is shardings
    assert ("identical across shardings and CPU/GPU/TPU" in risk) is backends
    assert ("not across CPU/GPU/TPU" in risk) is not backends
    assert ("vmap over its keys is not exact" in risk) is not vmap
    assert "another stream" in risk or "RandomBitGenerator" in risk
    assert "threefry2x32" in risk  # jpr's own keys


def test_rbg_under_the_tpu_unsafe_flag_is_not_identical_across_shardings():
    env = {**SAFE, "jax_default_prng_impl": "rbg",
           "XLA_FLAGS": "--xla_tpu_spmd_rng_bit_generator_unsafe=1"}
    (risk,) = determinism_risks(env)
    assert "only without --xla_tpu_spmd_rng_bit_generator_unsafe (which is set)" in risk


def test_an_unknown_prng_impl_promises_nothing():
    (risk,) = determinism_risks({**SAFE, "jax_default_prng_impl": "my_impl"})
    assert "nothing is promised" in risk


def test_the_threefry_flag_off_is_another_stream_not_a_sharding_dependence():
    (risk,) = determinism_risks({**SAFE, "jax_threefry_partitionable": False})
    assert "another stream than the default" in risk
    assert "not generated shard by shard" in risk
    assert "do not depend on the sharding" in risk
    assert "depend on sharding" not in risk.replace("not depend on the sharding", "")


@pytest.mark.parametrize("impl", ["threefry4x32", "philox2x32", "philox4x32", "unsafe_rbg"])
def test_the_threefry_flag_is_no_risk_for_impls_that_do_not_read_it(impl):
    env = {**SAFE, "jax_threefry_partitionable": False, "jax_default_prng_impl": impl}
    assert len(determinism_risks(env)) == 1


def test_the_flag_off_draws_other_bits():  # its sharding side: docs/jax-prng.md
    key = jax.random.key(0)
    with jax.threefry_partitionable(False):
        off = jax.random.bits(key, (4,))
    assert (off != jax.random.bits(key, (4,))).any()


def test_gpu_with_deterministic_ops_is_not_a_risk():
    env = {**SAFE, "backend": "gpu", "XLA_FLAGS": "--xla_gpu_deterministic_ops=true"}
    assert determinism_risks(env) == []


def test_all_risks_together():
    env = {"backend": "gpu", "jax_threefry_partitionable": False,
           "jax_default_prng_impl": "rbg", "jax_enable_x64": True,
           "XLA_FLAGS": "", "process_count": 4}
    assert len(determinism_risks(env)) == 5


def test_missing_fields_are_treated_as_safe():
    assert determinism_risks({}) == []
