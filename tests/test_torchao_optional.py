"""torchao is an optional extra: importing our packages never imports it (no torchao needed here)."""

import subprocess
import sys


def test_importing_our_packages_never_imports_torchao():
    code = (
        "import sys, subclasses, subclasses.io.torchao, unwrap, unwrap.linear, perf.workloads, perf.modes, perf.bench_torchao\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torchao')\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
