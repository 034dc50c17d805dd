"""RunConfig: validation, round trip, and a fingerprint that covers every field."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from jpr.config import RunConfig, config_diff

FIELDS = [f.name for f in dataclasses.fields(RunConfig)]

# One valid value per field that differs from the default.
CHANGED = {
    "seed": 1,
    "batch_size": 32,
    "lr": 2e-3,
    "dropout": 0.2,
    "hidden": 16,
    "features": 8,
    "classes": 3,
    "dataset_size": 2048,
    "eval_size": 100,
    "microbatches": 4,
}


def test_every_field_has_a_changed_value():
    assert sorted(CHANGED) == sorted(FIELDS)


def test_defaults_are_the_seed_model():
    cfg = RunConfig()
    assert (cfg.seed, cfg.batch_size, cfg.lr) == (0, 64, 1e-3)
    assert (cfg.features, cfg.hidden, cfg.classes) == (64, 32, 10)
    assert cfg.microbatches is None


@pytest.mark.parametrize("field", FIELDS)
def test_fingerprint_changes_with_each_field(field):
    base = RunConfig()
    changed = dataclasses.replace(base, **{field: CHANGED[field]})
    assert changed.fingerprint() != base.fingerprint()
    assert config_diff(base.to_dict(), changed.to_dict()) == [
        f"{field}: {getattr(base, field)} -> {CHANGED[field]}"
    ]


def test_fingerprint_is_sha256_of_canonical_json_of_all_fields():
    cfg = RunConfig(seed=5, microbatches=2)
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True, separators=(",", ":"))
    assert cfg.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()
    assert set(json.loads(blob)) == set(FIELDS)  # nothing excluded


def test_fingerprint_is_stable_and_value_based():
    assert RunConfig(seed=3).fingerprint() == RunConfig(seed=3).fingerprint()
    assert RunConfig(lr=0.001).fingerprint() == RunConfig().fingerprint()


def test_to_dict_from_dict_round_trip():
    cfg = RunConfig(**CHANGED)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    back = RunConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.fingerprint() == cfg.fingerprint()


def test_from_dict_rejects_unknown_keys():
    d = {**RunConfig().to_dict(), "steps": 50, "colour": "red"}
    with pytest.raises(ValueError, match="unknown config fields: colour, steps"):
        RunConfig.from_dict(d)


def test_from_dict_fills_defaults_for_missing_keys():
    assert RunConfig.from_dict({"seed": 9}) == RunConfig(seed=9)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "seed must be in [0, 2**32), got -1"),
        ({"seed": 2**32}, "seed must be in [0, 2**32)"),
        ({"seed": 1.0}, "seed must be an integer, got 1.0"),
        ({"seed": True}, "seed must be an integer, got True"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"hidden": -3}, "hidden must be positive, got -3"),
        ({"features": 0}, "features must be positive"),
        ({"eval_size": 0}, "eval_size must be positive"),
        ({"classes": 1}, "classes must be at least 2, got 1"),
        ({"lr": 0}, "lr must be a positive finite number, got 0"),
        ({"lr": -1e-3}, "lr must be a positive finite number"),
        ({"lr": float("inf")}, "lr must be a positive finite number, got inf"),
        ({"lr": float("nan")}, "lr must be a positive finite number, got nan"),
        ({"lr": "0.1"}, "lr must be a positive finite number"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"dataset_size": 10, "batch_size": 64},
         "dataset_size (10) must be at least batch_size (64)"),
        ({"microbatches": 0}, "microbatches must be a positive integer, got 0"),
        ({"microbatches": True}, "microbatches must be a positive integer, got True"),
        ({"microbatches": 3}, "batch_size (64) must be divisible by microbatches (3)"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        RunConfig(**kwargs)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_all_problems_are_reported_together():
    with pytest.raises(ValueError) as info:
        RunConfig(seed=-1, lr=0, dropout=2.0)
    text = str(info.value)
    assert "seed" in text and "lr" in text and "dropout" in text
    assert "\n" not in text


def test_valid_edge_values():
    RunConfig(seed=0)
    RunConfig(seed=2**32 - 1)
    RunConfig(dropout=0.0)
    RunConfig(classes=2)
    RunConfig(batch_size=64, dataset_size=64)
    RunConfig(microbatches=64)


def test_config_diff_names_missing_fields():
    assert config_diff({"a": 1}, {"a": 1, "b": 2}) == ["b: <missing> -> 2"]
    assert config_diff({"a": 1}, {"a": 1}) == []
