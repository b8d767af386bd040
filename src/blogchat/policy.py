"""Model policy: which model aliases exist, what they map to, and who may use them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from blogchat.personas import Persona
from blogchat.protocol import ModelAlias
from blogchat.settings import Settings

ALIASES: Final[tuple[ModelAlias, ...]] = get_args(ModelAlias)
DEFAULT_MODEL: Final[ModelAlias] = "haiku"
ANONYMOUS_MODELS: Final[frozenset[ModelAlias]] = frozenset({"haiku"})
LABELS: Final[dict[ModelAlias, str]] = {"haiku": "Haiku", "sonnet": "Sonnet", "opus": "Opus"}
DESCRIPTIONS: Final[dict[ModelAlias, str]] = {
    "haiku": "Fastest: quick questions, summaries and lookups.",
    "sonnet": "Balanced: more careful answers, a little slower.",
    "opus": "Most capable: hard questions, at its own pace.",
}

Engine = Literal["claude", "offline"]


@dataclass(frozen=True)
class ModelChoice:
    """A model as listed to a visitor by `GET /api/models`."""

    id: ModelAlias
    label: str
    allowed: bool
    model_id: str
    description: str


def model_id(settings: Settings, alias: ModelAlias) -> str:
    """The configured provider model id behind an alias."""
    return {
        "haiku": settings.model_haiku,
        "sonnet": settings.model_sonnet,
        "opus": settings.model_opus,
    }[alias]


def allowed(alias: ModelAlias, *, anonymous: bool) -> bool:
    """Whether a visitor may use a model: anonymous visitors get haiku only."""
    return not anonymous or alias in ANONYMOUS_MODELS


def default_for(persona: Persona, *, anonymous: bool) -> ModelAlias:
    """The model of a new chat that names none: the persona's own if the visitor may use it."""
    chosen = persona.model
    if chosen is not None and allowed(chosen, anonymous=anonymous):  # type: ignore[arg-type]
        return chosen  # type: ignore[return-value]
    return DEFAULT_MODEL


def choices(settings: Settings, *, anonymous: bool) -> list[ModelChoice]:
    """Every model alias with whether this visitor may pick it."""
    return [
        ModelChoice(
            alias,
            LABELS[alias],
            allowed(alias, anonymous=anonymous),
            model_id(settings, alias),
            DESCRIPTIONS[alias],
        )
        for alias in ALIASES
    ]
