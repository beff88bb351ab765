"""Command line: ``python -m datasets_io {ingest,demo} ...``.

    python -m datasets_io ingest --layout emotion6 --root data/Emotion6 --out data/shards/emotion6
    python -m datasets_io ingest --layout emotion6 --root data/Emotion6 --out data/shards/emotion6-given \
        --train-list train.txt --test-list test.txt --max-side 0
    python -m datasets_io demo --out data/demo --images-per-class 40

The ingest prints a line per split, the summary (with the skipped files counted by reason) and,
on a terminal, one progress bar; Ray's own output stays in its session logs unless ``--verbose``.
Bad input ends with one line ``error: ...`` on stderr and exit status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from datasets_io.errors import DataError
from datasets_io.layouts import LAYOUTS


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (a bad flag value is argparse's usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets_io", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="validate a dataset's images into Parquet shards (Ray Data)")
    ingest.add_argument("--layout", required=True, choices=LAYOUTS, help="on-disk layout of --root")
    ingest.add_argument("--root", required=True, help="dataset folder")
    ingest.add_argument("--out", required=True, help="output folder (<out>/<split>/*.parquet + manifest.json)")
    ingest.add_argument("--max-side", type=_at_least(0), default=512,
                        help="shrink the longer side to this (default 512); 0 keeps each original file's bytes "
                             "(still fully decoded to validate it, never re-encoded)")
    ingest.add_argument("--max-pixels", type=_at_least(1), default=None,
                        help="reject images whose header declares more pixels (default 64 megapixels)")
    ingest.add_argument("--overwrite", action="store_true", help="replace a complete earlier output")
    ingest.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray without the dashboard)")
    ingest.add_argument("--categories", nargs="+", default=None,
                        help="category names in label order, or one built-in set name (FI, Flickr, ...)")
    ingest.add_argument("--split-ratios", nargs=3, type=float, default=None, metavar=("TRAIN", "VAL", "TEST"),
                        help="ratios of the seeded split where the dataset has none (reader default 0.8 0.1 0.1)")
    ingest.add_argument("--seed", type=int, default=None,
                        help="seed of that split, or of the validation images drawn from a given split "
                             "(reader default 42)")
    ingest.add_argument("--train-list", default=None,
                        help="emotion6: a given split, one images/-relative path (anger/1.jpg) per line; "
                             "with --test-list")
    ingest.add_argument("--test-list", default=None, help="emotion6: the given test images, as --train-list")
    ingest.add_argument("--val-fraction", type=float, default=None,
                        help="emotion6 with a given split (lists, or train/ and test/ folders): the seeded "
                             "random share of the training images used for validation (reader default 0.2)")
    ingest.add_argument("--keep-duplicates", action="store_true",
                        help="ser30k: keep every annotation entry, a file listed twice as two rows "
                             "(as the published SER_Full); default: later mentions are skipped")
    ingest.add_argument("--lexicon", default=None,
                        help="NRC-VAD lexicon file to map other category names (emotion6: unused, VA is measured)")
    ingest.add_argument("--num-output-files", type=_at_least(1), default=None,
                        help="files per split (default: by size)")
    ingest.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal)")
    ingest.add_argument("--verbose", action="store_true", default=None,
                        help="show Ray's own output (also EMOTION_RAY_VERBOSE=1); default: kept in Ray's "
                             "session logs")

    demo = commands.add_parser("demo", help="write the synthetic demo datasets (FI-, Emotion6-, SER30K-like)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--images-per-class", type=_at_least(1), default=40)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--image-size", type=_at_least(8), default=64)
    return parser


def _reader_options(args: argparse.Namespace) -> dict:
    """Only the reader options given on the command line, so the reader's defaults apply otherwise.

    List files are paths from the current folder (the reader takes relative ones from the root).
    """
    categories = args.categories
    if categories is not None and len(categories) == 1:
        categories = categories[0]  # a built-in set name, e.g. "FI"
    given = {"categories": categories, "split_ratios": args.split_ratios, "seed": args.seed,
             "train_list": _absolute(args.train_list), "test_list": _absolute(args.test_list),
             "val_fraction": args.val_fraction, "keep_duplicates": args.keep_duplicates or None}
    return {name: value for name, value in given.items() if value is not None}


def _absolute(path: Optional[str]) -> Optional[str]:
    return None if path is None else str(Path(path).expanduser().resolve())


def run(args: argparse.Namespace) -> None:
    if args.command == "ingest":
        from datasets_io.images import DEFAULT_MAX_PIXELS
        from datasets_io.ingest import ingest

        ingest(args.layout, args.root, args.out, max_side=args.max_side, overwrite=args.overwrite,
               reader_options=_reader_options(args), lexicon_path=args.lexicon,
               max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, num_output_files=args.num_output_files,
               show_progress=not args.no_progress, address=args.address, verbose=args.verbose,
               split_lines=True)
    else:
        from datasets_io.demo import make_demo

        roots = make_demo(args.out, images_per_class=args.images_per_class, seed=args.seed,
                          image_size=args.image_size)
        for name, root in roots.items():
            print(f"{name}: {root}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DataError, OSError) as err:  # bad data or options; FileNotFoundError, FileExistsError, ...
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
