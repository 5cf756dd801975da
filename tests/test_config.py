"""Settings: one validation place, clear errors naming the key, command-line overrides."""

import pytest
from streamchat.cli import build_parser, settings_from_args
from streamchat.config import CONFIG_DIR, SettingsError, load_settings, parse_assignments


def test_default_config_loads():
    settings = load_settings()
    assert settings.policy == "sink_window" and settings.sinks == 4 and settings.window == 1020
    assert settings.budget == 1024


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"windw": 5}, "windw"),
        ({"window": 0}, "window"),
        ({"window": "many"}, "window"),
        ({"sinks": -1}, "sinks"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 1e-9}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"dtype": "int3"}, "dtype"),
        ({"policy": "magic"}, "policy"),
        ({"pin_system_prompt": "maybe"}, "pin_system_prompt"),
        ({"slack": 2000}, "slack"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(SettingsError, match=key):
        load_settings(None, overrides)


def test_invalid_yaml_and_wrong_shapes(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("window: [1, 2\n")
    with pytest.raises(SettingsError, match="invalid YAML"):
        load_settings(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- window\n- 3\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(listing)
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


def test_strings_from_command_line_are_typed():
    settings = load_settings(None, {"window": "60", "temperature": "0", "system_prompt": "42", "seed": "null"})
    assert settings.window == 60 and settings.temperature == 0.0
    assert settings.system_prompt == "42" and settings.seed is None


def test_flags_override_set_which_overrides_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("window: 100\nsinks: 2\ntemperature: 0.5\n")
    parser = build_parser()
    args = parser.parse_args(
        ["chat", "--config", str(config), "--set", "window=70", "--window", "60", "--system", "Hi"]
    )
    settings = settings_from_args(args)
    assert settings.window == 60 and settings.sinks == 2 and settings.temperature == 0.5
    assert settings.system_prompt == "Hi"


def test_parse_assignments():
    assert parse_assignments(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(SettingsError, match="key=value"):
        parse_assignments(["oops"])


def test_every_shipped_config_is_valid():
    for path in CONFIG_DIR.glob("*.yaml"):
        load_settings(path)


def test_every_command_takes_lists_the_same_way():
    """Space- and comma-separated lists, and repeated flags, give the same list; unknown items name the valid ones."""
    from streamchat.cli import build_parser

    parser = build_parser()
    forms = (
        ["--policies", "window", "h2o"],
        ["--policies", "window,h2o"],
        ["--policies", "window", "--policies", "h2o"],
    )
    for form in forms:
        assert parser.parse_args(["ppl", "--text", "x", *form]).policies == ["window", "h2o"]
    assert parser.parse_args(["bench", "--only", "curve", "speed"]).only == ["curve", "speed"]
    assert parser.parse_args(["bench", "--budget", "256,1024"]).budget == [256, 1024]
    assert parser.parse_args(["speed", "--weights", "int4", "int8"]).weights == ["int4", "int8"]
    assert parser.parse_args(["bench"]).only == list(parser.parse_args(["bench"]).only)  # defaults are lists too


def test_a_bad_list_item_names_the_valid_choices(capsys):
    from streamchat import cli

    assert cli.main(["ppl", "--text", "x", "--policies", "window,recompute,nope"]) == 2
    err = capsys.readouterr().err
    assert "--policies: unknown nope; valid:" in err and "sink_window" in err
    assert cli.main(["bench", "--budget", "12,abc"]) == 2
    assert "--budget: expected int values" in capsys.readouterr().err
