"""python -m adaptive_attn.analysis SWEEP_DIR [--out DIR] [--no-plots]"""

import argparse

from adaptive_attn.analysis.results import analyse


def main() -> None:
    p = argparse.ArgumentParser(description="Summarise a sweep: results.csv, summary.md and plots.")
    p.add_argument("sweep_dir")
    p.add_argument("--out", help="output directory (default: the sweep directory)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args()
    analyse(args.sweep_dir, args.out, plots=not args.no_plots)
    out = args.out or args.sweep_dir
    print(open(f"{out}/summary.md").read())


if __name__ == "__main__":
    main()
