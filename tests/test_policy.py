"""Model policy, in process: who may use which model, and what each alias maps to."""

from __future__ import annotations

from pathlib import Path

from blogchat import policy
from blogchat.personas import Persona
from blogchat.settings import Settings


def persona(model: str | None) -> Persona:
    return Persona(
        id="p",
        name="P",
        description="",
        system_prompt="You help.",
        allowed_tools=("searchBlogContent",),
        model=model,
    )


def test_anonymous_visitors_get_haiku_only_and_registered_users_any_model() -> None:
    for alias in policy.ALIASES:
        assert policy.allowed(alias, anonymous=False)
        assert policy.allowed(alias, anonymous=True) is (alias == "haiku")


def test_a_new_chat_takes_its_personas_model_if_the_visitor_may_use_it() -> None:
    assert policy.default_for(persona("opus"), anonymous=False) == "opus"
    assert policy.default_for(persona("opus"), anonymous=True) == "haiku"
    assert policy.default_for(persona(None), anonymous=False) == "haiku"


def test_aliases_map_to_the_configured_ids_and_are_listed_with_who_may_use_them(
    tmp_path: Path,
) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        model_haiku="claude-haiku-4-5-20251001",
        model_opus="claude-opus-4-5",
    )
    assert policy.model_id(settings, "haiku") == "claude-haiku-4-5-20251001"
    assert policy.model_id(settings, "opus") == "claude-opus-4-5"
    choices = policy.choices(settings, anonymous=True)
    assert [(c.id, c.allowed, c.model_id) for c in choices] == [
        ("haiku", True, "claude-haiku-4-5-20251001"),
        ("sonnet", False, settings.model_sonnet),
        ("opus", False, "claude-opus-4-5"),
    ]
