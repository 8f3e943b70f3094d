"""Print scalar curves from TensorBoard event files: `python tools/tb_scalars.py runs/base/version_0 [TAG ...]`.

Used to quote figures (accuracy curves, KL curves) from a run without opening the TensorBoard UI.
"""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(logdir: str) -> dict[str, list[tuple[int, float, float]]]:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def main() -> None:
    logdir, tags = sys.argv[1], sys.argv[2:]
    curves = scalars(logdir)
    for tag in sorted(curves):
        if tags and not any(t in tag for t in tags):
            continue
        points = curves[tag]
        t0 = points[0][2]
        print(tag + ": " + ", ".join(f"{s}:{v:.3f}@{w - t0:.0f}s" for s, v, w in points[-12:]))


if __name__ == "__main__":
    main()
