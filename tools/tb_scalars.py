"""Print scalar curves from TensorBoard event files: `python tools/tb_scalars.py runs/base/version_0 [TAG ...]`.

Used to quote figures (accuracy curves, KL curves) from a run without opening the TensorBoard UI.
"""

import sys

from opd_lightning.report import read_scalars


def main() -> None:
    logdir, tags = sys.argv[1], sys.argv[2:]
    for tag, points in sorted(read_scalars(logdir).items()):
        if not tags or any(t in tag for t in tags):
            print(tag + ": " + ", ".join(f"{s}:{v:.3f}" for s, v in points[-12:]))


if __name__ == "__main__":
    main()
