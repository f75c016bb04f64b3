"""What the example scripts share: the plot check and the command-line options every one takes."""
import argparse
import os


def have_matplotlib() -> bool:
    # Without matplotlib (e.g. the offline GPU machine) a script still trains and prints its
    # figures, what the smoke tests check, and only skips the plot.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def base_parser(doc: str, tiny_help: str) -> argparse.ArgumentParser:
    """A parser with --out (where the PNG goes) and --tiny (the smoke tests' seconds-long run)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                   help="directory for the PNG (default: examples/out)")
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    return p
