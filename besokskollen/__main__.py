"""`besokskollen` and `python3 -m besokskollen`: the CLI, started so that a Ctrl-C while its
modules load (about half a second) ends in one line, as one later does, not in a traceback, and
so that a reader that stops early (`besokskollen status | head -1`) ends it quietly."""

import os
import select
import signal
import sys


def run() -> None:
    try:
        from besokskollen.cli import main

        main()  # catches a Ctrl-C itself once the command runs
    except (KeyboardInterrupt, ImportError) as exc:
        # A Ctrl-C while an extension module loads (chDB's engine, ~1 s) reaches Python as an
        # ImportError naming KeyboardInterrupt; chDB's own then says "chdb-core engine not found".
        if not _interrupted(exc):
            raise
        print("besokskollen: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a socket's (ClickHouse's, Kafka's): an error, not the reader's choice
        # The rest of the output is unread, as for any Unix tool; Python would print a traceback
        # on exit when it flushes stdout into the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # as a shell reports a command ended by SIGPIPE
    finally:
        # Done, refused or interrupted, and said so: a Ctrl-C now would end the process by the
        # signal mid-shutdown (a key printed and stored, then "killed"), not change the outcome.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupted(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt) or str(exc).startswith("KeyboardInterrupt"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLERR)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    run()
