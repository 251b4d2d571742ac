"""SageMaker training container entry point: runs `qcsight train` with the SM_* environment filled in.

SageMaker (or its torchrun driver) runs ``python sagemaker_entry.py --key value ...`` with the
hyperparameters as arguments; qcsight_train.cli reads the channels, SM_MODEL_DIR, SM_HPS and
the torchrun variables itself.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _add_source_tree() -> None:
    # When the job ships the repository as source code rather than an installed wheel, the
    # packages sit beside this file (training/) and in ../edge_agent, ../infra; an installed qcsight wins.
    here = Path(__file__).resolve().parent
    for folder, package in ((here, "qcsight_train"), (here.parent / "edge_agent", "qcsight_core"),
                            (here.parent / "infra", "qcsight_aws")):
        if (folder / package).is_dir() and str(folder) not in sys.path:
            sys.path.append(str(folder))


if __name__ == "__main__":
    _add_source_tree()
    from qcsight_train.cli import main

    sys.exit(main(sys.argv[1:], "qcsight train"))
