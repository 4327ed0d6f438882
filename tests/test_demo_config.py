"""The demo's settings, the simulator's controls and the load generator's parsers: pure code."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import httpx
import pytest
from fastapi import HTTPException

from demo_app import ConfigError, Settings
from demo_app.app import make_client
from demo_app.errors import InvalidUpstreamResponse, to_http_exception
from demo_app.faults import Behaviour
from demo_app.latency import LatencyHistogram
from demo_app.load import parse_header, parse_mix


def test_settings_defaults_are_the_articles() -> None:
    settings = Settings()
    assert (settings.timeout, settings.connect_timeout) == (10.0, 5.0)
    assert (settings.max_connections, settings.max_keepalive_connections) == (50, 20)
    assert settings.analytics_url == "http://127.0.0.1:8001/analytics/events"


def test_settings_from_env_reads_every_variable() -> None:
    env = {
        "DEMO_UPSTREAM_URL": "http://upstream:9000/",
        "DEMO_TIMEOUT_SECONDS": "2.5",
        "DEMO_CONNECT_TIMEOUT_SECONDS": "0.5",
        "DEMO_MAX_CONNECTIONS": "8",
        "DEMO_MAX_KEEPALIVE_CONNECTIONS": "4",
    }
    settings = Settings.from_env(env)
    assert settings == Settings(
        upstream_url="http://upstream:9000/",
        timeout=2.5,
        connect_timeout=0.5,
        max_connections=8,
        max_keepalive_connections=4,
    )
    assert settings.analytics_url == "http://upstream:9000/analytics/events"
    assert Settings.from_env(env, timeout=1.0).timeout == 1.0


def test_the_client_is_built_from_the_settings() -> None:
    client = make_client(Settings(upstream_url="http://sim:1", timeout=3, connect_timeout=1))
    assert client.timeout == httpx.Timeout(3, connect=1)
    assert client.base_url == "http://sim:1"


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("DEMO_TIMEOUT_SECONDS", "abc", "a number of seconds > 0"),
        ("DEMO_TIMEOUT_SECONDS", "-1", "a number of seconds > 0"),
        ("DEMO_TIMEOUT_SECONDS", "nan", "a number of seconds > 0"),
        ("DEMO_CONNECT_TIMEOUT_SECONDS", "0", "a number of seconds > 0"),
        ("DEMO_MAX_CONNECTIONS", "1.5", "an integer 1..10000"),
        ("DEMO_MAX_CONNECTIONS", "0", "an integer 1..10000"),
        ("DEMO_MAX_KEEPALIVE_CONNECTIONS", "-3", "an integer 0..10000"),
        ("DEMO_UPSTREAM_URL", "upstream:8001", "an http:// or https:// URL"),
        ("DEMO_ANALYTICS_URL", "ftp://sink/events", "an http:// or https:// URL"),
    ],
)
def test_a_bad_variable_names_itself_its_value_and_what_is_allowed(
    variable: str, value: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert f"{variable}={value!r}" in message
    assert allowed in message


def test_keepalive_above_the_pool_size_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"DEMO_MAX_KEEPALIVE_CONNECTIONS.*larger than"):
        Settings.from_env({"DEMO_MAX_CONNECTIONS": "5", "DEMO_MAX_KEEPALIVE_CONNECTIONS": "6"})


@pytest.mark.parametrize(
    "bad", [{"timeout": 0}, {"timeout": math.inf}, {"max_connections": True}, {"upstream_url": ""}]
)
def test_settings_validate_keyword_arguments_too(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"^{next(iter(bad))} "):
        Settings(**bad)  # type: ignore[arg-type]


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().timeout = 1  # type: ignore[misc]


def test_simulator_defaults_come_from_sim_variables() -> None:
    env = {
        "SIM_DELAY_MS": "150",
        "SIM_JITTER_MS": "10",
        "SIM_ERROR_RATE": "0.25",
        "SIM_DROP": "reset",
    }
    assert Behaviour.from_env(env) == Behaviour(
        delay_ms=150, jitter_ms=10, error_rate=0.25, drop="reset"
    )
    assert Behaviour.from_env({}) == Behaviour()


def test_headers_override_defaults_for_one_request() -> None:
    base = Behaviour(delay_ms=100, error_rate=0.5)
    headers = {"x-sim-delay-ms": "5", "x-sim-hang": "yes", "x-sim-drop": "1", "x-sim-status": "503"}
    assert base.with_headers(headers) == Behaviour(
        delay_ms=5, error_rate=0.5, hang=True, drop="close", status=503
    )
    assert base.with_headers({"x-sim-drop": "off"}) == base


@pytest.mark.parametrize(
    ("header", "value", "allowed"),
    [
        ("X-Sim-Delay-Ms", "soon", "an integer 0..600000 (milliseconds)"),
        ("X-Sim-Status", "200", "an HTTP error status 400..599"),
        ("X-Sim-Error-Rate", "1.5", "a number 0..1"),
        ("X-Sim-Hang", "maybe", "1/true/yes/on"),
        ("X-Sim-Drop", "slowly", "close, reset"),
    ],
)
def test_a_bad_control_header_names_itself(header: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Behaviour().with_headers({header.lower(): value})
    assert f"{header}={value!r}" in str(caught.value)
    assert allowed in str(caught.value)


def test_a_bad_sim_variable_names_itself() -> None:
    with pytest.raises(ConfigError, match="SIM_JITTER_MS='-5' is invalid"):
        Behaviour.from_env({"SIM_JITTER_MS": "-5"})


def detail_of(answer: HTTPException) -> dict[str, Any]:
    """The JSON ``detail``: a dict here, although Starlette types ``detail`` as a str."""
    detail: dict[str, Any] = answer.detail  # type: ignore[assignment]
    return detail


def _request() -> httpx.Request:
    return httpx.Request("GET", "http://sim/users/7")


@pytest.mark.parametrize(
    ("exc", "status", "code", "retryable"),
    [
        (httpx.ReadTimeout("timed out", request=_request()), 504, "upstream_timeout", True),
        (httpx.PoolTimeout("pool", request=_request()), 504, "upstream_timeout", True),
        (
            httpx.ConnectError("[Errno 111] refused", request=_request()),
            502,
            "upstream_unreachable",
            True,
        ),
        (
            httpx.ConnectError("[Errno -2] Name or service not known", request=_request()),
            502,
            "upstream_unreachable",
            True,
        ),
        (httpx.ReadError("reset", request=_request()), 502, "upstream_unreachable", True),
        (
            InvalidUpstreamResponse(httpx.Response(200, content=b"{", request=_request())),
            502,
            "upstream_invalid_response",
            True,
        ),
    ],
)
def test_upstream_failures_map_to_answers(
    exc: Exception, status: int, code: str, retryable: bool
) -> None:
    answer = to_http_exception(exc, "user 7")  # type: ignore[arg-type]
    detail = detail_of(answer)
    assert answer.status_code == status
    assert (detail["code"], detail["retryable"]) == (code, retryable)
    assert "user 7" in detail["message"]
    assert "sim" not in detail["message"]  # internal host names stay in the log


@pytest.mark.parametrize(
    ("upstream", "status", "code", "retryable"),
    [
        (404, 404, "not_found", False),
        (500, 502, "upstream_error", True),
        (503, 502, "upstream_error", True),
        (429, 502, "upstream_error", True),
        (401, 502, "upstream_error", False),
    ],
)
def test_upstream_statuses_map_to_answers(
    upstream: int, status: int, code: str, retryable: bool
) -> None:
    response = httpx.Response(upstream, request=_request())
    exc = httpx.HTTPStatusError("failed", request=response.request, response=response)
    answer = to_http_exception(exc, "user 7")
    detail = detail_of(answer)
    assert (answer.status_code, detail["code"], detail["retryable"]) == (status, code, retryable)


def test_mix_weights_follow_the_last_equals_sign() -> None:
    assert parse_mix("/data=5, /dashboard/1=3,/antipatterns/sleep?ms=150=1") == [
        ("/data", 5.0),
        ("/dashboard/1", 3.0),
        ("/antipatterns/sleep?ms=150", 1.0),
    ]


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ("/data", "needs a weight"),
        ("/data=heavy", "is not a number"),
        ("/data=0", "finite number > 0"),
        ("/data=inf", "finite number > 0"),
        ("http://elsewhere/=1", "must be a path"),
        ("//elsewhere/x=1", "must be a path"),
        ("/data=1,", "needs a weight"),
    ],
)
def test_bad_mixes_are_refused(mix: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mix(mix)


def test_headers_are_name_colon_value() -> None:
    assert parse_header("X-Sim-Delay-Ms: 200") == ("X-Sim-Delay-Ms", "200")
    with pytest.raises(ValueError, match="expected 'Name: value'"):
        parse_header("X-Sim-Delay-Ms 200")


def test_histogram_percentiles_are_within_one_percent() -> None:
    histogram = LatencyHistogram()
    samples = [n / 1000 for n in range(1, 1001)]  # 1 ms .. 1000 ms
    for seconds in reversed(samples):
        histogram.record(seconds)
    assert histogram.count == 1000
    assert histogram.max == 1.0
    for q, exact in [(0.5, 0.5), (0.95, 0.95), (0.99, 0.99), (1.0, 1.0)]:
        assert exact <= histogram.quantile(q) <= exact * 1.01, q
    assert histogram.quantile(0.001) == pytest.approx(0.001, rel=0.01)


def test_histogram_refuses_what_it_cannot_answer() -> None:
    with pytest.raises(ValueError, match="no latency"):
        LatencyHistogram().quantile(0.5)
    histogram = LatencyHistogram()
    histogram.record(0.0)  # below the floor: lands in the first bucket
    with pytest.raises(ValueError, match="0 < q <= 1"):
        histogram.quantile(0)
    assert histogram.quantile(1.0) == 0.0
