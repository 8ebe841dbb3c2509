"""launch/train.py with a fault armed from the TEST_FAULT environment variable (see faults.py).

Tests run this script in place of launch/train.py, through the same launchers and with the same
flags; it arms the fault in each process, then hands over to the real launcher script.
"""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What launch/train.py would set first, before the harness (and huggingface_hub) is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))

import faults  # noqa: E402  (from this folder, sys.path[0] of a script)

faults.install_from_env()
runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="__main__")
