"""Personas: who the assistant is in a chat, what it may do, loaded from YAML at start."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

PersonaId = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", strip_whitespace=True)
]


class PersonaError(Exception):
    """The personas file is unusable; the message names the file, the persona and the field."""


class _PersonaSpec(BaseModel):
    """One persona as written in the YAML file."""

    model_config = ConfigDict(extra="forbid")

    id: PersonaId
    name: Annotated[str, StringConstraints(min_length=1, max_length=80, strip_whitespace=True)]
    description: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    system_prompt: Annotated[str, StringConstraints(min_length=1)]
    allowed_tools: list[str] = Field(min_length=1)
    model: Literal["haiku", "sonnet", "opus"] | None = None


class _PersonasFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personas: list[dict[str, object]] = Field(min_length=1)


@dataclass(frozen=True)
class Persona:
    """A validated persona."""

    id: str
    name: str
    description: str
    system_prompt: str
    allowed_tools: tuple[str, ...]
    model: str | None = None


class Personas(Mapping[str, Persona]):
    """The personas by id, in file order; the first is the default."""

    def __init__(self, personas: list[Persona]) -> None:
        self._by_id = {persona.id: persona for persona in personas}
        self.default = personas[0]

    def __getitem__(self, key: str) -> Persona:
        return self._by_id[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)


def load_personas(path: Path, known_tools: Collection[str]) -> Personas:
    """Read and validate the personas file; tools must be among `known_tools`."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PersonaError(f"{path}: cannot read the personas file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PersonaError(f"{path}: not valid YAML: {exc}") from None
    try:
        document = _PersonasFile.model_validate(raw)
    except ValidationError as exc:
        raise PersonaError(
            f"{path}: expected a top-level `personas:` list with at least one persona "
            f"({exc.errors()[0]['msg']})"
        ) from None

    personas: list[Persona] = []
    for index, entry in enumerate(document.personas):
        label = f"persona #{index + 1}"
        if isinstance(entry.get("id"), str):
            label = f"persona {entry['id']!r}"
        try:
            spec = _PersonaSpec.model_validate(entry)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "?"
            raise PersonaError(f"{path}: {label}: field '{field}': {error['msg']}") from None
        unknown = [tool for tool in spec.allowed_tools if tool not in known_tools]
        if unknown:
            raise PersonaError(
                f"{path}: {label}: field 'allowed_tools': unknown tool(s) {', '.join(unknown)}"
                f" (known: {', '.join(sorted(known_tools))})"
            )
        if any(persona.id == spec.id for persona in personas):
            raise PersonaError(f"{path}: {label}: field 'id': duplicate persona id")
        personas.append(
            Persona(
                id=spec.id,
                name=spec.name,
                description=spec.description.strip(),
                system_prompt=spec.system_prompt.strip(),
                allowed_tools=tuple(dict.fromkeys(spec.allowed_tools)),
                model=spec.model,
            )
        )
    return Personas(personas)
