"""ExplanationMonitor under ``ddp_spawn`` on 2 CPU processes: the launching process's callback object stays empty,
the callback says so once, and ``load_results`` brings back what rank zero wrote. Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning_helpers import BlobData, TinyClassifier, quiet_trainer

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.namespace import pl


def main() -> None:
    out = sys.argv[1]
    pl.seed_everything(0)
    monitor = ExplanationMonitor(["saliency"], num_samples=4, output_dir=out)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], strategy="ddp_spawn", devices=2,
                            default_root_dir=out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(), BlobData())
    in_main = len(monitor.history)
    monitor.load_results(out)
    print(json.dumps({
        "history_in_launching_process": in_main,
        "history_after_load": len(monitor.history),
        "drift_epochs": [e for e, _ in monitor.drift_history["saliency"]],
        "files": sorted(os.listdir(out)),
        "main_warnings": [str(w.message) for w in caught if "ExplanationMonitor" in str(w.message)],
    }))


if __name__ == "__main__":
    main()
