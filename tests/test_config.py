from __future__ import annotations

import typing

import pytest

import loopwatch
from loopwatch import Config


def test_the_typed_options_are_the_options() -> None:
    # ConfigOptions types every **options for the type checker; _OPTIONS validates them.
    from loopwatch._config import _OPTIONS, ConfigOptions

    hints = typing.get_type_hints(ConfigOptions)
    assert list(hints) == list(_OPTIONS)
    assert {name: option.kind for name, option in _OPTIONS.items()} == hints
    # ... and Config's attributes, for the type checker too, are the same.
    assert typing.get_type_hints(Config) == hints


def test_defaults() -> None:
    c = Config()
    assert c.block_threshold == 0.1 and c.probe_interval == 0.01
    assert c.log_blocks is True and c.sample_stacks is True
    assert "block_threshold=0.1" in repr(c)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_threshold": 0}, "invalid block_threshold=0; allowed: a number of seconds > 0"),
        ({"block_threshold": -0.5}, "invalid block_threshold=-0.5; allowed"),
        ({"block_threshold": float("nan")}, "invalid block_threshold=nan"),
        ({"block_threshold": "0.1"}, "invalid block_threshold='0.1'"),
        ({"block_threshold": True}, "invalid block_threshold=True"),
        ({"probe_interval": 0.1}, "invalid probe_interval=0.1; allowed: a number of seconds "
                                  ">= 0.001 and below block_threshold (0.1)"),
        ({"probe_interval": 0.0001}, "invalid probe_interval=0.0001; allowed: a number of "
                                     "seconds >= 0.001"),
        ({"block_threshold": 0.05, "probe_interval": 0.06}, "invalid probe_interval=0.06"),
        ({"ring_size": 0}, "invalid ring_size=0; allowed: an integer from 1 to 100000"),
        ({"stack_depth": 2.5}, "invalid stack_depth=2.5"),
        ({"log_blocks": "yes"}, "invalid log_blocks='yes'; allowed: True or False"),
        ({"treshold": 0.1}, "unknown option 'treshold'; allowed options: block_threshold, "
                            "log_blocks, probe_interval, ring_size, sample_stacks, stack_depth"),
    ],
)
def test_bad_options_name_option_value_and_what_is_allowed(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        Config(**options)
    assert message in str(info.value)


def test_watch_and_monitor_validate_when_created() -> None:
    with pytest.raises(ValueError, match="block_threshold=0"):
        loopwatch.watch(block_threshold=0)
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        loopwatch.Monitor(bogus=1)


def test_from_env_parses_and_names_the_variable() -> None:
    c = Config.from_env({"LOOPWATCH_BLOCK_THRESHOLD": "0.05", "LOOPWATCH_LOG_BLOCKS": "off",
                         "LOOPWATCH_PROBE_INTERVAL": "0.005", "UNRELATED": "x"})
    assert c.block_threshold == 0.05 and c.log_blocks is False and c.probe_interval == 0.005
    with pytest.raises(ValueError, match=r"LOOPWATCH_BLOCK_THRESHOLD='fast'; allowed: a number"):
        Config.from_env({"LOOPWATCH_BLOCK_THRESHOLD": "fast"})
    with pytest.raises(ValueError, match=r"block_threshold=-1.0.*LOOPWATCH_BLOCK_THRESHOLD"):
        Config.from_env({"LOOPWATCH_BLOCK_THRESHOLD": "-1"})
    with pytest.raises(ValueError, match=r"LOOPWATCH_SAMPLE_STACKS='maybe'; allowed: True or"):
        Config.from_env({"LOOPWATCH_SAMPLE_STACKS": "maybe"})


def test_config_is_immutable_and_replace_validates() -> None:
    c = Config()
    with pytest.raises(AttributeError):
        c.block_threshold = 1  # type: ignore[misc]
    assert c.replace(block_threshold=0.2).block_threshold == 0.2
    with pytest.raises(ValueError, match="probe_interval"):
        c.replace(block_threshold=0.005)
    assert Config() == Config() and hash(Config()) == hash(Config())


def test_a_misspelled_variable_is_named_once_and_others_are_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"LOOPWATCH_BLOCK_THRESHOLDS": "0.05", "LOOPWATCH_EXTRAS": "dev",
           "LOOPWATCH_LOG_BLOCKS": "off"}
    with caplog.at_level("WARNING", logger="loopwatch"):
        c = Config.from_env(env)
        Config.from_env(env)
    assert c.block_threshold == 0.1 and c.log_blocks is False  # the misspelled one is ignored
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "LOOPWATCH_BLOCK_THRESHOLDS" in warnings[0]
    assert "did you mean LOOPWATCH_BLOCK_THRESHOLD?" in warnings[0]
