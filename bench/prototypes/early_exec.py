"""Prototype, for measuring only: the exec fast path decided before libtarpit is imported.

    python bench/run.py --wrapper "PYTHON bench/prototypes/early_exec.py"

A trusted client (RELAYCLIENT set) with no per-client knob in the environment
and no tarpit.toml gets the default trusted policy, which never needs the
proxy: exec PROGRAM at once, after one logfmt `exec` line.  Anything else runs
the real wrapper, unchanged.  The real change would live in
wrappers/tarpit_smtpd.py and must stay exactly as strict as Session's own
decision (any knob or config file present -> the full path).
"""

import os
import sys


def trusted_default(env, argv) -> bool:
    """True when the full wrapper would certainly exec without a pause for this client."""
    if not argv or argv[0].startswith("--") or "RELAYCLIENT" not in env or "TARPIT_CONFIG" in env:
        return False
    if any(k == "GREETDELAY" or k.startswith("TARPIT_") and k not in ("TARPIT_CONTROL", "TARPIT_GREYLIST_URL")
           for k in env):
        return False
    control = env.get("TARPIT_CONTROL", "/var/qmail/control")
    return not os.path.exists(os.path.join(control, "tarpit.toml"))


def clean(value: str) -> str:
    return "".join(c if "!" <= c <= "~" else "?" for c in value[:200]) or "-"


def main() -> None:
    env, argv = os.environ, sys.argv[1:]
    if trusted_default(env, argv):
        import _signal  # the C module: `signal` would import enum (~1-4 ms)

        _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
        sys.stderr.write(f"tarpit-smtpd pid={os.getpid()} ip={clean(env.get('TCPREMOTEIP', '-'))} "
                         f"host={clean(env.get('TCPREMOTEHOST', '-'))} class=trusted rule=- event=exec\n")
        sys.stderr.flush()
        os.execvp(argv[0], argv)
    from tarpit_wrappers.tarpit_smtpd import main as full

    sys.exit(full())


if __name__ == "__main__":
    main()
