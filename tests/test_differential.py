"""Differential tests (issue 10): what the wrapper checks must be what the backend executes.

Every CORPUS entry is a raw client byte script, odd spellings of MAIL, RCPT, RSET,
HELO, DATA, QUIT and BDAT, run through tcpserver -> tarpit-smtpd in front of each
real backend: tarpit-sink (aiosmtpd), exim (`exim4 -bs`) and qmail-smtpd (built
from the vendored notqmail).  The client is suspicious (a dynamic TCPREMOTEHOST,
TARPIT="1", no greylist) and the wrapper has rcptusers = bob, postmaster; every
backend accepts example.com.

THE INVARIANT, per backend and entry:
  1. every recipient the backend queued was checked by the wrapper: its local
     part (before the last `@`, any case) is bob or postmaster;
  2. if anything was queued, or a RCPT line got a 250, the wrapper logged
     `tarpit_done` for this connection (the tarpit was never skipped);
  3. with TARPIT_RCPT_LIMIT=n, no message was queued for more than n recipients.

How: one tcpserver per backend for the whole module; each entry connects from
its own loopback address (127.0.1.N), so log lines (ip=...) and per-IP state
never mix.  The `runs` fixture plays the corpus once, on first use, against
every backend selected in this session at the same time, WORKERS entries at a
time per backend; each parametrized test then judges one (entry, backend).
Each message's Subject carries the entry's id, which is how a queued message is
traced back:
qmail through the queue stub's envelope, exim through its mainlog `<=` line
(log_selector +received_recipients +subject), tarpit-sink through its
`delivered ... to=` log line and the Maildir file.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import Server, free_port, need
from qmail_backend import qmail_smtpd  # noqa: F401  (a fixture)
from test_exim_backend import EXIM, Exim, make_exim_root

DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
RCPTUSERS = {"bob", "postmaster"}
STEP_TIMEOUT = 15.0  # one reply (tarpit 1 s, error sleep 1 s, a loaded machine); missed: the script stops
DRAIN_IDLE = 2.5     # "read whatever comes": stop after this long with nothing
WORKERS = 10         # entries played at once, per backend


# --- the corpus ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One client script: steps of ("send", bytes, replies) / ("data", verb line) / ("drain", bytes)."""

    id: str
    steps: tuple
    env: dict = field(default_factory=dict)
    why: str = ""


def send(data: bytes, replies: int = 1) -> tuple:
    return ("send", data, replies)


def data(verb: bytes = b"DATA\r\n") -> tuple:
    """Send `verb`; on 354 send the message and the final dot, read its reply."""
    return ("data", verb)


def drain(payload: bytes) -> tuple:
    """Send `payload` and read replies until the line goes quiet (smuggling attempts)."""
    return ("drain", payload)


EHLO = send(b"EHLO client.example.net\r\n")
MAIL = send(b"MAIL FROM:<a@example.org>\r\n")
BOB = send(b"RCPT TO:<bob@example.com>\r\n")
NOSUCH = send(b"RCPT TO:<nosuchuser@example.com>\r\n")
QUIT = send(b"QUIT\r\n")
SMUGGLED = b"RCPT TO:<nosuchuser@example.com>\r\n"
# a whole second transaction, sent without waiting; @MSG@ becomes the entry's message and its dot
MORE_TXN = (b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<nosuchuser@example.com>\r\nDATA\r\n@MSG@")


def rcpt(case_id: str, line: bytes, why: str = "", **env: str) -> Case:
    """EHLO, MAIL, this RCPT line, DATA, QUIT."""
    return Case(case_id, (EHLO, MAIL, send(line), data(), QUIT), env, why)


def after_bob(case_id: str, *steps: tuple, why: str = "", **env: str) -> Case:
    """EHLO, MAIL, RCPT bob (tarpitted, allowed), then `steps`, then NOSUCH, DATA, QUIT."""
    return Case(case_id, (EHLO, MAIL, BOB, *steps, NOSUCH, data(), QUIT), env, why)


CORPUS = [
    # -- baseline
    rcpt("good", b"RCPT TO:<bob@example.com>\r\n", "must deliver everywhere"),
    rcpt("postmaster_bare", b"RCPT TO:<Postmaster>\r\n"),
    rcpt("plain_nosuch", b"RCPT TO:<nosuchuser@example.com>\r\n", "refused by rcptusers"),
    # -- where the path is (qmail: after the first '<', no '>' or TO: needed)
    rcpt("no_gt", b"RCPT TO:<nosuchuser@example.com\r\n"),
    rcpt("no_to", b"RCPT <nosuchuser@example.com>\r\n"),
    rcpt("no_to_colon", b"RCPT :<nosuchuser@example.com>\r\n"),
    rcpt("addr_then_path", b"RCPT TO:bob@example.com <nosuchuser@example.com>\r\n"),
    rcpt("phrase_then_path", b"RCPT TO:bob <nosuchuser@example.com>\r\n", "exim: phrase <route-addr>"),
    rcpt("quoted_phrase", b'RCPT TO:"bob" <nosuchuser@example.com>\r\n'),
    rcpt("bare_addr", b"RCPT TO:nosuchuser@example.com\r\n"),
    rcpt("bare_bob", b"RCPT TO:bob@example.com\r\n"),
    rcpt("bare_comma_list", b"RCPT TO:bob@example.com,nosuchuser@example.com\r\n"),
    rcpt("bracket_comma_list", b"RCPT TO:<bob@example.com>,<nosuchuser@example.com>\r\n"),
    rcpt("second_lt", b"RCPT TO:<bob@example.com<nosuchuser@example.com>\r\n"),
    rcpt("double_brackets", b"RCPT TO:<<nosuchuser@example.com>>\r\n"),
    rcpt("param_path", b"RCPT TO:<bob@example.com> <nosuchuser@example.com>\r\n"),
    rcpt("junk_param", b"RCPT TO:<nosuchuser@example.com> x\r\n"),
    rcpt("glued_junk", b"RCPT TO:<bob@example.com>nosuchuser@example.com\r\n"),
    rcpt("null_rcpt", b"RCPT TO:<>\r\n"),
    rcpt("unqualified_nosuch", b"RCPT TO:<nosuchuser>\r\n"),
    # -- spaces, tabs, case
    rcpt("space_after_colon", b"RCPT TO: <nosuchuser@example.com>\r\n"),
    rcpt("space_bare_addr", b"RCPT TO: nosuchuser@example.com\r\n"),
    rcpt("two_spaces_verb", b"RCPT  TO:<nosuchuser@example.com>\r\n"),
    rcpt("tab_after_colon", b"RCPT TO:\t<nosuchuser@example.com>\r\n"),
    rcpt("tab_after_verb", b"RCPT\tTO:<nosuchuser@example.com>\r\n"),
    rcpt("tab_bare_addr", b"RCPT TO:bob@example.com\t<nosuchuser@example.com>\r\n"),
    rcpt("trailing_tab", b"RCPT TO:<nosuchuser@example.com>\t\r\n"),
    rcpt("space_in_brackets", b"RCPT TO:< nosuchuser@example.com>\r\n"),
    rcpt("lower_case", b"rcpt to:<nosuchuser@example.com>\r\n"),
    rcpt("upper_bob", b"RCPT TO:<BOB@EXAMPLE.COM>\r\n"),
    # -- quoting, comments, routes
    rcpt("quoted_local", b'RCPT TO:<"nosuchuser"@example.com>\r\n'),
    rcpt("quoted_bob", b'RCPT TO:<"bob"@example.com>\r\n', "qmail queues bob; the wrapper saw \"bob\""),
    rcpt("quoted_gt", b'RCPT TO:<"bob>"@example.com>\r\n'),
    rcpt("backslash", b"RCPT TO:<nosuch\\user@example.com>\r\n"),
    rcpt("backslash_bob", b"RCPT TO:<b\\ob@example.com>\r\n"),
    rcpt("comment_bob", b"RCPT TO:<bob(x)@example.com>\r\n"),
    rcpt("comment_before", b"RCPT TO:(bob)<nosuchuser@example.com>\r\n"),
    rcpt("source_route", b"RCPT TO:<@relay.example:nosuchuser@example.com>\r\n"),
    rcpt("source_route_bob", b"RCPT TO:<@relay.example,@x.example:bob@example.com>\r\n"),
    rcpt("route_at_bob", b"RCPT TO:<@bob:nosuchuser@example.com>\r\n"),
    rcpt("percent_hack", b"RCPT TO:<nosuchuser%example.com@example.com>\r\n"),
    rcpt("domain_literal", b"RCPT TO:<nosuchuser@[127.0.0.1]>\r\n"),
    # -- NUL, CR, LF, 8-bit, length
    rcpt("nul_after_path", b"RCPT TO:<bob@example.com>\x00<nosuchuser@example.com>\r\n"),
    rcpt("nul_in_local", b"RCPT TO:<nosuchuser\x00bob@example.com>\r\n"),
    rcpt("nul_before_lt", b"RCPT TO:bob\x00<nosuchuser@example.com>\r\n"),
    rcpt("bare_cr_two_rcpts", b"RCPT TO:<bob@example.com>\rRCPT TO:<nosuchuser@example.com>\r\n"),
    rcpt("bare_cr_in_addr", b"RCPT TO:bob@example.com\r<nosuchuser@example.com>\r\n"),
    rcpt("double_cr", b"RCPT TO:<nosuchuser@example.com>\r\r\n"),
    rcpt("bare_lf", b"RCPT TO:<nosuchuser@example.com>\n"),
    Case("lf_inside", (EHLO, MAIL, send(b"RCPT TO:<bob@example.com>\nRCPT TO:<nosuchuser@example.com>\r\n", 2),
                       data(), QUIT)),
    rcpt("eight_bit", b"RCPT TO:<nosuchus\xe9r@example.com>\r\n"),
    rcpt("vt_trailing", b"RCPT TO:<nosuchuser@example.com>\x0b\r\n"),
    Case("overlong_then_rcpt", (EHLO, MAIL, BOB, drain(b"NOOP " + b"x" * 16379 + SMUGGLED), data(), QUIT),
         why="exim: a line over 16384 bytes is cut and its tail read as a command"),
    Case("empty_lines", (EHLO, MAIL, send(b"\r\n"), send(b" \r\n"), NOSUCH, data(), QUIT)),
    # -- RSET, HELO, QUIT, DATA with arguments, in the middle of a transaction
    after_bob("rset_arg", send(b"RSET x\r\n"), why="exim/aiosmtpd 501 keep the transaction"),
    after_bob("rset_8bit", send(b"RSET \xff\r\n")),
    after_bob("rset_tab", send(b"RSET\t\r\n"), why="exim resets; qmail and aiosmtpd: unknown verb"),
    after_bob("rset_double_cr", send(b"RSET\r\r\n")),
    after_bob("rset_nul", send(b"RSET\x00\r\n")),
    after_bob("rset_ok", send(b"RSET\r\n"), why="a real reset: the next RCPT needs MAIL everywhere"),
    after_bob("helo_empty", send(b"HELO\r\n"), why="qmail resets, exim/aiosmtpd 501 keep"),
    after_bob("helo_junk", send(b"HELO foo bar\r\n"), why="exim 501 keeps, qmail/aiosmtpd reset"),
    after_bob("helo_underscore", send(b"EHLO a_b.example\r\n")),
    after_bob("ehlo_ok", send(b"EHLO client.example.net\r\n")),
    after_bob("noop_arg", send(b"NOOP x\r\n")),
    after_bob("quit_arg", send(b"QUIT x\r\n"), why="qmail quits; exim/aiosmtpd 501"),
    Case("data_arg", (EHLO, MAIL, BOB, data(b"DATA x\r\n"), NOSUCH, data(), QUIT),
         why="qmail takes DATA x; exim/aiosmtpd 501"),
    # -- MAIL
    Case("mail_no_from", (EHLO, send(b"MAIL <a@example.org>\r\n"), NOSUCH, BOB, data(), QUIT)),
    Case("mail_no_gt", (EHLO, send(b"MAIL FROM:<a@example.org\r\n"), NOSUCH, BOB, data(), QUIT)),
    Case("mail_phrase", (EHLO, send(b"MAIL FROM:x <a@example.org>\r\n"), NOSUCH, BOB, data(), QUIT)),
    Case("mail_null", (EHLO, send(b"MAIL FROM:<>\r\n"), NOSUCH, BOB, data(), QUIT)),
    Case("mail_before_helo", (MAIL, NOSUCH, BOB, data(), QUIT)),
    Case("rcpt_before_mail", (EHLO, NOSUCH, BOB, MAIL, NOSUCH, BOB, data(), QUIT)),
    Case("nested_mail", (EHLO, MAIL, BOB, send(b"MAIL FROM:<b@example.org>\r\n"), NOSUCH, BOB, data(), QUIT),
         why="qmail: a second MAIL restarts; exim/aiosmtpd: 503 and the first stays"),
    Case("nested_mail_limit", (EHLO, MAIL, BOB, send(b"RCPT TO:<postmaster@example.com>\r\n"),
                               send(b"MAIL FROM:<b@example.org>\r\n"), BOB, BOB, BOB, data(), QUIT),
         {"TARPIT_RCPT_LIMIT": "2"}, "the limit must count what the backend holds"),
    Case("nested_bad_mail", (EHLO, MAIL, BOB, send(b"MAIL <b@example.org>\r\n"), NOSUCH, data(), QUIT)),
    Case("pipelined_anyway", (EHLO, send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
                                         b"RCPT TO:<nosuchuser@example.com>\r\n", 3), data(), QUIT),
         why="PIPELINING is not offered to this client; it pipelines anyway"),
    # -- BDAT (exim only offers CHUNKING; qmail and aiosmtpd read the chunk as commands)
    Case("bdat_smuggle", (EHLO, MAIL, BOB, drain(b"BDAT %d LAST\r\n" % len(SMUGGLED) + SMUGGLED + MORE_TXN), data(), QUIT)),
    Case("bdat_zero", (EHLO, MAIL, BOB, send(b"BDAT 0\r\n"), NOSUCH, data(), QUIT)),
    Case("bdat_zero_last", (EHLO, MAIL, BOB, drain(b"BDAT 0 LAST\r\n" + MORE_TXN), QUIT)),
    Case("bdat_2_31", (EHLO, MAIL, BOB, drain(b"BDAT 2147483648\r\n" + SMUGGLED + MORE_TXN), data(), QUIT)),
    Case("bdat_2_32", (EHLO, MAIL, BOB, drain(b"BDAT 4294967296\r\n" + SMUGGLED + MORE_TXN), data(), QUIT),
         why="exim reads 0"),
    Case("bdat_2_32_last", (EHLO, MAIL, BOB, drain(b"BDAT 4294967296 LAST\r\n" + MORE_TXN), QUIT),
         why="exim reads 0 LAST: the message ends, the rest are commands"),
    Case("bdat_2_32_plus", (EHLO, MAIL, BOB, drain(b"BDAT 4294967330 LAST\r\n" + SMUGGLED + MORE_TXN), data(), QUIT),
         why="exim reads 34, the length of the smuggled line"),
    Case("bdat_huge", (EHLO, MAIL, BOB, drain(b"BDAT 99999999999999999999 LAST\r\n" + MORE_TXN), QUIT)),
    Case("bdat_minus", (EHLO, MAIL, BOB, drain(b"BDAT -1\r\n" + SMUGGLED + MORE_TXN), data(), QUIT)),
    Case("bdat_plus", (EHLO, MAIL, BOB, drain(b"BDAT +34 LAST\r\n" + SMUGGLED + MORE_TXN), data(), QUIT)),
    Case("bdat_tab_last", (EHLO, MAIL, BOB, drain(b"BDAT 34\tLAST\r\n" + SMUGGLED + MORE_TXN), data(), QUIT)),
    Case("bdat_no_txn", (EHLO, drain(b"BDAT 34 LAST\r\n" + SMUGGLED + MORE_TXN), MAIL, BOB, data(), QUIT)),
    Case("bdat_lower_last", (EHLO, MAIL, BOB, drain(b"bdat 34 last\r\n" + SMUGGLED + MORE_TXN), data(), QUIT)),
]
IDS = [c.id for c in CORPUS]
assert len(set(IDS)) == len(IDS)
BACKENDS = ("sink", "exim", "qmail")


def ip_of(case: Case) -> str:
    return f"127.0.1.{CORPUS.index(case) + 1}"


def message(case: Case) -> bytes:
    return (f"From: a@example.org\r\nTo: bob@example.com\r\nSubject: diff-{case.id}\r\n"
            f"Date: Mon, 2 Feb 2026 10:00:00 +0000\r\nMessage-ID: <diff-{case.id}@example.org>\r\n\r\n"
            "hello\r\n").encode()


# --- running a script ---------------------------------------------------------


def complete_replies(buf: bytes) -> int:
    """How many complete replies `buf` holds (a line "ddd " or "ddd" ends one)."""
    return sum(1 for ln in buf.split(b"\r\n")[:-1] if len(ln) >= 3 and ln[3:4] != b"-")


def read_replies(sock: socket.socket, count: int | None) -> tuple[bytes, bool]:
    """Read `count` replies (None: until DRAIN_IDLE of silence); (bytes, stop).

    `stop` when the server closed, or when `count` replies did not come within
    STEP_TIMEOUT: the script cannot know which reply answers which line any
    more, so it ends there rather than pair them wrongly.
    """
    buf = b""
    deadline = time.monotonic() + STEP_TIMEOUT
    while count is None or complete_replies(buf) < count:
        wait = DRAIN_IDLE if count is None else deadline - time.monotonic()
        if wait <= 0:
            return buf, True
        sock.settimeout(wait)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return buf, count is not None
        except OSError:
            return buf, True
        if not chunk:
            return buf, True
        buf += chunk
    return buf, False


def run_case(port: int, case: Case) -> list[tuple[bytes, bytes]]:
    """Play `case` from its own address; return the transcript [(sent, replies)], banner first.

    The script stops at the first step whose replies do not all come (see read_replies).
    """
    sock = socket.socket()
    sock.bind((ip_of(case), 0))
    sock.settimeout(STEP_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    transcript = []
    try:
        banner, closed = read_replies(sock, 1)
        transcript.append((b"", banner))
        for step in case.steps:
            if closed:
                break
            kind = step[0]
            try:
                if kind == "send":
                    sock.sendall(step[1])
                    got, closed = read_replies(sock, step[2])
                    transcript.append((step[1], got))
                elif kind == "drain":
                    sock.sendall(step[1].replace(b"@MSG@", message(case) + b".\r\n"))
                    got, closed = read_replies(sock, None)
                    transcript.append((step[1], got))
                else:  # data
                    sock.sendall(step[1])
                    got, closed = read_replies(sock, 1)
                    transcript.append((step[1], got))
                    if got.startswith(b"354") and not closed:
                        body = message(case) + b".\r\n"
                        sock.sendall(body)
                        got, closed = read_replies(sock, 1)
                        transcript.append((body, got))
            except OSError:
                break
    finally:
        sock.close()
    return transcript


# --- the backends and what they queued ----------------------------------------


def start_server(base: Path, command: list[str], env: dict[str, str] | None = None) -> Server:
    """conftest's tarpit_server, module-scoped: one rule per corpus entry, rcptusers bob+postmaster."""
    need("tcpserver")
    need("tcprules")
    control, state = base / "control", base / "state"
    control.mkdir(parents=True)
    state.mkdir()
    (control / "rcptusers").write_text("".join(f"{u}\n" for u in sorted(RCPTUSERS)))
    rules = []
    for case in CORPUS:
        extra = "".join(f',{k}="{v}"' for k, v in case.env.items())
        rules.append(f'{ip_of(case)}:allow,TCPREMOTEHOST="{DYNAMIC}",TARPIT="1",TARPIT_GREYLIST="off"{extra}')
    (base / "rules").write_text("\n".join(rules) + "\n:allow\n")
    with open(base / "rules") as f:
        subprocess.run(["tcprules", str(base / "rules.cdb"), str(base / "rules.tmp")], stdin=f, check=True)
    port = free_port()
    full_env = dict(os.environ, TARPIT_CONTROL=str(control), TARPIT_GREYLIST_URL=str(state / "greylist.sqlite"),
                    TARPIT_STATE_DIR=str(state))
    full_env.pop("TARPIT_CONFIG", None)
    full_env.update(env or {})
    logfile = base / "server.log"
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(["tcpserver", "-vRHl0", "-c", "60", "-x", str(base / "rules.cdb"),
                                 "127.0.0.1", str(port), *command],
                                stdout=log, stderr=log, env=full_env, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and b"status: 0/" not in logfile.read_bytes():
        time.sleep(0.02)
    return Server(port, proc, logfile, base / "Maildir", control, state)


def stop_server(server: Server) -> None:
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    server.proc.wait(timeout=10)


def wait_ended(server: Server, count: int, timeout: float = 30.0) -> None:
    """Wait until tcpserver logged `count` ended connections (every backend has written its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.log().count("tcpserver: end ") < count:
        time.sleep(0.05)


_PAIR = re.compile(r'([A-Za-z_]+)=("(?:[^"\\]|\\.)*"|\S*)')


def logfmt(line: str) -> dict[str, str]:
    return {k: re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith('"') else v for k, v in _PAIR.findall(line)}


def sink_queued(server: Server) -> dict[str, list[list[str]]]:
    """Entry id -> recipients of each message tarpit-sink stored (its log line, by Maildir file)."""
    files = {}
    new = server.maildir / "new"
    for path in new.iterdir() if new.is_dir() else []:
        m = re.search(rb"Subject: diff-(\S+)\r\n", path.read_bytes())
        if m:
            files[f"new/{path.name}"] = m.group(1).decode()
    out: dict[str, list[list[str]]] = {}
    for line in server.log().splitlines():
        if line.startswith("tarpit-sink delivered "):
            f = logfmt(line)
            if f.get("file") in files:
                out.setdefault(files[f["file"]], []).append(f["to"].split(","))
    return out


def exim_queued(exim: Exim) -> dict[str, list[list[str]]]:
    """Entry id -> recipients of each message exim received (mainlog `<=` lines)."""
    out: dict[str, list[list[str]]] = {}
    for line in exim.mainlog().splitlines():
        m = re.search(r' <= .* T="diff-([^"]+)".* for (.*)$', line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2).split())
    return out


def qmail_queued(queue: Path) -> dict[str, list[list[str]]]:
    """Entry id -> recipients of each message qmail-smtpd queued (through the stub)."""
    from qmail_backend import QmailSmtpd

    out: dict[str, list[list[str]]] = {}
    for _, rcpts, msg in QmailSmtpd.queued(queue):
        m = re.search(rb"Subject: diff-(\S+)\n", msg)
        if m:
            out.setdefault(m.group(1).decode(), []).append(rcpts)
    return out


@dataclass
class Run:
    """One backend's results: transcripts, wrapper log lines and queued recipients per entry."""

    transcripts: dict[str, list]
    log: dict[str, list[str]]
    queued: dict[str, list[list[str]]]


def run_corpus(server: Server) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Play every entry against `server`, a few at a time; (transcripts, wrapper log lines per entry)."""
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {case.id: pool.submit(run_case, server.port, case) for case in CORPUS}
        transcripts = {cid: f.result() for cid, f in futures.items()}
    wait_ended(server, len(CORPUS))
    lines = server.log().splitlines()
    log = {case.id: [ln for ln in lines if ln.startswith("tarpit-smtpd ") and f" ip={ip_of(case)} " in ln]
           for case in CORPUS}
    return transcripts, log


def exim_setup() -> Exim:
    """test_exim_backend's exim fixture, for a whole module, logging recipients and subjects."""
    if not os.path.exists(EXIM):
        need(EXIM)
    root = make_exim_root("tarpit-exim-diff-", head="log_selector = +received_recipients +subject\n")
    return Exim(root)


def play(backend: str, base: Path, qmail) -> tuple[Run, list]:
    """Start `backend` behind tcpserver + tarpit-smtpd, play the corpus; (Run, cleanups)."""
    cleanup: list = []
    try:
        if backend == "sink":
            server = start_server(base, ["tarpit-smtpd", "tarpit-sink", str(base / "Maildir")])
            cleanup.append(lambda: stop_server(server))
            transcripts, log = run_corpus(server)
            queued = sink_queued(server)
        elif backend == "exim":
            exim = exim_setup()
            cleanup.append(lambda: shutil.rmtree(exim.root, ignore_errors=True))
            server = start_server(base, ["tarpit-smtpd", *exim.command()])
            cleanup.append(lambda: stop_server(server))
            transcripts, log = run_corpus(server)
            queued = exim_queued(exim)
        else:
            queue = base / "queue"
            server = start_server(base, ["tarpit-smtpd", *qmail.command(queue)])
            cleanup.append(lambda: stop_server(server))
            transcripts, log = run_corpus(server)
            queued = qmail_queued(queue)
    except BaseException:
        for fn in reversed(cleanup):
            fn()
        raise
    return Run(transcripts, log, queued), cleanup


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """Backend name -> Run.  The backends selected in this session are played at once, on first use."""
    wanted = sorted({item.callspec.params["backend"] for item in request.session.items
                     if item.module is request.module and hasattr(item, "callspec")})
    qmail = request.getfixturevalue("qmail_smtpd") if "qmail" in wanted else None
    bases = {b: tmp_path_factory.mktemp(f"diff-{b}") for b in wanted}
    with ThreadPoolExecutor(len(wanted)) as pool:
        futures = {b: pool.submit(play, b, bases[b], qmail) for b in wanted}
        outcomes = {}
        for b, f in futures.items():
            try:
                outcomes[b] = f.result()
            except BaseException as e:  # a skip (exim missing) or failure belongs to that backend only
                outcomes[b] = e
    yield outcomes
    for outcome in outcomes.values():
        if not isinstance(outcome, BaseException):
            for fn in reversed(outcome[1]):
                fn()


# --- the invariant ------------------------------------------------------------


def local_part(rcpt: str) -> str:
    """The local part, lower-cased; a quoted one ("bob"@, exim keeps the quotes) unquoted."""
    local = rcpt.rpartition("@")[0] if "@" in rcpt else rcpt
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local.lower()


def rcpt_got_250(transcript: list[tuple[bytes, bytes]]) -> bool:
    """A single RCPT line (any spelling) answered 250: the backend accepted a recipient."""
    return any(sent[:4].upper() == b"RCPT" and sent.count(b"\n") <= 1 and got.startswith(b"250")
               for sent, got in transcript)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_backend_queues_only_what_the_wrapper_checked(runs, backend, case):
    outcome = runs[backend]
    if isinstance(outcome, BaseException):
        raise outcome
    run = outcome[0]
    transcript, log, queued = run.transcripts[case.id], run.log[case.id], run.queued.get(case.id, [])
    shown = "\n".join(f">>> {s!r}\n<<< {g!r}" for s, g in transcript) + "\n" + "\n".join(log)
    unchecked = [r for rcpts in queued for r in rcpts if local_part(r) not in RCPTUSERS]
    assert not unchecked, f"{backend} queued unchecked recipients {unchecked}:\n{shown}"
    tarpitted = any(" event=tarpit_done " in f"{ln} " for ln in log)
    if queued or rcpt_got_250(transcript):
        assert tarpitted, f"{backend} accepted a recipient but the tarpit never ran:\n{shown}"
    limit = case.env.get("TARPIT_RCPT_LIMIT")
    if limit:
        assert all(len(rcpts) <= int(limit) for rcpts in queued), f"{backend} queued {queued}:\n{shown}"
    if case.id == "good":
        assert queued == [["bob@example.com"]], f"the baseline must deliver:\n{shown}"
