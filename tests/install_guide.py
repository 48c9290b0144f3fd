"""The commands of docs/operations.md, "Installation (systemd)", as the guide gives them:
the code blocks of its numbered steps, in order. Two tests run them: test_install_guide
(steps 2-4 on this machine, paths moved under a temporary root) and test_systemd_nspawn
(every step, unchanged, on a fresh Debian under a real systemd)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
_SECTION = "## Installation (systemd)"


@dataclass(frozen=True, slots=True)
class Block:
    step: int
    lang: str
    text: str


def blocks() -> list[Block]:
    """Every fenced block of the section's numbered steps, in the order of the guide."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split(_SECTION, 1)[1].split("**What the unit does.**", 1)[0]
    found: list[Block] = []
    for step in re.split(r"^(?=\d+\. \*\*)", section, flags=re.MULTILINE)[1:]:
        number = int(step.split(".", 1)[0])
        for lang, body in re.findall(r"^ *```(\w+)\n(.*?)^ *```$", step, flags=re.MULTILINE | re.DOTALL):
            # The blocks are indented under their list item; the commands are not.
            lines = body.splitlines()
            indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
            found.append(Block(number, lang, "\n".join(line[indent:] for line in lines) + "\n"))
    return found


def config_toml() -> str:
    """The example configuration file of step 2."""
    (toml,) = [b.text for b in blocks() if b.lang == "toml"]
    return toml


def shell(steps: range) -> str:
    """The shell commands of ``steps``, one script, stopping at the first that fails."""
    commands = [b.text for b in blocks() if b.lang == "sh" and b.step in steps]
    return "set -euo pipefail\n" + "".join(commands)


def with_setting(toml: str, section: str, key: str, value: str) -> str:
    """``toml`` with ``key`` of ``[section]`` set to the string ``value`` (the line replaced)."""
    head, sep, rest = toml.partition(f"[{section}]\n")
    assert sep, f"no [{section}] in the guide's configuration"
    body, nxt, tail = rest.partition("\n[")
    body, count = re.subn(rf"^{key} = .*$", f'{key} = "{value}"', body, count=1, flags=re.MULTILINE)
    assert count == 1, f"no {section}.{key} in the guide's configuration"
    return head + sep + body + nxt + tail
