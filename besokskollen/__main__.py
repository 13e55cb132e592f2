"""`besokskollen` and `python3 -m besokskollen`: the CLI, started so that a Ctrl-C while its
modules load (about half a second) ends in one line, as one later does, not in a traceback."""

import sys


def run() -> None:
    try:
        from besokskollen.cli import main

        main()  # catches a Ctrl-C itself once the command runs
    except KeyboardInterrupt:
        print("besokskollen: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    run()
