import dataclasses

import pytest

from sfa_compile import SFAConfig


def test_defaults_and_frozen():
    cfg = SFAConfig()
    assert cfg.topk == 16 and cfg.version == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.topk = 8


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True, None])
def test_topk_validated(bad):
    with pytest.raises(ValueError, match="topk"):
        SFAConfig(topk=bad)


def test_json_round_trip():
    cfg = SFAConfig(topk=8)
    text = cfg.to_json()
    assert '"version": 1' in text and '"topk": 8' in text
    assert SFAConfig.from_json(text) == cfg


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown SFAConfig field.*'topkk'.*valid fields.*'topk'"):
        SFAConfig.from_dict({"topkk": 8})


def test_newer_version_refused():
    with pytest.raises(ValueError, match="version 2 is not supported"):
        SFAConfig.from_json('{"topk": 8, "version": 2}')


def test_json_must_be_object():
    with pytest.raises(ValueError, match="must be an object"):
        SFAConfig.from_json("[1, 2]")
