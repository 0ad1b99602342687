"""A config dataclass's own lines as documentation: each setting's section, default and comment, read from the
source once, for the docs' settings tables and the CLI's option help. The dataclass stays the one place a default
or its meaning is written (PrepConfig, TrainConfig, LocateConfig, DemoConfig).

Conventions the parser reads: `# --- section ---` lines open a section; a field's comment is on its own line
(`name: type = default  # what it does`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re


def field_notes(cls: type) -> dict[str, tuple[str, str, str]]:
    """name -> (section, default as written, comment). A subclass that re-declares a field (another default) wins,
    keeping its base's section."""
    out: dict[str, tuple[str, str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        section = ""
        for line in inspect.getsource(klass).splitlines():
            if line.strip().startswith("def "):
                break  # the fields come first
            heading = re.fullmatch(r"\s+# --- (.+) ---", line)
            if heading:
                section = heading.group(1)
                continue
            fld = re.fullmatch(r"\s{4}(\w+): [^=]+ = (.+?)(?:  # (.*))?", line)
            if fld and not fld.group(1).isupper() and "ClassVar" not in line:
                name, default, note = fld.groups()
                factory = re.fullmatch(r"field\(default_factory=(\w+)\)", default)
                default = {"dict": "{}", "list": "[]"}[factory.group(1)] if factory else default
                old = out.get(name, (section, default, note or ""))
                out[name] = (old[0], default, note or old[2])
    return out


def defaults(cls: type) -> dict[str, object]:
    """Each field's default, read off the class without constructing it (a constructor may validate against heavy
    modules, e.g. PrepConfig's codec check imports zarr; the CLI's option defaults must stay light)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def field_help(cls: type, name: str, default: bool = True) -> str:
    """A setting's comment (and its default, for options whose own default is 'not given'), for a CLI option."""
    _, value, note = field_notes(cls)[name]
    text = note
    if default:
        text = f"{text} (default {value})" if text else f"Default {value}"
    return text + "." if text and not text.endswith(".") else text


def settings_markdown(cls: type) -> str:
    """The settings table of a config dataclass: setting, default, what it does, grouped by section."""
    notes = field_notes(cls)
    rows = ["| setting | default | what it does |", "|---|---|---|"]
    section = None
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = dataclasses.fields(cls)  # the class's own settings first, then those it shares with its base
    for f in [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]:
        sec, default, note = notes[f.name]
        if sec != section and sec:
            rows.append(f"| **{sec}** | | |")
        section = sec
        rows.append(f"| `{f.name}` | `{default.replace('|', '/')}` | {note.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"
