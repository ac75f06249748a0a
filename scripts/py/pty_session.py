#!/usr/bin/env python3
"""Drive an interactive program on a pseudo-terminal, for the prompt tests (stdlib only).

Usage: pty_session.py STEPS_JSON -- PROGRAM [ARGS...]

STEPS_JSON is a list of ["expect", TEXT] and ["send", TEXT] steps. "expect" waits (up to 30 s)
until TEXT appears in the output after the previous match (escape sequences removed); "send"
types TEXT. Prints the whole cleaned transcript; exits 1 if an expectation times out, else with
the program's exit status.
"""
import json
import os
import pty
import re
import select
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\r")


def main():
    sep = sys.argv.index("--")
    steps = json.loads(sys.argv[1])
    argv = sys.argv[sep + 1:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    raw = b""
    seen = 0

    def pump(timeout):
        nonlocal raw
        r, _, _ = select.select([fd], [], [], timeout)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return False
            if not chunk:
                return False
            raw += chunk
        return True

    for kind, text in steps:
        if kind == "send":
            os.write(fd, text.encode())
            continue
        deadline = time.time() + 30
        while True:
            clean = ANSI.sub("", raw.decode("utf-8", "replace"))
            i = clean.find(text, seen)
            if i >= 0:
                seen = i + len(text)
                break
            if time.time() > deadline or not pump(0.2):
                if time.time() <= deadline and text in ANSI.sub("", raw.decode("utf-8", "replace"))[seen:]:
                    break
                sys.stdout.write(clean)
                sys.exit("pty_session: timed out waiting for %r" % text)
    while pump(5):
        pass
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(ANSI.sub("", raw.decode("utf-8", "replace")))
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
