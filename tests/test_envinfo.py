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
        ({"backend": "gpu"}, "xla_gpu_deterministic_ops=true"),
        ({"jax_enable_x64": True}, "jax_enable_x64 is on"),
        ({"process_count": 2}, "only with --microbatches"),
    ],
)
def test_each_risk_is_reported_alone(change, needle):
    risks = determinism_risks({**SAFE, **change})
    assert len(risks) == 1
    assert needle in risks[0]


def test_gpu_with_deterministic_ops_is_not_a_risk():
    env = {**SAFE, "backend": "gpu", "XLA_FLAGS": "--xla_gpu_deterministic_ops=true"}
    assert determinism_risks(env) == []


def test_all_risks_together():
    env = {"backend": "gpu", "jax_threefry_partitionable": False,
           "jax_default_prng_impl": "unsafe_rbg", "jax_enable_x64": True,
           "XLA_FLAGS": "", "process_count": 4}
    assert len(determinism_risks(env)) == 5


def test_missing_fields_are_treated_as_safe():
    assert determinism_risks({}) == []
