"""Prototype, for measuring only: the real wrapper, leaving without interpreter shutdown.

    python bench/run.py --only exit --wrapper "PYTHON bench/prototypes/quick_exit.py"

Runs tarpit_wrappers.tarpit_smtpd.main() unchanged, then flushes stderr and
calls os._exit(status): Python's own shutdown (module teardown, GC) is skipped.
With QUICK_EXIT_TERM=1 in the environment it also replaces Backend.stop() with
"close our end, SIGTERM at once, reap", instead of waiting up to 50 ms for the
backend to exit on EOF: the right thing only when no message is in flight
(the session ended in a tarpit, a greet pause, or on a timeout).
"""

import os
import signal
import socket
import sys

from tarpit_wrappers import tarpit_smtpd


def stop_at_once(self) -> int:
    try:
        self.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    self.sock.close()
    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        if self._wait(wait):
            break
    return self.status or 0


def main() -> None:
    if os.environ.get("QUICK_EXIT_TERM") == "1":
        tarpit_smtpd.Backend.stop = stop_at_once
    status = tarpit_smtpd.main()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
