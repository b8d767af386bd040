"""What an agent process may see: directories of its own, and an environment built from an
allow-list rather than inherited from the server.

The Claude Agent SDK starts the CLI with the server's whole environment merged under the
options' `env` (`DATABASE_URL`, `BLOGCHAT_SECRET_KEY`, `BRAINTRUST_API_KEY`, ...), and
offers no way to turn that off. So the CLI is started through a small launcher script
that unsets every variable the engine did not name, then execs the real CLI. The values
never appear on a command line (where `ps` would show them), only in the environment.
docs/claude.md ("Least privilege") explains what the agent gets and why.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import claude_agent_sdk

from blogchat.settings import Settings

# Variables the SDK itself sets on the CLI's environment, which the launcher must keep.
SDK_VARIABLES = (
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_AGENT_SDK_VERSION",
    "CLAUDE_AGENT_SDK_CLIENT_APP",
    "CLAUDE_CODE_SDK_READS_SESSION_STATE",
    "PWD",
)
# Taken from the server's environment when set: the locale and the time zone.
LOCALE_VARIABLES = ("LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ")
# The launcher reads the names to keep from this variable (and drops it too).
KEEP_VARIABLE = "BLOGCHAT_AGENT_KEEP"
# Where executables are looked up; the agent runs no program of its own.
SEARCH_PATH = "/usr/local/bin:/usr/bin:/bin"

# bash, for `compgen -e`, which lists the exported variables by name (a value may hold
# newlines, so parsing `env` output would not be safe). `-p`: no BASH_ENV file is read
# and no function is imported from the environment.
_LAUNCHER = """#!{bash} -p
# Written by blogchat: starts the agent CLI with only the variables blogchat named for it.
keep=" {KEEP} "
for name in $(compgen -e); do
  [[ $keep == *" $name "* ]] || unset "$name" 2>/dev/null
done
unset {KEEP_VARIABLE}
exec {reaper}{cli} "$@"
"""


@dataclass(frozen=True)
class AgentDirs:
    """The agent processes' own directories: the working directory under
    `BLOGCHAT_AGENT_DIR` (`root`), the rest under `own` (`BLOGCHAT_AGENT_CONFIG_DIR`).

    Instances of one blog share the working directory's path (the stored transcripts are
    keyed by it, so a chat resumes on any instance), but never the rest: two instances on
    one machine would otherwise delete each other's local copies of a chat's transcript,
    and rewrite each other's launcher.
    """

    root: Path
    own: Path

    @property
    def workdir(self) -> Path:
        """The working directory: empty, and stable (transcripts are keyed by its path)."""
        return self.root / "workdir"

    @property
    def config(self) -> Path:
        """`CLAUDE_CONFIG_DIR`: the CLI's settings and its local copies of transcripts."""
        return self.own / "config"

    @property
    def home(self) -> Path:
        """`HOME`: anything the CLI writes under a home directory lands here."""
        return self.own / "home"

    @property
    def tmp(self) -> Path:
        """`TMPDIR`."""
        return self.own / "tmp"

    @property
    def launcher(self) -> Path:
        """The script that starts the CLI with the allow-listed environment only."""
        return self.own / "bin" / "claude"

    def create(self) -> None:
        """Make the directories (private to the server's user) and write the launcher."""
        for path in (self.workdir, self.config, self.home, self.tmp, self.launcher.parent):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o700)
        bash = shutil.which("bash")
        if bash is None:
            raise FileNotFoundError("bash is needed to start the agent CLI")
        script = _LAUNCHER.replace("{bash}", bash)
        script = script.replace("{KEEP}", f"${{{KEEP_VARIABLE}}}")
        script = script.replace("{KEEP_VARIABLE}", KEEP_VARIABLE)
        script = script.replace("{reaper}", _dies_with_its_parent())
        script = script.replace("{cli}", _shell_quote(str(bundled_cli())))
        # Written whole and renamed into place: a process starting meanwhile never runs
        # half a script.
        scratch = self.launcher.with_suffix(".new")
        scratch.write_text(script)
        scratch.chmod(0o700)
        scratch.replace(self.launcher)


def _dies_with_its_parent() -> str:
    """The command that makes the CLI die with the server: `setpriv --pdeathsig` (Linux's
    util-linux), kept across the exec. A CLI whose stdin closes (its server was killed)
    goes on with its running turn, model requests included, before it exits."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ""
    return f"{_shell_quote(setpriv)} --pdeathsig KILL -- "


def bundled_cli() -> Path:
    """The CLI the SDK bundles (the one it would start by itself)."""
    bundled = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    if bundled.is_file():
        return bundled
    found = shutil.which("claude")
    if found is None:
        raise FileNotFoundError("the Claude Agent SDK's bundled CLI is missing")
    return Path(found)


def agent_environment(settings: Settings, dirs: AgentDirs, flags: dict[str, str]) -> dict[str, str]:
    """The whole environment of an agent process: the Anthropic variables it needs, its own
    directories, the locale, the CLI's `flags`, and what the owner passes through on
    purpose (`BLOGCHAT_AGENT_ENV_PASSTHROUGH`). Nothing else reaches it."""
    key = settings.anthropic_api_key
    env = {
        "PATH": SEARCH_PATH,
        "HOME": str(dirs.home),
        "TMPDIR": str(dirs.tmp),
        "CLAUDE_CONFIG_DIR": str(dirs.config),
        "ANTHROPIC_API_KEY": key.get_secret_value() if key else "",
        **flags,
    }
    if settings.anthropic_base_url:
        env["ANTHROPIC_BASE_URL"] = settings.anthropic_base_url
    for name in (*LOCALE_VARIABLES, *settings.agent_env_passthrough):
        if (value := os.environ.get(name)) is not None:
            env[name] = value
    env[KEEP_VARIABLE] = " ".join(sorted({*env, *SDK_VARIABLES}))
    return env


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
