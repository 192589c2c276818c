"""Build the man pages tarpit-smtpd(8), tarpitctl(8) and tarpit.toml(5) into OUTDIR/man5, man8.

    python scripts/manpages.py OUTDIR

One source with the docs: the prose is docs/man/*.md; the tables are read from the code
itself (every configuration key, its environment variable and per-class defaults from
libtarpit.config; tarpitctl's commands and options from its argparse parsers), so a page
cannot list a knob the program does not have.  Run by scripts/setup.sh with the installed
Python.  The Markdown understood: a front-matter block (name, section, summary), `# HEAD`,
paragraphs, `- ` items, fenced code, `code`, **bold** and *italic*.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "man"


def roff_text(text: str) -> str:
    """Inline Markdown -> roff: escapes, then `code` and **bold** as bold."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]*)`", r"\\fB\1\\fR", text)
    text = re.sub(r"\*\*([^*]*)\*\*", r"\\fB\1\\fR", text)
    return re.sub(r"\*([^*\s][^*]*)\*", r"\\fI\1\\fR", text)


def line(text: str) -> str:
    """A roff input line that cannot be taken for a request."""
    return "\\&" + text if text[:1] in (".", "'") else text


def to_roff(md: str, date: str) -> str:
    """The whole page: front matter -> .TH and NAME, then the Markdown body."""
    m = re.match(r"---\n(.*?)\n---\n", md, re.S)
    meta = dict(ln.split(": ", 1) for ln in m.group(1).splitlines())
    out = [f'.TH "{meta["name"].upper()}" "{meta["section"]}" "{date}" "tarpit-smtpd" "tarpit-smtpd"',
           ".SH NAME", f"{roff_text(meta['name'])} \\- {roff_text(meta['summary'])}"]
    para: list[str] = []
    code = False

    def flush() -> None:
        if para:
            out.append(".PP")
            out.extend(line(roff_text(p)) for p in para)
            para.clear()

    for raw in md[m.end():].splitlines():
        if raw.startswith("```"):
            flush()
            out.append(".PP\n.nf\n.RS 4" if not code else ".RE\n.fi")
            code = not code
        elif code:
            out.append(line(raw.replace("\\", "\\e").replace("-", "\\-")))
        elif raw.startswith("# "):
            flush()
            out.append(f".SH {raw[2:].upper()}")
        elif raw.startswith("- "):
            flush()
            out += [".IP \\(bu 2", line(roff_text(raw[2:]))]
        elif raw.startswith("  ") and out and out[-1] and not para:
            out += [".br", line(roff_text(raw.strip()))]  # a line of its own under an item
        elif not raw.strip():
            flush()
        else:
            para.append(raw)
    flush()
    return "\n".join(out) + "\n"


def class_table() -> str:
    """Every per-class knob: key, variable, defaults for trusted / suspicious / normal."""
    from libtarpit import checks, config

    actions = {c.key: c for c in checks.CHECKS.values()}
    rows = []
    for key, var in config.ENV_KEYS.items():
        values = " / ".join(str(getattr(config.DEFAULTS[c], key)) for c in config.CLASSES)
        what = f"the action of the `{actions[key].name}` check (ignore, warn, enforce, drop)" \
            if key in actions else ""
        rows.append(f"- `{key}` (`{var}`): {values}" + (f"; {what}" if what else ""))
    return "\n".join(rows)


def global_table() -> str:
    """Every global key: key, variable, default."""
    from libtarpit import config

    defaults = config.Config()
    return "\n".join(f"- `{key}` (`{var}`): default `{getattr(defaults, key)!r}`"
                     for key, var in config.GLOBAL_ENV.items())


def commands() -> str:
    """tarpitctl's commands with their options, from the parsers the program itself uses."""
    import importlib

    from tarpit_wrappers.tarpitctl import SUBCOMMANDS

    out = []
    for name, text in SUBCOMMANDS.items():
        sp = argparse.ArgumentParser(prog=f"tarpitctl {name}", add_help=False)
        importlib.import_module(f"tarpit_wrappers.ctl_{name}").add_arguments(sp)
        usage = " ".join(sp.format_usage().split())[len("usage: "):]
        out.append(f"- `{usage}`: {text}.")
        for action in sp._actions:
            if action.option_strings and action.help:
                out.append(f"  `{', '.join(action.option_strings)}`: {action.help}")
    return "\n".join(out)


def build(outdir: Path, date: str = "2026-11-26") -> list[Path]:
    """Write the three pages under `outdir`; return their paths."""
    fill = {"@CLASS@": class_table, "@GLOBAL@": global_table, "@COMMANDS@": commands}
    written = []
    for src in sorted(DOCS.glob("*.md")):
        md = src.read_text(encoding="utf-8")
        for mark, make in fill.items():
            if mark in md:
                md = md.replace(mark, make())
        section = src.stem.rsplit(".", 1)[1]
        path = outdir / f"man{section}" / src.stem
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_roff(md, date), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: manpages.py OUTDIR")
    for p in build(Path(sys.argv[1])):
        print(p)
