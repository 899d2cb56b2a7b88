"""safehold.runtime.server: process-wide serving settings."""

from __future__ import annotations

import subprocess
import sys


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold():
    # process-wide: run it in a child, not in the test process
    code = ("import gc\nfrom safehold.runtime.server import GC_GEN0_THRESHOLD, tune_gc\n"
            "kept = [[i] for i in range(5000)]\ng1, g2 = gc.get_threshold()[1:]\ntune_gc()\n"
            "assert gc.get_threshold() == (GC_GEN0_THRESHOLD, g1, g2), gc.get_threshold()\n"
            "assert gc.get_freeze_count() >= 5000, gc.get_freeze_count()\nprint('tuned')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "tuned", out.stderr
