"""Free-text and path settings reach the session exactly as typed, from every entry point (issue 15 item 1):
named flags, --set, a YAML file with the value quoted, the REPL's /set and /system, the web UI and its API, and a
loaded .streamchat file. Numbers and switches typed as text still parse; an unusable value is quoted as typed."""

import pytest
from streamchat import persist
from streamchat.cli import build_parser, settings_from_args
from streamchat.config import SettingsError, load_settings
from streamchat.frontends.repl import run_command
from streamchat.session import ChatSession

# Each of these was changed or refused by a second YAML parse: a mapping, a comment, a list, quotes, a boolean.
TEXTS = [
    "A: b",
    "You are terse. Rule: answer in one line # no chit-chat",
    "#x",
    "x # y",
    "- item one",
    "'quoted' and \"double\"",
    '"fully double-quoted"',
    "yes",
    "on",
    "null",
    "[1, 2]",
    "{a: 1}",
    "42",
]
PATH_TEXTS = ["my: models/#1", "- folder", "yes", "on"]
SMALL = {"window": 200, "temperature": 0, "max_new_tokens": 4}


@pytest.mark.parametrize("text", TEXTS)
def test_overrides_keep_text_as_typed(text):
    settings = load_settings(None, {"system_prompt": text, "model": text, "prompts_file": text, "sessions_dir": text})
    assert settings.system_prompt == settings.model == settings.prompts_file == settings.sessions_dir == text


@pytest.mark.parametrize("text", TEXTS)
def test_named_flags_and_set_keep_text_as_typed(text):
    parser = build_parser()
    args = parser.parse_args(["chat", "--config", "", "--system", text, "--model", text])
    args.config = None
    settings = settings_from_args(args)
    assert settings.system_prompt == text and settings.model == text
    args = parser.parse_args(["chat", "--set", f"system_prompt={text}", "--set", f"sessions_dir={text}"])
    settings = settings_from_args(args)
    assert settings.system_prompt == text and settings.sessions_dir == text


@pytest.mark.parametrize("text", TEXTS)
def test_quoted_yaml_values_keep_text_as_typed(tmp_path, text):
    config = tmp_path / "c.yaml"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    config.write_text(f'system_prompt: "{escaped}"\nprompts_file: "{escaped}"\nwindow: "60"\n')
    settings = load_settings(config)
    assert settings.system_prompt == text and settings.prompts_file == text and settings.window == 60


def test_numbers_and_switches_typed_as_text_still_parse():
    settings = load_settings(
        None,
        {"temperature": "0.5", "window": " 60 ", "pin_system_prompt": "off", "decode_compile": "Yes", "seed": "7"},
    )
    assert settings.temperature == 0.5 and settings.window == 60 and settings.seed == 7
    assert settings.pin_system_prompt is False and settings.decode_compile is True
    assert load_settings(None, {"seed": "null"}).seed is None and load_settings(None, {"seed": ""}).seed is None
    assert load_settings(None, {"system_prompt": ""}).system_prompt is None


@pytest.mark.parametrize(
    "key,typed",
    [("window", "60 # tokens"), ("temperature", "0.5: warm"), ("pin_system_prompt", "- yes"), ("seed", "#7")],
)
def test_unusable_values_are_refused_quoting_them_as_typed(key, typed):
    with pytest.raises(SettingsError) as error:
        load_settings(None, {key: typed})
    assert key in str(error.value) and repr(typed) in str(error.value)


def test_unquoted_yaml_boolean_for_text_says_to_quote_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("system_prompt: yes\n")
    with pytest.raises(SettingsError, match="system_prompt.*quote"):
        load_settings(config)


# ----- front ends -----------------------------------------------------------------------------------------------


@pytest.fixture()
def session(tiny, tmp_path):
    return ChatSession(tiny, load_settings(None, {**SMALL, "sessions_dir": str(tmp_path)}))


@pytest.mark.parametrize("text", TEXTS)
def test_repl_system_and_set_keep_text_as_typed(session, text, capsys):
    run_command(session, f"/system {text}")
    assert session.settings.system_prompt == text
    assert session.messages[0] == {"role": "system", "content": text}
    run_command(session, "/reset")
    run_command(session, f"/set system_prompt={text}")
    assert session.settings.system_prompt == text
    run_command(session, "/set temperature=0.5")
    run_command(session, "/set pin_system_prompt=off")
    assert session.settings.temperature == 0.5 and session.settings.pin_system_prompt is False
    assert "".join(session.send("Hi")) is not None and session.messages[0]["content"] == text


def test_web_settings_box_and_api_keep_text_as_typed(tiny):
    import gradio as gr
    from streamchat.frontends.web import ChatApp

    app = ChatApp(tiny, load_settings(overrides=SMALL), max_sessions=2)
    request = gr.Request(session_hash="tab")
    for text in TEXTS:
        app.apply_settings(text, "sink_window", 4, 200, 32, 24, 0.5, 0.9, 50, 4, request)
        chat = app.session(request).chat
        assert chat.settings.system_prompt == text and chat.messages[0]["content"] == text
        app.api_new_conversation("x", request)
        app.api_new_conversation(text, request)
        assert app.session(request).chat.settings.system_prompt == text
        result = app.api_configure({"system_prompt": text, "temperature": "0.25"}, request)
        assert result["settings"]["system_prompt"] == text
        assert result["settings"]["temperature"] == 0.25
    with pytest.raises(gr.Error, match="'0.5: warm'"):
        app.api_configure({"temperature": "0.5: warm"}, request)


@pytest.mark.parametrize("text", ["A: b # c", "- yes", "#x"])
def test_loaded_session_file_keeps_text_as_typed(tiny, tmp_path, text):
    settings = load_settings(None, {**SMALL, "sessions_dir": str(tmp_path), "system_prompt": text})
    original = ChatSession(tiny, settings)
    "".join(original.send("Hello"))
    persist.save(original, "typed")
    fresh = ChatSession(tiny, load_settings(None, {**SMALL, "sessions_dir": str(tmp_path)}))
    persist.load(fresh, "typed")
    assert fresh.settings.system_prompt == text and fresh.messages == original.messages
