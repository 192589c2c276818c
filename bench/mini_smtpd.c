/* mini_smtpd: the smallest SMTP server on stdin/stdout, a stand-in for qmail-smtpd in bench/.
 *
 *     gcc -O2 -o mini_smtpd bench/mini_smtpd.c      (bench/run.py does this itself)
 *     tcpserver 127.0.0.1 2525 ./mini_smtpd
 *
 * It exists so the benchmark can see the wrapper's own cost: a Python backend
 * takes ~100 ms to start, which would hide the overhead being measured.
 * Reads commands from fd 0, answers on fd 1, unbuffered, in order:
 *   banner 220; HELO/EHLO/MAIL/RCPT/NOOP/RSET 250; DATA 354 then 250 after
 *   "."; VRFY 252; QUIT 221 and exit; anything else 502.  EOF: exit 0.
 * The message body is discarded.  Lines longer than the buffer are cut.
 */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define LINE 1024

static char inbuf[8192];
static size_t inlen, inpos;

/* write all of s to fd 1; exit when the peer has gone */
static void out(const char *s)
{
    size_t len = strlen(s);
    while (len > 0) {
        ssize_t n = write(1, s, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(0);
        s += n;
        len -= (size_t)n;
    }
}

/* read one line (without CR LF) into line; return 0 on EOF */
static int getline_fd0(char *line)
{
    size_t used = 0;
    for (;;) {
        if (inpos == inlen) {
            ssize_t n = read(0, inbuf, sizeof inbuf);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return 0;
            inlen = (size_t)n;
            inpos = 0;
        }
        char c = inbuf[inpos++];
        if (c == '\n')
            break;
        if (used < LINE - 1)
            line[used++] = c;
    }
    if (used > 0 && line[used - 1] == '\r')
        used--;
    line[used] = '\0';
    return 1;
}

static int verb(const char *line, const char *v)
{
    size_t n = strlen(v);
    return strncasecmp(line, v, n) == 0 && (line[n] == '\0' || isspace((unsigned char)line[n]));
}

static int is_verb(const char *line, const char *v)
{
    return strncasecmp(line, v, strlen(v)) == 0;
}

/* swallow the message up to the lone "." line; 0 on EOF */
static int data_body(char *line)
{
    while (getline_fd0(line))
        if (strcmp(line, ".") == 0)
            return 1;
    return 0;
}

int main(void)
{
    char line[LINE];
    const char *host = getenv("TCPLOCALHOST");
    if (host == NULL || *host == '\0' || strcmp(host, "0") == 0)
        host = "localhost";
    out("220 ");
    out(host);
    out(" ESMTP mini_smtpd\r\n");
    while (getline_fd0(line)) {
        if (verb(line, "EHLO")) {
            out("250-");
            out(host);
            out("\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n");
        } else if (verb(line, "HELO")) {
            out("250 ");
            out(host);
            out("\r\n");
        } else if (is_verb(line, "MAIL FROM:") || is_verb(line, "RCPT TO:")
                   || verb(line, "NOOP") || verb(line, "RSET")) {
            out("250 2.0.0 ok\r\n");
        } else if (verb(line, "DATA")) {
            out("354 go ahead\r\n");
            if (!data_body(line))
                break;
            out("250 2.0.0 ok: discarded\r\n");
        } else if (verb(line, "VRFY")) {
            out("252 2.1.5 send some mail, I'll try my best\r\n");
        } else if (verb(line, "QUIT")) {
            out("221 2.0.0 bye\r\n");
            return 0;
        } else {
            out("502 5.5.2 unimplemented\r\n");
        }
    }
    return 0;
}
