"""`nnunet-green-report PATH... -o REPORT_DIR`: compare green training runs and compressed models."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_green.contract import (BENCH_FILE, EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_OK, GREEN_LOG_FILE,
                                   GREEN_SUMMARY_FILE, MANIFEST_FILE, GreenError)

EPILOG = f"""\
PATH may be an nnU-Net fold folder ({GREEN_LOG_FILE}, {GREEN_SUMMARY_FILE}), a model folder (fold_*/ inside; its
folds are one row: time/energy/CO2 summed, Dice averaged), a compressed model folder ({MANIFEST_FILE}; shown with
its rank rule, parameters kept and recovery), a {BENCH_FILE} from nnunet-green-bench (or its folder), or any parent
folder, searched recursively for all of these. A record ({MANIFEST_FILE}, {GREEN_SUMMARY_FILE}, {BENCH_FILE})
this version cannot read is an error when named as PATH, and a warning naming it (the file left out) when found in
a folder.

examples:
  nnunet-green-report $nnUNet_results/Dataset004_Hippocampus -o report/
  nnunet-green-report results/Dataset004*/nnUNetTrainerGreen* compressed/ bench_out/{BENCH_FILE} -o report/ \\
      --title "Hippocampus, 5 folds"
writes REPORT_DIR/report.md, report.html (self-contained), report.json and the PNG figures.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet-green-report", description=__doc__.split(":", 1)[1].strip(),
                                epilog=EPILOG + "\n" + EXIT_CODES_HELP + "\n",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, model folders, bench.json, or parents")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder for the report files")
    p.add_argument("--title", default=None, help="report title (default: nnunet-green report)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # imported here so that --help works without matplotlib's start-up cost
    from nnunet_green.report.build import build
    try:
        report = build(args.paths, args.output, args.title)
    except GreenError as e:  # ReportError and the contract's SchemaError: bad input, one message
        print(f"nnunet-green-report: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.output)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    n_fig = sum(len(s.figures) for s in report.sections)
    print(f"wrote {out / 'report.md'}, {out / 'report.html'}, {out / 'report.json'} and {n_fig} figure(s)")
    for s in report.sections:
        for f in s.skipped:
            print(f"  skipped {f['figure']}: {f['reason']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
