"""Every script in tools/, benchmarks/ and experiments/ still starts after the library moves
around it: each answers ``--help`` (its imports resolve and its parser builds). Most are run
nowhere else in the suite: benchmarks need a GPU or a corpus, experiments need hours."""

import subprocess
import sys

from tests.data.conftest import REPO

SCRIPTS = sorted(
    path.relative_to(REPO).as_posix()
    for folder in ("tools", "benchmarks", "experiments")
    for path in (REPO / folder).glob("*.py")
)

# One child for all scripts, so torch and megatron-core are imported once; each script runs as
# __main__ from its own folder on sys.path, as `python <script> --help` would run it.
_HELP_EACH = r"""
import contextlib, io, runpy, sys
from pathlib import Path
failed = []
for script in sys.argv[1:]:
    sys.argv, sys.path[0] = [script, "--help"], str(Path(script).parent)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
        except BaseException as err:
            code = f"{type(err).__name__}: {err}"
    if code != 0 or "usage:" not in out.getvalue():
        failed.append(f"{script}: {code}")
print("\n".join(failed))
"""


def test_the_folders_hold_the_scripts_the_docs_name():
    assert {"tools/preprocess_data.py", "benchmarks/bench_train.py"} <= set(SCRIPTS)
    assert "experiments/wiki_experiment.py" in SCRIPTS


def test_every_script_answers_help():
    done = subprocess.run(
        [sys.executable, "-c", _HELP_EACH, *SCRIPTS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", done.stdout
