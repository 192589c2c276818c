"""The two clients of the README demo: a good MTA from 127.0.0.2, a bot from 127.0.0.3."""

import smtplib
import socket
import sys
import time

port = int(sys.argv[1])

print("\n== good client from 127.0.0.2 (mail.example.org): delivers at once")
with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=30) as s:
    print("<-", s.ehlo("mail.example.org")[0])
    s.sendmail("alice@example.org", ["bob@example.com"],
               b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: hello\r\n\r\nHi Bob.\r\n")
    print("   message accepted")

print("\n== bot from 127.0.0.3 (p1234-ipbf56abcdef.tokyo.ocn.ne.jp): S25R rule 1, tarpit 5 s at RCPT")
bot = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0))
bot.settimeout(2.0)  # a bot gives up quickly, as seed 000 measured
print("<-", bot.recv(1000).decode().strip())
for line in ("EHLO bot", "MAIL FROM:<spam@example.net>", "RCPT TO:<bob@example.com>"):
    bot.sendall(line.encode() + b"\r\n")
    print("->", line)
    t = time.monotonic()
    try:
        print("<-", bot.recv(1000).decode().strip().replace("\r\n", " | "))
    except socket.timeout:
        print(f"   (no answer after {time.monotonic() - t:.1f} s: the bot gives up and hangs up)")
bot.close()
