"""Version profiles: which etcd answers the model gives per release line."""

from __future__ import annotations

import pytest

from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing import PROFILES, Model, profile_for


@pytest.mark.parametrize("version, name, ordered_progress", [
    ("3.4", "3.4", True), ("3.4.23", "3.4", False), ("3.4.31", "3.4", True), ("v3.5.12", "3.5", False),
    ("3.5.13", "3.5", True), ("3.6.14", "3.6", True), ("3.7.0", "3.6", True), ("3.6.0-rc.1", "3.6", True),
])
def test_profile_for(version, name, ordered_progress):
    profile = profile_for(version)
    assert (profile.name, profile.ordered_progress) == (name, ordered_progress)


@pytest.mark.parametrize("bad, message", [
    ("3.3.27", "older than 3.4"), ("three", "not an etcd version"), ("", "not an etcd version"),
])
def test_profile_for_refuses(bad, message):
    with pytest.raises(ValueError, match=message):
        profile_for(bad)


def compacted_model(profile):
    model = Model(profile=profile)
    for value in (b"1", b"2", b"3"):
        model.put(pb.PutRequest(key=b"k", value=value))
    model.compact(3)
    return model


def test_hashkv_at_the_compact_revision_per_profile():
    assert compacted_model(PROFILES["3.6"]).hash_revision(3) == 3
    for name in ("3.4", "3.5"):
        model = compacted_model(PROFILES[name])
        with pytest.raises(errors.CompactedError):
            model.hash_revision(3)
        assert model.hash_revision(4) == 4 and model.hash_revision(0) == 4


def test_a_model_can_start_on_a_store_with_history():
    model = Model(revision=100, compact_revision=40)
    assert model.put(pb.PutRequest(key=b"k", value=b"v")).header.revision == 101
    assert model.range(pb.RangeRequest(key=b"k", revision=60)).count == 0  # before the run: not there
    with pytest.raises(errors.CompactedError):
        model.range(pb.RangeRequest(key=b"k", revision=39))
    assert model.changes_since(0)[0][0] == 101
