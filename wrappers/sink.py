"""tarpit-sink: a small SMTP server on stdin/stdout that delivers to a Maildir.

    tcpserver 127.0.0.1 2525 tarpit-sink MAILDIR
    tcpserver 127.0.0.1 2525 tarpit-smtpd tarpit-sink MAILDIR

It speaks SMTP on fd 0/fd 1 the way qmail-smtpd does under tcpserver, so the
README demo and the tests have a real backend on a machine with no MTA.  It is
aiosmtpd's SMTP protocol over the inherited socket; each accepted message is
written to MAILDIR/new with the standard library's mailbox module exactly as
it came off the wire (after SMTP dot-unstuffing, CRLF line ends kept), and one
line `tarpit-sink delivered ...` goes to stderr.  Every recipient is accepted:
it is a sink, not an MTA.  Exit status 0, 100 for usage, 111 if fd 0 is not a
socket or the Maildir cannot be written.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

USAGE = "usage: tarpit-sink MAILDIR\n"


class MaildirHandler:
    """aiosmtpd handler: store each message in a Maildir, byte for byte."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        """Advertise PIPELINING too: aiosmtpd reads commands in order, so pipelined clients work."""
        session.host_name = hostname
        return responses[:1] + ["250-PIPELINING"] + responses[1:]

    def __init__(self, path: str):
        import mailbox

        self.box = mailbox.Maildir(path, create=True)

    async def handle_DATA(self, server, session, envelope) -> str:
        """Store the message; return aiosmtpd's reply text (250, or 451 if the disk failed)."""
        from libtarpit.log import escape_value

        try:
            key = self.box.add(envelope.original_content)
        except OSError as e:
            sys.stderr.write(f"tarpit-sink error detail={escape_value(str(e))}\n")
            return "451 4.3.0 Could not store the message, try again later"
        sys.stderr.write(
            f"tarpit-sink delivered from={escape_value(envelope.mail_from)} "
            f"to={escape_value(','.join(envelope.rcpt_tos))} "
            f"bytes={len(envelope.original_content)} file=new/{key}\n")
        sys.stderr.flush()
        return f"250 2.0.0 Ok: queued as {key}"


async def serve(sock: socket.socket, handler: MaildirHandler) -> None:
    """Run one SMTP session on `sock` until the client goes."""
    from aiosmtpd.smtp import SMTP

    done = asyncio.get_running_loop().create_future()

    class OneSession(SMTP):
        def connection_lost(self, exc):
            super().connection_lost(exc)
            if not done.done():
                done.set_result(None)

    hostname = os.environ.get("TCPLOCALHOST", "0")
    if hostname in ("", "0"):  # tcpserver -l0 sets "0": no name given
        hostname = os.uname().nodename
    await asyncio.get_running_loop().connect_accepted_socket(
        lambda: OneSession(handler, hostname=hostname, ident="tarpit-sink ESMTP"), sock)
    await done


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    from tarpit_wrappers.about import about

    answered = about(argv, "tarpit-sink", USAGE, "A small SMTP server on fd 0/1 (under tcpserver) that delivers\n"
                     "every message to the Maildir MAILDIR: the demo's and the tests' backend.")
    if answered is not None:
        return answered
    if len(argv) != 1:
        sys.stderr.write(USAGE)
        return 100
    try:
        handler = MaildirHandler(argv[0])
    except OSError as e:
        sys.stderr.write(f"tarpit-sink: cannot use Maildir {argv[0]}: {e}\n")
        return 111
    try:
        sock = socket.socket(fileno=0)
    except OSError:
        sys.stderr.write("tarpit-sink: fd 0 must be a socket (run me under tcpserver)\n")
        return 111
    os.close(1)  # the socket is fd 0; keep fd 1 from holding the connection open after we close
    asyncio.run(serve(sock, handler))
    return 0


if __name__ == "__main__":
    sys.exit(main())
