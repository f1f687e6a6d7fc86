"""Runtime layers: merge order, flattening, Envoy's typed readings, feature_enabled."""

from __future__ import annotations

import pytest
from envoy.config.bootstrap.v3.bootstrap_pb2 import LayeredRuntime
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.errors import ConfigError
from proxy.config.runtime import FractionalPercent, Runtime


def runtime(*layers: dict) -> Runtime:
    proto = json_format.ParseDict({"layers": list(layers)}, LayeredRuntime())
    return Runtime.from_proto(proto, "layered_runtime")


def test_nested_structs_flatten_to_dotted_keys() -> None:
    rt = runtime({"name": "a", "static_layer": {
        "envoy": {"resource_limits": {"listener": {"l": {"connection_limit": 10000}}}},
        "flat.key": "v"}})
    assert rt.get_int("envoy.resource_limits.listener.l.connection_limit", 0) == 10000
    assert rt.get("envoy.resource_limits.listener.l.connection_limit") == "10000"
    assert rt.get("flat.key") == "v"
    assert "envoy.resource_limits" not in rt
    assert len(rt) == 2


def test_later_layers_override_earlier_ones() -> None:
    rt = runtime({"name": "base", "static_layer": {"a": 1, "b": {"c": "x"}}},
                 {"name": "override", "static_layer": {"b": {"c": "y"}}})
    assert rt.get_int("a", 0) == 1
    assert rt.get("b.c") == "y"


def test_missing_keys_give_the_default() -> None:
    rt = Runtime()
    assert rt.get("x") is None
    assert rt.get("x", "d") == "d"
    assert rt.get_int("x", 7) == 7
    assert rt.get_bool("x", True) is True


@pytest.mark.parametrize(("value", "as_bool", "as_int"), [
    (True, True, None), (False, False, None), ("TRUE", True, None), ("false", False, None),
    (0, False, 0), (3, True, 3), ("12", True, 12), (2.7, None, 2), (-1, None, None),
    ("hello", None, None),
])
def test_typed_readings_follow_envoy(value: object, as_bool: bool | None, as_int: int | None) -> None:
    rt = Runtime.from_dict({"k": value})
    assert rt.get_bool("k", None) is as_bool  # type: ignore[arg-type]
    assert rt.get_int("k", None) == as_int  # type: ignore[arg-type]


def test_fractional_percent_struct_is_one_value() -> None:
    rt = Runtime.from_dict({"f": {"numerator": 5, "denominator": "TEN_THOUSAND"}, "e": {}})
    assert rt.get_fractional_percent("f") == FractionalPercent(5, 10_000)
    assert "f.numerator" not in rt
    assert "e" in rt


@pytest.mark.parametrize("bad", [None, [1, 2]])
def test_nulls_and_lists_are_refused_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        runtime({"name": "a", "static_layer": {"x": {"y": bad}}})
    assert info.value.path == "layered_runtime.layers[0].static_layer.x.y"


def test_duplicate_layer_names_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        runtime({"name": "a", "static_layer": {}}, {"name": "a", "static_layer": {}})
    assert info.value.path == "layered_runtime.layers[1].name"


def test_non_static_layers_are_refused() -> None:
    with pytest.raises(ConfigError, match="admin_layer is not supported"):
        runtime({"name": "admin", "admin_layer": {}})


def test_feature_enabled_uses_the_runtime_value_over_the_default() -> None:
    rt = Runtime.from_dict({"on": 100, "off": 0, "half": 50, "big": 1000})
    assert rt.feature_enabled("on", 0, random_value=99)
    assert not rt.feature_enabled("off", 100, random_value=0)
    assert rt.feature_enabled("half", 0, random_value=149)   # 149 % 100 = 49 < 50
    assert not rt.feature_enabled("half", 0, random_value=150)
    assert rt.feature_enabled("big", 0, random_value=99)     # capped at 100
    assert rt.feature_enabled("missing", 30, random_value=29)
    assert not rt.feature_enabled("missing", 30, random_value=30)


@given(pct=st.integers(0, 200), draw=st.integers(0, 2**64 - 1))
def test_feature_enabled_is_a_pure_threshold(pct: int, draw: int) -> None:
    rt = Runtime.from_dict({"k": pct})
    assert rt.feature_enabled("k", 0, random_value=draw) == (draw % 100 < min(pct, 100))


def test_feature_enabled_without_a_draw_is_random_but_bounded() -> None:
    rt = Runtime.from_dict({"k": 50})
    results = {rt.feature_enabled("k", 0) for _ in range(200)}
    assert results == {True, False}


@given(text=st.text(max_size=12))
def test_any_string_value_is_read_without_error(text: str) -> None:
    rt = Runtime.from_dict({"k": text})
    assert rt.get("k") == text
    value = rt.get_int("k", -1)
    assert value == -1 or value >= 0


@pytest.mark.parametrize(("text", "as_int"), [("1_0", None), ("²", None), (" 7 ", 7), ("+3", 3),
                                              ("1e3", 1000), ("inf", None), ("nan", None)])
def test_numeric_strings_are_read_like_absl(text: str, as_int: int | None) -> None:
    assert Runtime.from_dict({"k": text}).get_int("k", None) == as_int  # type: ignore[arg-type]
