"""Score HF model folders on the pipeline's held-out prompts, with the code in-training validation runs.

    python tools/evaluate.py base=artifacts/base/hf student=artifacts/student/hf [--out DIR]

The held-out prompts are those of configs/tiny/defaults.yaml (every stage's data), so the figures compare with
the `val/accuracy/<domain>` curves in TensorBoard and with the pipeline's results.json. Writes DIR/results.json,
results.md and accuracy.png (DIR defaults to artifacts/eval).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opd_lightning.pipeline import CONFIGS, DEFAULTS
from opd_lightning.report import evaluate_models, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH of HF folders")
    parser.add_argument("--out", default="artifacts/eval", help="where results.json / results.md / accuracy.png go")
    args = parser.parse_args()
    paths = {name: Path(path) for name, _, path in (m.rpartition("=") for m in args.models)}
    paths = {name or str(path): path for name, path in paths.items()}
    first = next(iter(paths.values()))
    config = ["--config", str(DEFAULTS), "--config", str(CONFIGS / "base.yaml"), f"--model.init_args.model={first}"]
    scores, specs = evaluate_models(paths, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, scores, specs, walls={}, experts={})
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
